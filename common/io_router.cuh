// The IO-aware router (SPEC §4): logits, running top-k and gates in one kernel, so the
// (rows × E) logit matrix never reaches global memory; and its backward, which touches only the
// k chosen columns. Used per latent head by Multi-Head LatentMoE (rows = sub-tokens, D = dh) and
// once by the MoE baseline (H = 1, rows = tokens, D = d).
//
// Layout: x is (M, ld) floatX and head h's rows are x[t, h·D : (h+1)·D]; R is (H, D, E) floatX;
// bias (H, E) fp32; sel and gate are (H, M, k), chosen experts in descending order of s + b.
#pragma once
#include "cuda_utils.cuh"

namespace lmoe {

constexpr int kMaxTopK = 32;            // one lane per chosen expert
constexpr int kMaxRouterExperts = 256;  // 8 logits per lane

// Warp argmax of (score, expert): the larger score wins, equal scores go to the lower expert index
// (SPEC's tie rule). Carries the winner's unbiased logit along.
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

    unsigned taken = 0;  // bit q: expert lane + 32q already chosen
    int my_expert = 0;
    float my_logit = -INFINITY;
    for (int j = 0; j < k; j++) {
        float best = -INFINITY, best_logit = 0.f;
        int best_e = INT_MAX;
#pragma unroll
        for (int q = 0; q < PER_LANE; q++) {  // this lane's best; e grows with q, so ties keep the lower
            int e = lane + 32 * q;
            if (e >= E || (taken >> q & 1u)) continue;
            float score = s[q] + bh[e];
            if (best_e == INT_MAX || score > best) {
                best = score;
                best_e = e;
                best_logit = s[q];
            }
        }
        warp_argmax(best, best_e, best_logit);
        if (best_e % 32 == lane) taken |= 1u << (best_e / 32);
        if (lane == j) {
            my_expert = best_e;
            my_logit = best_logit;
        }
    }
    float mx = my_logit;  // lanes ≥ k hold -inf
    for (int offset = 16; offset > 0; offset >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, offset));
    float ex = lane < k ? expf(my_logit - mx) : 0.f, sum = ex;
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (lane < k) {
        sel[warp * k + lane] = my_expert;
        gate[warp * k + lane] = ex / sum;
    }
}

inline void router_forward(int* sel, float* gate, const floatX* x, int64_t ld, const floatX* R, const float* bias,
                           int M, int H, int D, int E, int k, cudaStream_t stream) {
    const int threads = 256, warps = threads / 32;
    const unsigned blocks = (unsigned)ceil_div((int64_t)H * M, warps);
    const int per_lane = (int)ceil_div(E, 32);
    if (per_lane <= 1) router_forward_kernel<1><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    else if (per_lane <= 2) router_forward_kernel<2><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    else if (per_lane <= 4) router_forward_kernel<4><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    else router_forward_kernel<8><<<blocks, threads, 0, stream>>>(sel, gate, x, ld, R, bias, M, H, D, E, k);
    CUDA_CHECK_LAUNCH();
}

// Router weight gradient, one block per (head, expert) group, touching only the rows that chose
// the expert: dR_h[:, e] += Σ_{copies p of group (h, e)} x[row(p)] · ds[p], summed in copy order
// (the grouped order of SPEC §4, so no two blocks write the same column and no atomics are needed).
__global__ void router_weight_backward_kernel(float* dR, const floatX* x, int64_t ld, const float* ds_copy,
                                              const int* copy_row, const int* group_offset, int D, int E) {
    const int g = blockIdx.x, h = g / E, e = g % E;
    const int first = group_offset[g], last = group_offset[g + 1];
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float acc = 0.f;
        for (int p = first; p < last; p++) acc += to_float(x[copy_row[p] * ld + (int64_t)h * D + i]) * ds_copy[p];
        dR[((int64_t)h * D + i) * E + e] += acc;
    }
}

inline void router_weight_backward(float* dR, const floatX* x, int64_t ld, const float* ds_copy, const int* copy_row,
                                   const int* group_offset, int H, int D, int E, cudaStream_t stream) {
    router_weight_backward_kernel<<<H * E, 128, 0, stream>>>(dR, x, ld, ds_copy, copy_row, group_offset, D, E);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Aux-loss-free load balancing (SPEC §2.3). Each (layer, head) group of E experts is one warp-sized
// job: load_e = count_e / Σ count;  b += γ · (sign(1/E − load_e) − mean_e sign(1/E − load_e)).
// The sign is taken exactly, in integers; the mean is summed in a fixed order.

// counts (groups, E) += the sizes of the (head, expert) groups of one plan: group_offset (G + 1).
__global__ void add_group_sizes_kernel(int* counts, const int* group_offset, int G) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g < G) counts[g] += group_offset[g + 1] - group_offset[g];
}

inline void add_group_sizes(int* counts, const int* group_offset, int G, cudaStream_t stream) {
    add_group_sizes_kernel<<<(unsigned)ceil_div(G, 256), 256, 0, stream>>>(counts, group_offset, G);
    CUDA_CHECK_LAUNCH();
}

__global__ void update_routing_bias_kernel(float* bias, const int* counts, int groups, int E, float gamma) {
    const int group = blockIdx.x;
    if (group >= groups || threadIdx.x != 0) return;
    const int* c = counts + (int64_t)group * E;
    float* b = bias + (int64_t)group * E;
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += c[e];
    if (total == 0) return;
    float mean_sign = 0.f;
    for (int e = 0; e < E; e++) {
        const int64_t gap = total - (int64_t)E * c[e];
        mean_sign += (float)((gap > 0) - (gap < 0));
    }
    mean_sign /= E;
    for (int e = 0; e < E; e++) {
        const int64_t gap = total - (int64_t)E * c[e];
        b[e] += gamma * ((float)((gap > 0) - (gap < 0)) - mean_sign);
    }
}

inline void update_routing_bias(float* bias, const int* counts, int groups, int E, float gamma, cudaStream_t stream) {
    if (gamma == 0.f) return;
    update_routing_bias_kernel<<<groups, 32, 0, stream>>>(bias, counts, groups, E, gamma);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
