// The layer benchmark behind --bench-layer (SPEC §6, §9): one FFN layer of either trainer timed on its
// own, so the two methods' routed layers are compared without the dense model around them. Forward +
// backward on B·T random tokens per rank with freshly initialised weights (so a near-uniform random
// routing), median of 20 after 3 warm-ups, each run as a step's first micro-batch (the expert weight
// gradients written, not added to); FLOP rate by the model's own count (recomputation not counted);
// memory = what the layer's weights, gradients, activations and scratch hold on the device.
//
// Under mpirun (R ranks, one GPU each) every run starts with the ranks lined up (MPI_Barrier after the
// stream drained), and each rank also times its exchanges (the all-to-all sections, CUDA events).
// Rank 0 prints each rank's medians and the split: exchange = the ranks' exchange time, of which the
// least (the rank that arrived last, so waited least) is the transfer and the rest that rank's wait;
// compute = the layer's time less its exchanges; bytes are what each rank sent to the others per run
// (rows and count tables), GB/s that over the transfer time.
#pragma once
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "model/config.h"
#include "model/params.h"
#include "parallel/comm.cuh"
#include "train/gpu_memory.cuh"
#include "train/gpu_model.cuh"
#include "util/cuda_utils.cuh"
#include "util/rng.h"
#include "util/step_profile.cuh"

namespace lmoe {

inline float median_of(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

template <class Ffn>
int bench_ffn_layer(const Config& config, const Comm& comm) {
    Config c = config;
    c.L = 1;
    const int N = c.B * c.T, reps = 20, R = comm.world;
    const bool lead = comm.rank == 0;
    const int64_t free_before = device_free_bytes();
    const ParamLayout layout = build_param_layout(c, comm.rank, R);
    std::vector<float> host(layout.total);
    init_params(host.data(), layout, c.seed);
    DeviceBuffer<float> master(layout.total), grads(layout.total), bias((size_t)c.H * c.E);
    master.upload(host);
    DeviceBuffer<floatX> params(layout.total), x((size_t)N * c.d), dout((size_t)N * c.d), out((size_t)N * c.d),
        dx((size_t)N * c.d);
    Ctx ctx;
    CUDA_CHECK(cudaStreamCreate(&ctx.stream));
    ctx.cublas = make_cublas_handle();
    ctx.comm = &comm;
    ctx.accumulate_expert_grads = false;  // every run as the first (at --grad-accum 1 the only) micro-batch
    StepProfile profile(ctx.stream);
    if (!comm.single()) ctx.profile = &profile;
    copy_master_to_param(params.get(), master.get(), layout.total, ctx.stream);
    lmoe::Rng rng(c.seed + 7919 * comm.rank);  // each rank its own tokens
    std::vector<floatX> xs((size_t)N * c.d);
    for (auto& v : xs) v = from_float<floatX>((float)rng.normal());
    x.upload(xs);
    for (auto& v : xs) v = from_float<floatX>((float)(0.01 * rng.normal()));
    dout.upload(xs);
    CUDA_CHECK(cudaMemset(bias.get(), 0, bias.size() * sizeof(float)));
    CUDA_CHECK(cudaMemset(grads.get(), 0, grads.size() * sizeof(float)));
    const Layer w = bind_tensors(layout, params.get(), 1, c.ffn).layers[0];
    const GradLayer g = bind_tensors(layout, grads.get(), 1, c.ffn).layers[0];
    Ffn ffn(c, N, comm);
    CUDA_CHECK(cudaDeviceSynchronize());
    const int64_t free_after = device_free_bytes();
    cudaEvent_t start, mid, stop;
    CUDA_CHECK(cudaEventCreate(&start)); CUDA_CHECK(cudaEventCreate(&mid)); CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> fwd, all, exchange;
    int64_t bytes = 0;
    for (int rep = -3; rep < reps; rep++) {
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        if (!comm.single()) MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
        CUDA_CHECK(cudaEventRecord(start, ctx.stream));
        ffn.forward(0, out.get(), x.get(), w, bias.get(), ctx);
        CUDA_CHECK(cudaEventRecord(mid, ctx.stream));
        ffn.backward(0, dx.get(), dout.get(), x.get(), w, g, ctx);
        CUDA_CHECK(cudaEventRecord(stop, ctx.stream));
        CUDA_CHECK(cudaEventSynchronize(stop));
        const double exchange_ms = profile.take()[(int)Section::AllToAll];
        bytes = ffn.take_bytes_sent(ctx.stream);
        if (rep < 0) continue;
        float a, b;
        CUDA_CHECK(cudaEventElapsedTime(&a, start, mid));
        CUDA_CHECK(cudaEventElapsedTime(&b, start, stop));
        fwd.push_back(a);
        all.push_back(b);
        exchange.push_back((float)exchange_ms);
    }
    const float fwd_ms = median_of(fwd), ms = median_of(all), exchange_ms = median_of(exchange);
    const double flops = 6.0 * N * Ffn::forward_macs_per_token(c);
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const double gib = (free_before - free_after) / kGiB;
    if (comm.single()) {
        std::printf("layer bench | %s | %s | N %d tokens | forward %.3f ms | forward+backward %.3f ms | %.1f TFLOP/s | "
                    "%.2f GiB on the device\n",
                    prop.name, ffn_name(c.ffn), N, fwd_ms, ms, flops / (ms * 1e-3) / 1e12, gib);
    } else {
        const double mine[5] = {fwd_ms, ms, exchange_ms, (double)bytes, gib};
        std::vector<double> every(5 * (size_t)R);
        MPI_CHECK(MPI_Gather(mine, 5, MPI_DOUBLE, every.data(), 5, MPI_DOUBLE, 0, MPI_COMM_WORLD));
        if (lead) {
            double transfer = every[2];
            for (int r = 0; r < R; r++) transfer = std::min(transfer, every[5 * r + 2]);
            for (int r = 0; r < R; r++) {
                const double* e = &every[5 * (size_t)r];
                std::printf("layer bench | %s | %s | R %d rank %d | N %d tokens | forward %.3f ms | forward+backward "
                            "%.3f ms | compute %.3f ms | exchange %.3f ms (transfer %.3f, wait %.3f) | sent %.1f MiB "
                            "(%.0f GB/s) | %.2f GiB on the device\n",
                            prop.name, ffn_name(c.ffn), R, r, N, e[0], e[1], e[1] - e[2], e[2], transfer,
                            e[2] - transfer, e[3] / (1 << 20), e[3] / (transfer * 1e-3) / 1e9, e[4]);
            }
        }
    }
    CUDA_CHECK(cudaEventDestroy(start)); CUDA_CHECK(cudaEventDestroy(mid)); CUDA_CHECK(cudaEventDestroy(stop));
    cublasDestroy(ctx.cublas);
    cudaStreamDestroy(ctx.stream);
    return 0;
}

}  // namespace lmoe
