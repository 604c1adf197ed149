// The LM head's loss (SPEC §2): softmax over the vocabulary fused with cross-entropy and its gradient,
// as in llm.c's fused classifier. Logits are (N, Vp) floatX with the vocabulary padded from V up to Vp
// (a multiple of 128); the padded columns never count and get a zero gradient. The gradient overwrites
// the logits in place, so the (N, Vp) probabilities are never stored.
#pragma once
#include <cstdint>

#include "util/cuda_utils.cuh"

namespace lmoe {

namespace cross_entropy_detail {

// Running softmax statistics of a set of logits: their max and Σ exp(z − max).
// An empty set is (−inf, 0).
struct SoftmaxStats {
    float max;
    float sum;
};

// Stats of the union of two disjoint sets; exp(−inf − M) is taken as 0 so empty sets merge cleanly.
__device__ inline SoftmaxStats combine(SoftmaxStats a, SoftmaxStats b) {
    float m = fmaxf(a.max, b.max);
    float sa = a.max == -INFINITY ? 0.f : a.sum * expf(a.max - m);
    float sb = b.max == -INFINITY ? 0.f : b.sum * expf(b.max - m);
    return {m, sa + sb};
}

// Combines every thread's stats in a fixed order (warp butterflies, then warp 0 over the warps) and
// returns the block's stats to all threads. blockDim.x must be a multiple of 32.
__device__ inline SoftmaxStats block_combine(SoftmaxStats s) {
    __shared__ SoftmaxStats per_warp[32];
    __shared__ SoftmaxStats total;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int offset = 16; offset > 0; offset /= 2)
        s = combine(s, {__shfl_xor_sync(0xffffffff, s.max, offset), __shfl_xor_sync(0xffffffff, s.sum, offset)});
    if (lane == 0) per_warp[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < warps ? per_warp[lane] : SoftmaxStats{-INFINITY, 0.f};
        for (int offset = 16; offset > 0; offset /= 2)
            s = combine(s, {__shfl_xor_sync(0xffffffff, s.max, offset), __shfl_xor_sync(0xffffffff, s.sum, offset)});
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

constexpr int kThreads = 512;  // per row; 4 rows in flight per SM hide one row's reduction barrier

}  // namespace cross_entropy_detail

// One block per token row t, z = logits[t, :V]:
//   loss_t = logsumexp(z) − z[target_t]              (max and Σ exp in fp32, online in one read pass)
//   dlogits[t, v] = (softmax(z)_v − [v = target_t]) · dloss / N   for v < V;  0 for V ≤ v < Vp
// The first pass walks the row backwards so that its start is still in cache when the second pass
// (forward) re-reads it to write the gradient. It runs somewhat slower than a plain copy of the same
// bytes (docs/perf/single_gpu.md); staging the row in shared memory or using 256 or 1024 threads per
// row measured no faster.
__global__ void __launch_bounds__(cross_entropy_detail::kThreads)
    cross_entropy_forward_backward_kernel(floatX* logits, float* losses, const int* targets, int N, int V, int Vp,
                                          float dloss, bool write_grad) {
    using namespace cross_entropy_detail;
    const int t = blockIdx.x;
    floatX* row = logits + (int64_t)t * Vp;  // (Vp,) logits in; dlogits out
    const Pack* packs = reinterpret_cast<const Pack*>(row);
    const int n_packs = Vp / kPack, target = targets[t];
    // Read before the barriers in block_combine: after them other threads may overwrite this logit.
    const float z_target = threadIdx.x == 0 ? to_float(row[target]) : 0.f;

    SoftmaxStats s{-INFINITY, 0.f};
    for (int p = n_packs - 1 - (int)threadIdx.x; p >= 0; p -= blockDim.x) {
        const int v0 = p * kPack;
        if (v0 >= V) continue;  // wholly padding
        Pack z = packs[p];
        float pack_max = -INFINITY;
        for (int k = 0; k < kPack; k++)
            if (v0 + k < V) pack_max = fmaxf(pack_max, to_float(z.v[k]));
        if (pack_max > s.max) {
            s.sum *= expf(s.max - pack_max);  // 0 · exp(−inf) = 0 for the first pack
            s.max = pack_max;
        }
        for (int k = 0; k < kPack; k++)
            if (v0 + k < V) s.sum += expf(to_float(z.v[k]) - s.max);
    }
    s = block_combine(s);
    if (threadIdx.x == 0) losses[t] = logf(s.sum) + s.max - z_target;
    if (!write_grad) return;

    const float inv_sum = 1.f / s.sum, scale = dloss / N;
    Pack* grad_packs = reinterpret_cast<Pack*>(row);
    for (int p = threadIdx.x; p < n_packs; p += blockDim.x) {
        const int v0 = p * kPack;
        Pack z = packs[p], g;
        for (int k = 0; k < kPack; k++) {
            const int v = v0 + k;
            float prob = v < V ? expf(to_float(z.v[k]) - s.max) * inv_sum : 0.f;
            float d = v < V ? (prob - (v == target ? 1.f : 0.f)) * scale : 0.f;
            g.v[k] = from_float<floatX>(d);
        }
        grad_packs[p] = g;
    }
}

// logits: (N, Vp) floatX, in: logits; out: dlogits when write_grad (else unchanged).
// losses: (N,) fp32 per-token loss. targets: (N,) in [0, V) (the data loader guarantees it).
// dloss = d(total loss)/d(mean loss over these N tokens), e.g. 1/grad_accum.
inline void cross_entropy_forward_backward(floatX* logits, float* losses, const int* targets, int N, int V, int Vp,
                                           float dloss, bool write_grad, cudaStream_t stream) {
    if (Vp % 128 != 0 || V < 1 || V > Vp)
        die("argument", "need 1 <= V <= Vp with Vp a multiple of 128", "cross_entropy_forward_backward", __FILE__,
            __LINE__);
    if (N == 0) return;
    cross_entropy_forward_backward_kernel<<<N, cross_entropy_detail::kThreads, 0, stream>>>(
        logits, losses, targets, N, V, Vp, dloss, write_grad);
    CUDA_CHECK_LAUNCH();
}

// out[0] = (1/N) Σ_t losses[t]: one block, each thread summing a fixed strided subset, then a fixed-order
// tree, so the result is the same bits every run.
__global__ void __launch_bounds__(1024) mean_loss_kernel(float* out, const float* losses, int N) {
    __shared__ float per_warp[32];
    float sum = 0.f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) sum += losses[i];
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        sum = threadIdx.x < blockDim.x / 32 ? per_warp[threadIdx.x] : 0.f;
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
        if (threadIdx.x == 0) out[0] = sum / N;
    }
}

// out: 1 float, the mean of losses (N,) fp32.
inline void mean_loss(float* out, const float* losses, int N, cudaStream_t stream) {
    mean_loss_kernel<<<1, 1024, 0, stream>>>(out, losses, N);
    CUDA_CHECK_LAUNCH();
}

// sum[0] += mean[0] / parts: one micro-batch's share of a step's loss over `parts` micro-batches, added
// on the device so the step reads its loss back once. Added in stream order, so the same bits every run.
__global__ void add_micro_batch_loss_kernel(float* sum, const float* mean, int parts) { sum[0] += mean[0] / parts; }

inline void add_micro_batch_loss(float* sum, const float* mean, int parts, cudaStream_t stream) {
    add_micro_batch_loss_kernel<<<1, 1, 0, stream>>>(sum, mean, parts);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
