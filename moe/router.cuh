// The IO-aware router (SPEC §4): logits, running top-k and gates in one kernel, so the
// (rows × E) logit matrix never reaches global memory; and its backward, which touches only the
// k chosen columns. Used per latent head by Multi-Head LatentMoE (rows = sub-tokens, D = dh) and
// once by the MoE baseline (H = 1, rows = tokens, D = d).
//
// Layout: x is (M, ld) floatX and head h's rows are x[t, h·D : (h+1)·D]; R is (H, D, E) floatX;
// bias (H, E) fp32; sel and gate are (H, M, k), chosen experts in descending order of s + b.
#pragma once
#include "moe/routing_plan.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

constexpr int kMaxTopK = 32;            // one lane per chosen expert
constexpr int kMaxRouterExperts = 256;  // 8 logits per lane

// Warp argmax of (score, expert): the larger score wins, equal scores go to the lower expert index
// (SPEC's tie rule). Carries the winner's value (the top-k router's unbiased logit) along.
__device__ inline void warp_argmax(float& score, int& expert, float& logit) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float s2 = __shfl_xor_sync(0xffffffff, score, offset);
        int e2 = __shfl_xor_sync(0xffffffff, expert, offset);
        float l2 = __shfl_xor_sync(0xffffffff, logit, offset);
        if (s2 > score || (s2 == score && e2 < expert)) {
            score = s2;
            expert = e2;
            logit = l2;
        }
    }
}

// k rounds of a warp argmax over the scores lane l holds for experts l + 32q (q < PER_LANE, experts
// past E ignored), each round skipping the experts already chosen: lane j < k ends with the j-th choice
// and its `value`, in descending order of score; lanes >= k with -inf. A NaN score (diverged weights)
// ranks last, so every lane still picks a real expert.
template <int PER_LANE>
__device__ inline void warp_topk(const float (&score)[PER_LANE], const float (&value)[PER_LANE], int E, int k,
                                 int& my_expert, float& my_value) {
    const int lane = threadIdx.x % 32;
    unsigned taken = 0;  // bit q: expert lane + 32q already chosen
    my_expert = 0;
    my_value = -INFINITY;
    for (int j = 0; j < k; j++) {
        float best = -INFINITY, best_value = 0.f;
        int best_e = INT_MAX;
#pragma unroll
        for (int q = 0; q < PER_LANE; q++) {  // this lane's best; e grows with q, so ties keep the lower
            int e = lane + 32 * q;
            if (e >= E || (taken >> q & 1u)) continue;
            float sc = score[q];
            if (sc != sc) sc = -INFINITY;
            if (best_e == INT_MAX || sc > best) {
                best = sc;
                best_e = e;
                best_value = value[q];
            }
        }
        warp_argmax(best, best_e, best_value);
        if (best_e % 32 == lane) taken |= 1u << (best_e / 32);
        if (lane == j) {
            my_expert = best_e;
            my_value = best_value;
        }
    }
}

// One warp per (head, row). Lane l holds the logits of experts l, l+32, ... in registers:
//   s[e] = Σ_i x[i] R[i, e]        (fp32)
//   S    = top-k of s + b          (k rounds of a warp argmax, ties to the lower index)
//   w    = softmax over S of s     (lane j holds the j-th choice)
template <int PER_LANE>
__global__ void router_forward_kernel(int* sel, float* gate, const floatX* x, int64_t ld, const floatX* R,
                                      const float* bias, int M, int H, int D, int E, int k) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (warp >= (int64_t)H * M) return;
    const int h = (int)(warp / M), t = (int)(warp % M);
    const floatX* row = x + t * ld + (int64_t)h * D;
    const floatX* Rh = R + (int64_t)h * D * E;
    const float* bh = bias + (int64_t)h * E;

    float s[PER_LANE];
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) s[q] = 0.f;
    for (int i0 = 0; i0 < D; i0 += 32) {
        float xv = i0 + lane < D ? to_float(row[i0 + lane]) : 0.f;  // 32 inputs, one per lane
        const int n = min(32, D - i0);
        for (int ii = 0; ii < n; ii++) {
            float xi = __shfl_sync(0xffffffff, xv, ii);
            const floatX* Ri = Rh + (int64_t)(i0 + ii) * E;
#pragma unroll
            for (int q = 0; q < PER_LANE; q++) {
                int e = lane + 32 * q;
                if (e < E) s[q] += xi * to_float(Ri[e]);
            }
        }
    }

    float score[PER_LANE];
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) score[q] = lane + 32 * q < E ? s[q] + bh[lane + 32 * q] : 0.f;
    int my_expert;
    float my_logit;
    warp_topk(score, s, E, k, my_expert, my_logit);
    float mx = my_logit;  // lanes ≥ k hold -inf
    for (int offset = 16; offset > 0; offset >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, offset));
    float ex = lane < k ? expf(my_logit - mx) : 0.f, sum = ex;
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (lane < k) {
        sel[warp * k + lane] = my_expert;
        gate[warp * k + lane] = ex / sum;
    }
}

// plan.sel, plan.gate (H, M, k) from x (M, ld); the rest of the plan is group_copies' work.
inline void router_forward(const RoutingPlan& plan, const floatX* x, int64_t ld, const floatX* R, const float* bias, int D,
                           cudaStream_t stream) {
    const int M = plan.M, H = plan.H, E = plan.E, k = plan.k;
    int* sel = plan.sel;
    float* gate = plan.gate;
    const int threads = 256, warps = threads / 32;
    const unsigned blocks = (unsigned)ceil_div((int64_t)H * M, warps);
    const int per_lane = (int)ceil_div(E, 32);
    if (per_lane <= 1) router_forward_kernel<1><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    else if (per_lane <= 2) router_forward_kernel<2><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    else if (per_lane <= 4) router_forward_kernel<4><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    else router_forward_kernel<8><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    CUDA_CHECK_LAUNCH();
}

// Router weight gradient (SPEC §4: only the chosen columns): for each (head, expert) group g = (h, e)
//   dR_h[:, e] += Σ_{copies p of g} x[row(p)] · ds[p]
// A group's copies are cut into kRouterGradParts equal parts and the D columns into chunks of
// kRouterGradCols, one block per (chunk, group, part), so a crowded expert (early in training every
// token may pick the same k experts) is spread over many blocks instead of walking its copies in
// one. Warp w sums the part's copies w, w + 8, ... (two columns per lane), the warps are combined in
// order, and the part's sum goes to a scratch slot; router_grad_reduce_kernel adds the parts in
// order. Fixed orders throughout: bitwise reproducible, no atomics.
constexpr int kRouterGradParts = 8, kRouterGradCols = 64, kRouterGradWarps = 8;

// Scratch floats router_weight_backward needs for G groups of D columns.
inline size_t router_grad_scratch_size(int G, int D) { return (size_t)G * kRouterGradParts * D; }

// parts (G, kRouterGradParts, D): each part's sum.
__global__ void __launch_bounds__(kRouterGradWarps * 32)
    router_grad_parts_kernel(float* parts, const floatX* x, int64_t ld, const float* ds_copy, const int* copy_row,
                             const int* group_offset, int D, int E) {
    const int c0 = blockIdx.x * kRouterGradCols, g = blockIdx.y, part = blockIdx.z, h = g / E;
    const int first = group_offset[g], n = group_offset[g + 1] - first;
    const int begin = first + (int)((int64_t)n * part / kRouterGradParts);
    const int end = first + (int)((int64_t)n * (part + 1) / kRouterGradParts);
    const int warp = threadIdx.x / 32, col = c0 + 2 * (threadIdx.x % 32);  // D is even: col + 1 < D too
    float a0 = 0.f, a1 = 0.f;
    if (col < D) {
#pragma unroll 4
        for (int p = begin + warp; p < end; p += kRouterGradWarps) {
            const floatX* xr = x + copy_row[p] * ld + (int64_t)h * D + col;
            a0 += to_float(xr[0]) * ds_copy[p];
            a1 += to_float(xr[1]) * ds_copy[p];
        }
    }
    __shared__ float sums[kRouterGradWarps][kRouterGradCols];
    sums[warp][2 * (threadIdx.x % 32)] = a0;
    sums[warp][2 * (threadIdx.x % 32) + 1] = a1;
    __syncthreads();
    if (threadIdx.x >= kRouterGradCols || c0 + (int)threadIdx.x >= D) return;
    float total = 0.f;
    for (int w = 0; w < kRouterGradWarps; w++) total += sums[w][threadIdx.x];
    parts[((int64_t)g * kRouterGradParts + part) * D + c0 + threadIdx.x] = total;
}

// dR (H, D, E) += Σ over parts, in order; one thread per element of dR.
__global__ void router_grad_reduce_kernel(float* dR, const float* parts, int H, int D, int E) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)H * D * E) return;
    const int e = (int)(i % E), col = (int)(i / E % D), h = (int)(i / ((int64_t)E * D));
    const float* p = parts + ((int64_t)(h * E + e) * kRouterGradParts) * D + col;
    float total = 0.f;
    for (int part = 0; part < kRouterGradParts; part++) total += p[(int64_t)part * D];
    dR[i] += total;
}

// dR (H, D, E) fp32, accumulated; scratch: router_grad_scratch_size(H·E, D) floats. D must be even.
inline void router_weight_backward(float* dR, float* scratch, const floatX* x, int64_t ld, const float* ds_copy,
                                   const RoutingPlan& plan, int D, cudaStream_t stream) {
    const int H = plan.H, E = plan.E;
    const int* copy_row = plan.copy_row;
    const int* group_offset = plan.group_offset;
    const dim3 grid((unsigned)ceil_div(D, kRouterGradCols), H * E, kRouterGradParts);
    router_grad_parts_kernel<<<grid, kRouterGradWarps * 32, 0, stream>>>(scratch, x, ld, ds_copy, copy_row,
                                                                         group_offset, D, E);
    CUDA_CHECK_LAUNCH();
    router_grad_reduce_kernel<<<(unsigned)ceil_div((int64_t)H * D * E, 256), 256, 0, stream>>>(dR, scratch, H, D, E);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
