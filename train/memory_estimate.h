// The memory a configuration needs, estimated before anything is allocated (SPEC §8.6), and the
// memory the machine has for it; run_trainer (train/main.cuh) prints both ("memory: about X GiB of Y
// GiB available") and refuses, with the figures, a configuration that cannot fit, so an impossible
// size is a ConfigError at start-up rather than a std::bad_alloc, the OOM killer or a swapping machine
// minutes later. Host-only; the GPU model's device formula is train/gpu_memory.cuh.
//
// How close: the CPU figure counts every buffer of ref::Model<float> (cpu/reference.h), CpuModel's
// AdamW moments and counts (train/cpu_model.h), the backward's temporaries, the data shards and the
// checkpoint copies, plus a fixed allowance for the program itself; it is meant to be within 10-20%
// of the peak resident memory, erring high (transient buffers are counted as if alive at once).
// Measured (peak RSS, /usr/bin/time -v, 2026-12-01): tiny 0.24 GiB estimated / 0.22 GiB used (the
// program's own 218 MiB dominates), small 2.56 / 2.49 GiB.
#pragma once
#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "io/dataloader.h"
#include "model/config.h"
#include "model/params.h"

namespace lmoe {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// One figure of an estimate, in bytes, with what it is.
struct MemoryPart {
    const char* what;
    int64_t bytes;
};

struct MemoryEstimate {
    std::vector<MemoryPart> parts;
    int64_t total() const {
        int64_t t = 0;
        for (const MemoryPart& p : parts) t += p.bytes;
        return t;
    }
    // "parameters 1.2 GiB, optimizer 2.4 GiB, ..." for a refusal's message
    std::string breakdown() const {
        std::string s;
        for (const MemoryPart& p : parts) {
            char b[96];
            std::snprintf(b, sizeof b, "%s%s %.3g GiB", s.empty() ? "" : ", ", p.what, p.bytes / kGiB);
            s += b;
        }
        return s;
    }
};

// Every parameter tensor must be int-indexable and so must this rank's whole flat buffer: the GPU
// model scales the sharded gradients with cuBLAS's int count (gpu_model.cuh, sync_gradients).
// The layout is built from the validated config only (L <= 1024 tensors a layer: cheap).
inline ParamLayout checked_param_layout(const Config& c, int world) {
    const ParamLayout layout = build_param_layout(c, 0, world);
    for (const TensorSpec& t : layout.tensors)
        if (t.numel > kMaxIndex)
            throw ConfigError("parameter tensor " + t.name + " holds " + std::to_string(t.numel) +
                              " elements, above the bound 2^31 - 1 (tensors are indexed with int)");
    if (layout.total > kMaxIndex)
        throw ConfigError("the model holds " + std::to_string(layout.total) + " parameters per rank, above the "
                          "bound 2^31 - 1 (gradients are scaled with an int count); use fewer layers or experts, "
                          "or more ranks");
    return layout;
}

// Bytes the data loaders hold: the current train and val shard (the largest of each) and the train
// shard read once more for the unigram baseline (train/loop.h). 0 for a pattern that names nothing:
// the loader reports that, with its own message and status, after the configuration checks.
inline int64_t data_bytes(const Config& c) {
    const int64_t train = largest_shard_bytes(c.train_data), val = largest_shard_bytes(c.val_data);
    return 2 * train + val;
}

// The CPU path: ref::Model<float> + CpuModel + the loop, floats of 4 bytes, ints of 4.
inline MemoryEstimate cpu_memory_estimate(const Config& c) {
    const int64_t P = checked_param_layout(c, 1).total;
    const int64_t N = (int64_t)c.B * c.T, d = c.d, L = c.L, Vp = c.Vp(), f = 4;
    const int64_t HD = c.ffn == FfnKind::LatentMoE ? (int64_t)c.H * c.dh : 0;  // the MoE keeps no u, y
    const int64_t scores = (int64_t)c.B * c.n_head * c.T * c.T;
    // per layer, kept for the backward: x_in, xn1, qkv (3), attn, x_mid, xn2 (N, d each); rstd1, rstd2 (N);
    // probs (B, nh, T, T); the FFN cache: u, y (N, H·dh), sel and gate (H, N, k)
    const int64_t per_layer = 8 * N * d + 2 * N + scores + 2 * N * HD + 2 * (int64_t)c.H * N * c.k;
    // once: x_out, xf (N, d), rstdf (N), logits and lm_probs (N, Vp)
    const int64_t once = 2 * N * d + N + 2 * N * Vp;
    // backward temporaries alive together: dlogits (N, Vp), dxf, dx (N, d); the layer's dxn, dattn,
    // dqkv (5 N·d) and the FFN's dy, du (N, H·dh); the loop's token and target vectors (train, val)
    const int64_t backward = N * Vp + 7 * N * d + 2 * N * HD + 4 * N;
    const int64_t routing = (int64_t)L * c.H * c.E * (4 + 8);  // bias (float), counts (int64)
    MemoryEstimate e;
    e.parts = {
        {"parameters and gradients", 2 * P * f},
        {"AdamW moments", 2 * P * f},
        {"activations", (L * per_layer + once + backward) * f + routing},
        {"checkpoint copies", 3 * P * f},  // state(): params, m, v copied for a save (or a resume)
        {"data", data_bytes(c)},
        {"program", 224ll << 20},  // the binary and its libraries, CUDA runtime loaded: 218 MiB measured
    };
    return e;
}

// Host memory of the GPU path: the parameters' initial values (one float each, gone after the
// upload) or the checkpoint copies (params, m, v), the data, the pinned token buffer and the CUDA
// runtime's own host memory.
inline MemoryEstimate gpu_host_memory_estimate(const Config& c, int world) {
    const int64_t P = checked_param_layout(c, world).total;
    MemoryEstimate e;
    e.parts = {
        {"checkpoint copies", 3 * P * 4},
        {"data", data_bytes(c)},
        {"tokens", 4 * (int64_t)c.B * c.T * 4},
        {"program and CUDA runtime", 512ll << 20},
    };
    return e;
}

// ---------------------------------------------------------------------------------------------
// What the machine has: the smallest of the memory the kernel could give without swapping
// (/proc/meminfo MemAvailable), what the cgroup still allows (memory.max − memory.current, cgroup
// v2) and what the address-space limit (ulimit -v) leaves. -1 where none can be read.

inline int64_t read_first_int64(const std::string& path) {
    std::ifstream in(path);
    std::string word;
    if (!(in >> word) || word == "max") return -1;
    try {
        return std::stoll(word);
    } catch (...) {
        return -1;
    }
}

// The value of `key` (in kB) in a /proc file of "Key:   value kB" lines, in bytes; -1 if absent.
inline int64_t read_proc_kb(const std::string& path, const std::string& key) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line))
        if (line.compare(0, key.size() + 1, key + ":") == 0) {
            std::istringstream fields(line.substr(key.size() + 1));
            int64_t kb;
            if (fields >> kb) return kb * 1024;
        }
    return -1;
}

struct HostMemory {
    int64_t bytes = -1;   // available to this process; -1: unknown
    std::string limit;    // which figure binds: "MemAvailable", "cgroup memory.max", "ulimit -v"
};

inline HostMemory available_host_memory() {
    HostMemory m;
    auto consider = [&](int64_t bytes, const char* what) {
        if (bytes >= 0 && (m.bytes < 0 || bytes < m.bytes)) {
            m.bytes = bytes;
            m.limit = what;
        }
    };
    consider(read_proc_kb("/proc/meminfo", "MemAvailable"), "MemAvailable");
    const int64_t cg_max = read_first_int64("/sys/fs/cgroup/memory.max");
    if (cg_max >= 0) {
        const int64_t used = read_first_int64("/sys/fs/cgroup/memory.current");
        consider(std::max<int64_t>(0, cg_max - std::max<int64_t>(0, used)), "cgroup memory.max");
    }
    struct rlimit as;
    if (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY) {
        const int64_t mapped = read_proc_kb("/proc/self/status", "VmSize");
        consider(std::max<int64_t>(0, (int64_t)as.rlim_cur - std::max<int64_t>(0, mapped)), "ulimit -v");
    }
    return m;
}

// Prints "memory: about X GiB of Y GiB available (where)" and throws ConfigError when the estimate is
// over what is available. `where`: "host", "GPU 0"; `advice`: what to change.
inline void check_memory(const MemoryEstimate& need, int64_t available, const std::string& where,
                         const std::string& limit, const std::string& advice, bool print) {
    const double need_gib = need.total() / kGiB;
    if (print) {
        if (available >= 0)
            std::printf("memory (%s): about %.3g GiB of %.3g GiB available\n", where.c_str(), need_gib,
                        available / kGiB);
        else
            std::printf("memory (%s): about %.3g GiB (available memory unknown)\n", where.c_str(), need_gib);
    }
    if (available >= 0 && need.total() > available) {
        char b[160];
        std::snprintf(b, sizeof b, "this configuration needs about %.3g GiB of %s memory, but only %.3g GiB is "
                      "available (%s)", need_gib, where.c_str(), available / kGiB, limit.c_str());
        throw ConfigError(std::string(b) + ": " + need.breakdown() + "; " + advice);
    }
}

// The CPU path trains tiny models: the GPU-sized presets would take hours a step (and tens of GiB).
inline void check_cpu_trainable(const Config& c, bool no_gpu) {
    if (c.preset == "p1" || c.preset == "p2")
        throw ConfigError(std::string(no_gpu ? "no GPU found, and the CPU reference" : "--device cpu") +
                          " trains tiny models: use --preset tiny or small (preset " + c.preset +
                          " needs a GPU)");
}

}  // namespace lmoe
