// The skeleton both trainers share: flags, validation, choosing the device, and the loop.
// Each trainer's .cu file supplies only its FFN kind (and, once the GPU path lands, its FFN layer
// and that layer's parallelism).
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>

#include "config.h"
#include "cpu_train.h"

namespace lmoe {

// Number of usable CUDA devices; 0 when there is no GPU or no working driver.
inline int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no device / no driver" error
        return 0;
    }
    return n;
}

inline int trainer_main(int argc, char** argv, FfnKind ffn, const char* summary) {
    Config c;
    try {
        if (!parse_flags(c, ffn, argc, argv)) {
            print_help(argv[0], ffn, summary);
            return 0;
        }
        validate(c, 1);
    } catch (const ConfigError& e) {
        std::fprintf(stderr, "%s: error: %s\n", argv[0], e.what());
        return 2;
    }
    print_config(c);
    const int gpus = cuda_device_count();
    // The GPU path is not written yet: say so rather than pretend, and train the CPU reference.
    if (c.device == "gpu") {
        std::fprintf(stderr, "%s: error: --device gpu: the CUDA training path is not implemented yet; "
                             "only the CPU reference trains (--device cpu)\n", argv[0]);
        return 2;
    }
    if (gpus == 0) std::printf("no GPU found: training the CPU reference model instead (slow; tiny models only)\n");
    else if (c.device == "auto")
        std::printf("%d GPU(s) found, but the CUDA training path is not implemented yet: "
                    "training the CPU reference model instead\n", gpus);
    try {
        return train_on_cpu(c);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n", argv[0], e.what());
        return 1;
    }
}

}  // namespace lmoe
