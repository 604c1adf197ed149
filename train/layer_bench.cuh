// The layer benchmark behind --bench-layer (SPEC §6, §9): one FFN layer of either trainer timed on its
// own, so the two methods' routed layers are compared without the dense model around them. Forward +
// backward on B·T random tokens with freshly initialised weights, median of 20 after 3 warm-ups, each
// run as a step's first micro-batch (the expert weight gradients written, not added to); FLOP
// rate by the model's own count (recomputation not counted); memory = what the layer's weights,
// gradients, activations and scratch hold on the device. One GPU.
#pragma once
#include <cuda_runtime.h>

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

namespace lmoe {

template <class Ffn>
int bench_ffn_layer(const Config& config) {
    Config c = config;
    c.L = 1;
    const int N = c.B * c.T, reps = 20;
    const int64_t free_before = device_free_bytes();
    const ParamLayout layout = build_param_layout(c);
    std::vector<float> host(layout.total);
    init_params(host.data(), layout, c.seed);
    DeviceBuffer<float> master(layout.total), grads(layout.total), bias((size_t)c.H * c.E);
    master.upload(host);
    DeviceBuffer<floatX> params(layout.total), x((size_t)N * c.d), dout((size_t)N * c.d), out((size_t)N * c.d),
        dx((size_t)N * c.d);
    const Comm one_rank;
    Ctx ctx;
    CUDA_CHECK(cudaStreamCreate(&ctx.stream));
    ctx.cublas = make_cublas_handle();
    ctx.comm = &one_rank;
    ctx.accumulate_expert_grads = false;  // every run as the first (at --grad-accum 1 the only) micro-batch
    copy_master_to_param(params.get(), master.get(), layout.total, ctx.stream);
    lmoe::Rng rng(c.seed);
    std::vector<floatX> xs((size_t)N * c.d);
    for (auto& v : xs) v = from_float<floatX>((float)rng.normal());
    x.upload(xs);
    for (auto& v : xs) v = from_float<floatX>((float)(0.01 * rng.normal()));
    dout.upload(xs);
    CUDA_CHECK(cudaMemset(bias.get(), 0, bias.size() * sizeof(float)));
    CUDA_CHECK(cudaMemset(grads.get(), 0, grads.size() * sizeof(float)));
    const Layer w = bind_tensors(layout, params.get(), 1, c.ffn).layers[0];
    const GradLayer g = bind_tensors(layout, grads.get(), 1, c.ffn).layers[0];
    Ffn ffn(c, N, Comm{});
    CUDA_CHECK(cudaDeviceSynchronize());
    const int64_t free_after = device_free_bytes();
    cudaEvent_t start, mid, stop;
    CUDA_CHECK(cudaEventCreate(&start)); CUDA_CHECK(cudaEventCreate(&mid)); CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> fwd, all;
    for (int rep = -3; rep < reps; rep++) {
        CUDA_CHECK(cudaEventRecord(start, ctx.stream));
        ffn.forward(0, out.get(), x.get(), w, bias.get(), ctx);
        CUDA_CHECK(cudaEventRecord(mid, ctx.stream));
        ffn.backward(0, dx.get(), dout.get(), x.get(), w, g, ctx);
        CUDA_CHECK(cudaEventRecord(stop, ctx.stream));
        CUDA_CHECK(cudaEventSynchronize(stop));
        if (rep < 0) continue;
        float a, b;
        CUDA_CHECK(cudaEventElapsedTime(&a, start, mid));
        CUDA_CHECK(cudaEventElapsedTime(&b, start, stop));
        fwd.push_back(a);
        all.push_back(b);
    }
    std::sort(fwd.begin(), fwd.end());
    std::sort(all.begin(), all.end());
    const double flops = 6.0 * N * Ffn::forward_macs_per_token(c), ms = all[reps / 2];
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("layer bench | %s | %s | N %d tokens | forward %.3f ms | forward+backward %.3f ms | %.1f TFLOP/s | "
                "%.2f GiB on the device\n",
                prop.name, ffn_name(c.ffn), N, fwd[reps / 2], ms, flops / (ms * 1e-3) / 1e12,
                (free_before - free_after) / kGiB);
    CUDA_CHECK(cudaEventDestroy(start)); CUDA_CHECK(cudaEventDestroy(mid)); CUDA_CHECK(cudaEventDestroy(stop));
    cublasDestroy(ctx.cublas);
    cudaStreamDestroy(ctx.stream);
    return 0;
}

}  // namespace lmoe
