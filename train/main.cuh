// What a trainer's main() runs (train_latentmoe.cu, moe_ep_baseline.cu): MPI when a launcher started
// the process, the flags, then the layer benchmark, the training loop on the GPU model, or — without a
// GPU, or with --device cpu — the same loop on the CPU reference; and the exit status every error
// maps to. Kept apart from the models so the tests can include a trainer without its main().
#pragma once
#include <cuda_runtime.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "model/config.h"
#include "model/locmoe.h"
#include "model/locmoe.h"
#include "parallel/comm.cuh"
#include "train/cpu_model.h"
#include "train/gpu_memory.cuh"
#include "train/gpu_model.cuh"
#include "train/layer_bench.cuh"
#include "train/loop.h"
#include "train/memory_estimate.h"

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

// True when a launcher (mpirun, srun) started this process: only then is MPI initialised, so a
// one-GPU or CPU run needs no MPI at all.
inline bool launched_by_mpi() {
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
        if (std::getenv(v)) return true;
    return false;
}

// Runs a check whose verdict may differ between ranks (free memory does), then tells every rank
// whether any failed, so that none is left waiting in a collective for one that stopped. A failing
// rank other than 0 reports its own reason (trainer_main prints rank 0's).
template <class Check>
void check_on_every_rank(const Comm& comm, Check&& check) {
    std::string why;
    try {
        check();
    } catch (const ConfigError& e) {
        why = e.what();
    }
    int failed = !why.empty();
    if (comm.single()) {
        if (failed) throw ConfigError(why);
        return;
    }
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
    if (!why.empty() && comm.rank != 0) std::fprintf(stderr, "rank %d: error: %s\n", comm.rank, why.c_str());
    if (failed) throw ConfigError(why.empty() ? "another rank's start-up check failed (its message is above)" : why);
}

template <class Ffn>
int run_trainer(int argc, char** argv, const Comm& comm) {
    Config c;
    const bool lead = comm.rank == 0;
    const int gpus = cuda_device_count();
    if (!parse_flags(c, Ffn::kind, argc, argv)) {
        if (lead) print_help(argv[0], Ffn::kind, Ffn::summary());
        return 0;
    }
    validate(c, comm.world);
    require_built_parallelism(c, comm.world);
    if (c.device == "gpu" && gpus == 0) throw ConfigError("--device gpu, but no GPU was found");
    const bool on_gpu = c.device != "cpu" && gpus > 0;
    if (!comm.single() && !on_gpu) throw ConfigError("several ranks need the GPU path (one GPU per rank)");
    if (lead) print_config(c);
    if (lead && c.locmoe()) print_capacity(c, c.B * c.T);
    const char* smaller = "use a smaller --batch, --seq-len, --layers or --preset";
    if (on_gpu) {
        check_gpu_supported<Ffn>(c);
        if (c.bench_layer) return bench_ffn_layer<Ffn>(c, comm);
        // before the model takes anything, agreed by every rank: LocMoE's node size, the device memory
        // against what the GPU has free (the CUDA context already made), and the host memory the
        // checkpoints and data need
        check_on_every_rank(comm, [&] {
            if (c.locmoe()) locmoe_node_size(c, comm.world, comm.local_size);  // hosts may hold other rank counts
            check_memory(gpu_memory_estimate(c, comm.world), device_free_bytes(),
                         comm.single() ? "GPU" : "GPU of each rank", "free on the device (cudaMemGetInfo)",
                         comm.single() ? smaller : "use more GPUs or a smaller configuration", lead);
            const HostMemory host = available_host_memory();
            check_memory(gpu_host_memory_estimate(c, comm.world), host.bytes, "host", host.limit, smaller, lead);
        });
        return training_loop<GpuModel<Ffn>>(c, comm.rank, comm.world, comm);
    }
    if (c.bench_layer) throw ConfigError("--bench-layer needs a GPU");
    check_cpu_trainable(c, c.device != "cpu");
    std::printf("%s: training the CPU reference model (slow; tiny models only)\n",
                gpus == 0 ? "no GPU found" : "--device cpu");
    const HostMemory host = available_host_memory();
    check_memory(cpu_memory_estimate(c), host.bytes, "host", host.limit,
                 "--device cpu trains tiny models: use --preset tiny or small, or a smaller --batch or --seq-len",
                 true);
    return training_loop<CpuModel>(c, 0, 1);
}

// Flags and configuration errors exit 2, data and I/O errors 1; under mpirun every rank meets the
// same error, and only rank 0 reports it.
template <class Ffn>
int trainer_main(int argc, char** argv) {
    // Output appears as it is made, into a terminal or a file: every line flushed. SIGPIPE is ignored
    // before the first line, so a closed stdout (`| head`) only makes printf fail, never ends the run.
    std::signal(SIGPIPE, SIG_IGN);
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    Comm comm;
    int status;
    try {
        if (launched_by_mpi()) comm = comm_init(&argc, &argv);
        status = run_trainer<Ffn>(argc, argv, comm);
    } catch (const ConfigError& e) {
        if (comm.rank == 0) std::fprintf(stderr, "%s: error: %s\n", argv[0], e.what());
        status = 2;
    } catch (const std::bad_alloc&) {  // the estimate checked at start-up fell short: say so plainly
        std::fprintf(stderr, "%s: error: out of host memory (std::bad_alloc) although the start-up estimate fitted; "
                     "use a smaller --batch, --seq-len or --layers\n", argv[0]);
        status = 1;
    } catch (const std::length_error& e) {
        std::fprintf(stderr, "%s: error: a buffer too large for this machine (%s); use a smaller configuration\n",
                     argv[0], e.what());
        status = 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error%s: %s\n", argv[0],
                     comm.single() ? "" : (" on rank " + std::to_string(comm.rank)).c_str(), e.what());
        status = 1;
    }
    // A failure on one rank could leave the others waiting in a collective for ever: end them all.
    if (status == 1 && !comm.single()) MPI_Abort(MPI_COMM_WORLD, 1);
    if (launched_by_mpi()) comm_finalize(comm);
    return status;
}

}  // namespace lmoe
