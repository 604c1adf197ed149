// Global gradient-norm clipping (SPEC §2.4), split in two so that multi-GPU code can all-reduce the
// squared norm in between: global_norm_squared (on this rank's gradients), then clip_scale (on the
// total). AdamW multiplies every gradient by the scale, so the gradients themselves are never rewritten.
// Deterministic: a grid that depends only on n, fixed per-thread subsets, fixed-order trees, no atomics.
#pragma once
#include <algorithm>
#include <cstdint>

#include "util/cuda_utils.cuh"

namespace lmoe {

namespace global_norm_detail {

constexpr int kThreads = 512;
// At most this many per-block partial sums (the scratch size). A fixed cap rather than the SM count,
// so that the summation order, and hence the result, is the same on every GPU.
constexpr int kMaxBlocks = 2048;

template <int W>
struct alignas(4 * W) FloatVec {
    float v[W];
};

// Σ x over the block in a fixed order (warp butterflies, then warp 0 over the warps); valid in thread 0.
// blockDim.x must be a multiple of 32.
__device__ inline double block_sum(double x) {
    __shared__ double per_warp[32];
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
    if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = x;
    __syncthreads();
    x = threadIdx.x < blockDim.x / 32 ? per_warp[threadIdx.x] : 0.0;
    if (threadIdx.x < 32)
        for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
    return x;
}

inline int partial_blocks(int64_t n) {
    return (int)std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, ceil_div(n, kThreads)));
}

}  // namespace global_norm_detail

// Floats of scratch global_norm_squared needs.
inline size_t global_norm_scratch_size() { return global_norm_detail::kMaxBlocks; }

// partials[b] = Σ grads[i]² over block b's share: each thread adds its grid-stride subset in fp32
// (W at a time; W = 4 is a 16-byte load), the block adds its threads' sums in double.
// A thread sums only ~n / 10^6 squares (~100 at n = 10^8), all positive, so fp32 loses nothing
// measurable there; the cross-thread sums, over up to 10^6 terms, are done in double and each block's
// partial rounded once to fp32 (measured: 8e-9 relative to ref::clip_grad_norm at n = 10^8).
template <int W>
__global__ void __launch_bounds__(global_norm_detail::kThreads)
    norm_squared_partials_kernel(float* partials, const float* grads, int64_t n) {
    using Vec = global_norm_detail::FloatVec<W>;
    const int64_t n_vec = n / W, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    float sum = 0.f;
    for (int64_t i = tid; i < n_vec; i += stride) {
        Vec g = reinterpret_cast<const Vec*>(grads)[i];
        for (int k = 0; k < W; k++) sum += g.v[k] * g.v[k];
    }
    const int64_t tail = n_vec * W + tid;  // the n % W leftovers, one per thread of the first block
    if (tail < n) sum += grads[tail] * grads[tail];
    const double block = global_norm_detail::block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = (float)block;
}

// out[0] = Σ partials[0 .. count), one block, in a fixed order, accumulated in double.
__global__ void __launch_bounds__(global_norm_detail::kThreads)
    norm_squared_sum_partials_kernel(float* out, const float* partials, int count) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
    sum = global_norm_detail::block_sum(sum);
    if (threadIdx.x == 0) out[0] = (float)sum;
}

// out: 1 float, Σ grads[i]² over grads (n,) fp32. scratch: global_norm_scratch_size() floats.
// Any alignment works; a 16-byte aligned grads gets vectorised loads.
inline void global_norm_squared(float* out, const float* grads, int64_t n, float* scratch, cudaStream_t stream) {
    using namespace global_norm_detail;
    const bool vectorised = reinterpret_cast<uintptr_t>(grads) % 16 == 0;
    const int blocks = partial_blocks(vectorised ? n / 4 : n);
    if (vectorised)
        norm_squared_partials_kernel<4><<<blocks, kThreads, 0, stream>>>(scratch, grads, n);
    else
        norm_squared_partials_kernel<1><<<blocks, kThreads, 0, stream>>>(scratch, grads, n);
    CUDA_CHECK_LAUNCH();
    norm_squared_sum_partials_kernel<<<1, kThreads, 0, stream>>>(out, scratch, blocks);
    CUDA_CHECK_LAUNCH();
}

// norm = √(Σ_i norm²_i) over `parts` partial sums (summed in order: e.g. the replicated gradients'
// and the sharded ones');  scale = clip / norm if clip > 0 and norm > clip, else 1.
__global__ void clip_scale_kernel(float* scale_out, float* norm_out, const float* norm_squared, int parts, float clip) {
    float total = 0.f;
    for (int i = 0; i < parts; i++) total += norm_squared[i];
    const float norm = sqrtf(total);
    norm_out[0] = norm;
    scale_out[0] = (clip > 0.f && norm > clip) ? clip / norm : 1.f;
}

// scale_out, norm_out: 1 float each; norm_squared: `parts` floats; all on the device (no host round trip).
inline void clip_scale(float* scale_out, float* norm_out, const float* norm_squared, float clip, cudaStream_t stream,
                       int parts = 1) {
    clip_scale_kernel<<<1, 1, 0, stream>>>(scale_out, norm_out, norm_squared, parts, clip);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
