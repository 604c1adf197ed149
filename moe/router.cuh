// The IO-aware router (SPEC §4): logits (on tensor cores in the bf16 build), top-k and gates in one
// kernel, so the (rows × E) logit matrix never reaches global memory; and its backward, which touches
// only the k chosen columns. Used per latent head by Multi-Head LatentMoE (rows = sub-tokens, D = dh)
// and once by the MoE baseline (H = 1, rows = tokens, D = d).
//
// Layout: x is (M, ld) floatX and head h's rows are x[t, h·D : (h+1)·D]; R is (H, D, E) floatX;
// bias (H, E) fp32; sel and gate are (H, M, k), chosen experts in descending order of s + b.
#pragma once
#include <algorithm>
#include <type_traits>

#include "moe/rank_networks.h"
#include "moe/routing_plan.cuh"
#include "tc/warp_tile.cuh"
#include "util/cuda_utils.cuh"
#include "util/launch.cuh"

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

// The gates of one (head, row), given the logits lane l holds for experts l + 32q:
//   S = top-k of s + b          (k rounds of a warp argmax, ties to the lower index)
//   w = softmax over S of s     (lane j < k writes the j-th choice to sel[j], gate[j])
template <int PER_LANE>
__device__ inline void route_row(int* sel, float* gate, const float (&s)[PER_LANE], const float* bh, int E, int k) {
    const int lane = threadIdx.x % 32;
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
        sel[lane] = my_expert;
        gate[lane] = ex / sum;
    }
}

// fp32 build (and shapes the tensor-core kernel does not take): one warp per (head, row), lane l
// summing the logits of experts l, l+32, ... in registers: s[e] = Σ_i x[i] R[i, e] (fp32).
template <int PER_LANE>
__global__ void router_forward_kernel(int* sel, float* gate, const floatX* x, int64_t ld, const floatX* R,
                                      const float* bias, int M, int H, int D, int E, int k) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (warp >= (int64_t)H * M) return;
    const int h = (int)(warp / M), t = (int)(warp % M);
    const floatX* row = x + t * ld + (int64_t)h * D;
    const floatX* Rh = R + (int64_t)h * D * E;

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
    route_row(sel + warp * k, gate + warp * k, s, bias + (int64_t)h * E, E, k);
}

// bf16 build: a block of four warps takes kRouterRows rows of one head and multiplies them by R_h on
// tensor cores, kRouterDepth inputs at a time through double-buffered shared memory (X tile [row][i],
// R tile [i][e], both zero-filled past M, D and E); warp w owns rows 16w..16w+15 and all EP = 32·PER_LANE
// (padded) expert columns. The (kRouterRows × EP) fp32 logits then go to shared memory, and two
// threads rank each row: each takes every other run of KB experts (KB, a power of two, at least k),
// sorts the run and keeps the KB best of it and of its list so far, all on sorting networks in
// registers (rank_runs, moe/rank_networks.h); the two lists are then merged across the pair, and the
// first k entries with the softmax of their logits are the row's choices. The logits never reach
// global memory. Needs D, E and ld multiples of 8 (16-byte rows).
constexpr int kRouterRows = 64, kRouterDepth = 64, kRouterThreads = 2 * kRouterRows;

template <int PER_LANE>
struct RouterSmem {
    static constexpr int EP = 32 * PER_LANE, ldx = kRouterDepth + 8, ldr = EP + 8, ldl = EP + 1;
    static constexpr int x_elems = kRouterRows * ldx, r_elems = kRouterDepth * ldr;
    static constexpr size_t staging = 2 * (size_t)(x_elems + r_elems) * sizeof(bf16);
    static constexpr size_t logits = (size_t)kRouterRows * ldl * sizeof(float);
    static constexpr size_t bytes = staging > logits ? staging : logits;  // the logits reuse the staging
};

template <int PER_LANE, int KB>
__global__ void __launch_bounds__(kRouterThreads)
    router_forward_mma_kernel(int* sel, float* gate, const bf16* x, int64_t ld, const bf16* R, const float* bias, int M,
                              int D, int E, int k) {
    using S = RouterSmem<PER_LANE>;
    constexpr int EP = S::EP;
    static_assert(kRouterThreads == 2 * kRouterRows, "two threads rank each row");
    extern __shared__ __align__(16) unsigned char router_smem[];
    bf16* Xs = reinterpret_cast<bf16*>(router_smem);  // 2 × (kRouterRows, kRouterDepth)
    bf16* Rs = Xs + 2 * S::x_elems;                   // 2 × (kRouterDepth, EP)
    const int h = blockIdx.y, r0 = blockIdx.x * kRouterRows, warp = threadIdx.x / 32;
    const bf16* xh = x + (int64_t)h * D;
    const bf16* Rh = R + (int64_t)h * D * E;

    auto load = [&](int chunk, int buf) {  // inputs i0 .. i0 + kRouterDepth of the tile's rows and of R_h
        const int i0 = chunk * kRouterDepth;
        constexpr int xv = kRouterDepth / 8, rv = EP / 8;
        for (int v = threadIdx.x; v < kRouterRows * xv; v += kRouterThreads) {
            const int r = v / xv, i = i0 + 8 * (v % xv);
            const bool valid = r0 + r < M && i < D;
            cp_async_16(Xs + buf * S::x_elems + r * S::ldx + 8 * (v % xv), valid ? xh + (r0 + r) * ld + i : x, valid);
        }
        for (int v = threadIdx.x; v < kRouterDepth * rv; v += kRouterThreads) {
            const int i = v / rv, e = 8 * (v % rv);
            const bool valid = i0 + i < D && e < E;
            cp_async_16(Rs + buf * S::r_elems + i * S::ldr + e, valid ? Rh + (int64_t)(i0 + i) * E + e : R, valid);
        }
        cp_async_commit();
    };

    float acc[1][EP / 8][4] = {};
    const int chunks = (int)ceil_div(D, kRouterDepth);
    load(0, 0);
    for (int c = 0; c < chunks; c++) {
        if (c + 1 < chunks) {
            load(c + 1, (c + 1) % 2);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        warp_mma<kRouterDepth, 1, EP, false, true>(acc, Xs + (c % 2) * S::x_elems, S::ldx, 16 * warp,
                                                   Rs + (c % 2) * S::r_elems, S::ldr, 0);
        __syncthreads();  // the buffer is refilled next round (or, after the last, holds the logits)
    }

    float* logits = reinterpret_cast<float*>(router_smem);  // (kRouterRows, EP)
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
    for (int nt = 0; nt < EP / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            logits[(16 * warp + g + 8 * (i / 2)) * S::ldl + nt * 8 + 2 * q + i % 2] = acc[0][nt][i];
    __syncthreads();

    // Thread 2r + half ranks row r's runs half, half + 2, ..., then the pair merges its two lists.
    const int r = threadIdx.x / 2, half = threadIdx.x % 2;
    const float* row = logits + r * S::ldl;
    float best_s[KB];  // scores s + b of the KB best, ranked
    int best_e[KB];    // their experts
    rank_runs(best_s, best_e, row, bias + (int64_t)h * E, E, half, 2);
    {
        float other_s[KB];
        int other_e[KB];
#pragma unroll
        for (int i = 0; i < KB; i++) {
            other_s[i] = __shfl_xor_sync(0xffffffff, best_s[i], 1);
            other_e[i] = __shfl_xor_sync(0xffffffff, best_e[i], 1);
        }
        keep_best(best_s, best_e, other_s, other_e);
    }
    if (half == 1 || r0 + r >= M) return;
    // The gates: the softmax of the k chosen unbiased logits (real experts all, as k ≤ E).
    float logit[KB], mx = -INFINITY, sum = 0.f;
#pragma unroll
    for (int j = 0; j < KB; j++)
        if (j < k) {
            logit[j] = row[best_e[j]];
            mx = fmaxf(mx, logit[j]);
        }
#pragma unroll
    for (int j = 0; j < KB; j++)
        if (j < k) sum += expf(logit[j] - mx);
    const int64_t slot0 = ((int64_t)h * M + r0 + r) * k;
#pragma unroll
    for (int j = 0; j < KB; j++)
        if (j < k) {
            sel[slot0 + j] = best_e[j];
            gate[slot0 + j] = expf(logit[j] - mx) / sum;
        }
}

template <int PER_LANE, int KB>
void launch_router_forward(const RoutingPlan& plan, const floatX* x, int64_t ld, const floatX* R, const float* bias,
                           int D, cudaStream_t stream) {
    const int M = plan.M, H = plan.H, E = plan.E, k = plan.k;
    if constexpr (std::is_same<floatX, bf16>::value) {
        if (D % 8 == 0 && E % 8 == 0 && ld % 8 == 0) {
            launch_with_smem(router_forward_mma_kernel<PER_LANE, KB>, dim3((unsigned)ceil_div(M, kRouterRows), H),
                             kRouterThreads, RouterSmem<PER_LANE>::bytes, stream, plan.sel, plan.gate, x, ld, R, bias,
                             M, D, E, k);
            return;
        }
    }
    const int threads = 256, warps = threads / 32;
    router_forward_kernel<PER_LANE><<<(unsigned)ceil_div((int64_t)H * M, warps), threads, 0, stream>>>(
        plan.sel, plan.gate, x, ld, R, bias, M, H, D, E, k);
    CUDA_CHECK_LAUNCH();
}

// The tensor-core kernel's list length KB: the smallest of 4, 8, 16, 32 that holds k.
template <int PER_LANE>
void launch_router_forward_k(const RoutingPlan& plan, const floatX* x, int64_t ld, const floatX* R, const float* bias,
                             int D, cudaStream_t stream) {
    if (plan.k > plan.E) die("argument", "k must be at most E", "router_forward", __FILE__, __LINE__);
    if (plan.k <= 4) launch_router_forward<PER_LANE, 4>(plan, x, ld, R, bias, D, stream);
    else if (plan.k <= 8) launch_router_forward<PER_LANE, 8>(plan, x, ld, R, bias, D, stream);
    else if (plan.k <= 16) launch_router_forward<PER_LANE, 16>(plan, x, ld, R, bias, D, stream);
    else launch_router_forward<PER_LANE, 32>(plan, x, ld, R, bias, D, stream);
}

// plan.sel, plan.gate (H, M, k) from x (M, ld); the rest of the plan is group_copies' work.
inline void router_forward(const RoutingPlan& plan, const floatX* x, int64_t ld, const floatX* R, const float* bias, int D,
                           cudaStream_t stream) {
    const int per_lane = (int)ceil_div(plan.E, 32);
    if (per_lane <= 1) launch_router_forward_k<1>(plan, x, ld, R, bias, D, stream);
    else if (per_lane <= 2) launch_router_forward_k<2>(plan, x, ld, R, bias, D, stream);
    else if (per_lane <= 4) launch_router_forward_k<4>(plan, x, ld, R, bias, D, stream);
    else launch_router_forward_k<8>(plan, x, ld, R, bias, D, stream);
}

// Router weight gradient (SPEC §4: only the chosen columns): for each (head, expert) group g = (h, e)
//   dR_h[:, e] += Σ_{copies p of g} x[row(p)] · ds[p]
// A group's copies are cut into router_grad_parts equal parts and the D columns into chunks of
// kRouterGradCols, one block per (chunk, group, part), so a crowded expert (early in training every
// token may pick the same k experts) is spread over many blocks instead of walking its copies in
// one. Warp w sums the part's copies w, w + 8, ... (two columns per lane), the warps are combined in
// order, and the part's sum goes to a scratch slot; router_grad_reduce_kernel adds the parts in
// order. Fixed orders throughout: bitwise reproducible, no atomics.
constexpr int kRouterGradCols = 64, kRouterGradWarps = 8;
// Parts per group: at least 8, and more when there are few groups (one head per rank of Head
// Parallel: G = E), up to kRouterGradBlocks blocks in all — some 60 per SM, so that the groups a crowded
// routing leaves (k of them, holding every copy) still spread over the whole GPU — and at most
// kRouterGradMaxParts (the scratch grows with the parts). A function of the shape only, so the
// summation order never depends on the routing.
constexpr int kRouterGradBlocks = 8192, kRouterGradMinParts = 8, kRouterGradMaxParts = 64;
inline int router_grad_parts(int G, int D) {
    const int64_t blocks_per_part = (int64_t)G * ceil_div(D, kRouterGradCols);
    return (int)std::min<int64_t>(kRouterGradMaxParts,
                                  std::max<int64_t>(kRouterGradMinParts, kRouterGradBlocks / blocks_per_part));
}

// Scratch floats router_weight_backward needs for G groups of D columns.
inline size_t router_grad_scratch_size(int G, int D) { return (size_t)G * router_grad_parts(G, D) * D; }

// parts (G, parts, D): each part's sum.
__global__ void __launch_bounds__(kRouterGradWarps * 32)
    router_grad_parts_kernel(float* parts, const floatX* x, int64_t ld, const float* ds_copy, const int* copy_row,
                             const int* group_offset, int D, int E) {
    const int c0 = blockIdx.x * kRouterGradCols, g = blockIdx.y, part = blockIdx.z, n_parts = gridDim.z, h = g / E;
    const int first = group_offset[g], n = group_offset[g + 1] - first;
    const int begin = first + (int)((int64_t)n * part / n_parts);
    const int end = first + (int)((int64_t)n * (part + 1) / n_parts);
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
    parts[((int64_t)g * n_parts + part) * D + c0 + threadIdx.x] = total;
}

// dR (H, D, E) += Σ over parts, in order; one thread per element of dR.
__global__ void router_grad_reduce_kernel(float* dR, const float* parts, int H, int D, int E, int n_parts) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)H * D * E) return;
    const int e = (int)(i % E), col = (int)(i / E % D), h = (int)(i / ((int64_t)E * D));
    const float* p = parts + ((int64_t)(h * E + e) * n_parts) * D + col;
    float total = 0.f;
#pragma unroll 8
    for (int part = 0; part < n_parts; part++) total += p[(int64_t)part * D];
    dR[i] += total;
}

// dR (H, D, E) fp32, accumulated; scratch: router_grad_scratch_size(H·E, D) floats. D must be even.
inline void router_weight_backward(float* dR, float* scratch, const floatX* x, int64_t ld, const float* ds_copy,
                                   const RoutingPlan& plan, int D, cudaStream_t stream) {
    const int H = plan.H, E = plan.E, n_parts = router_grad_parts(H * E, D);
    const dim3 grid((unsigned)ceil_div(D, kRouterGradCols), H * E, n_parts);
    router_grad_parts_kernel<<<grid, kRouterGradWarps * 32, 0, stream>>>(scratch, x, ld, ds_copy, plan.copy_row,
                                                                         plan.group_offset, D, E);
    CUDA_CHECK_LAUNCH();
    router_grad_reduce_kernel<<<(unsigned)ceil_div((int64_t)H * D * E, 256), 256, 0, stream>>>(dR, scratch, H, D, E,
                                                                                                n_parts);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
