// LocMoE's router on the GPU (SPEC §2.6; the CPU reference is cpu/locmoe.h): the GrAP gate and top-k
// in one kernel, the two auxiliary losses, the capacity drop, and the backward. Like the top-k router
// (moe/router.cuh) it keeps no (rows × E) matrix: the backward recomputes each row's probabilities from
// x and ε (D reads a row). Every sum over rows goes through per-block parts added in block order, so
// the results are bitwise reproducible; no floating-point atomics, and no atomic decides a drop.
//
// Layout: x (M, D) floatX with D % E == 0; ε (E) floatX; sel and gate (M, k) in the plan. A copy the
// capacity dropped keeps its expert e as sel = ~e (negative): the grouping leaves it out, and the
// router's choice stays readable.
#pragma once
#include <cfloat>

#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

constexpr int kGrapWarps = 8;  // rows per block, one warp each

// Blocks of the forward and backward kernels, and floats of each one's per-block parts (blocks, E).
inline int grap_blocks(int M) { return (int)ceil_div(M, kGrapWarps); }
inline size_t grap_parts_size(int M, int E) { return (size_t)grap_blocks(M) * E; }

// The GrAP gate of one row, lane l holding experts l + 32q:
//   z_e = (E/D) Σ_{i < D/E} x[e·D/E + i] + ε_e;   p = softmax over all E of ReLU(z)
// The warp's max and sum run in a fixed butterfly order.
template <int PER_LANE>
__device__ inline void grap_row(float (&p)[PER_LANE], float (&z)[PER_LANE], const floatX* row, const floatX* eps, int D,
                                int E) {
    const int lane = threadIdx.x % 32, G = D / E;
    float mx = 0.f;  // ReLU(z) >= 0
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) {
        const int e = lane + 32 * q;
        z[q] = 0.f;
        if (e >= E) continue;
        float a = 0.f;
        for (int i = 0; i < G; i++) a += to_float(row[(int64_t)e * G + i]);
        z[q] = a / G + to_float(eps[e]);
        mx = fmaxf(mx, fmaxf(z[q], 0.f));
    }
    for (int offset = 16; offset > 0; offset >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, offset));
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) {
        p[q] = lane + 32 * q < E ? expf(fmaxf(z[q], 0.f) - mx) : 0.f;
        sum += p[q];
    }
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, offset);
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) p[q] /= sum;
}

// parts (blocks, E): each block's sum of v over its warps' rows, in warp order. Every thread of the
// block calls it (it synchronises); lane l's v[q] belongs to expert l + 32q, zero for rows past M.
template <int PER_LANE>
__device__ inline void block_parts(float* parts, const float (&v)[PER_LANE], int E) {
    __shared__ float rows[kGrapWarps][kMaxRouterExperts];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int q = 0; q < PER_LANE; q++)
        if (lane + 32 * q < E) rows[warp][lane + 32 * q] = v[q];
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float total = 0.f;
        for (int w = 0; w < kGrapWarps; w++) total += rows[w][e];
        parts[(int64_t)blockIdx.x * E + e] = total;
    }
}

// One warp per row t:  p = grap_row(x[t]);  S = top-k of p (warp_topk: ties to the lower index);
//   sel[t, j] = S_j;  gate[t, j] = p[S_j];  prob_parts[block, e] = Σ over the block's rows of p[t, e]
template <int PER_LANE>
__global__ void __launch_bounds__(kGrapWarps * 32)
    locmoe_router_forward_kernel(int* sel, float* gate, float* prob_parts, const floatX* x, const floatX* eps, int M,
                                 int D, int E, int k) {
    const int lane = threadIdx.x % 32, t = blockIdx.x * kGrapWarps + threadIdx.x / 32;
    float p[PER_LANE], z[PER_LANE];
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) p[q] = 0.f;
    if (t < M) {  // warp-uniform: every lane of a warp has the same t
        grap_row(p, z, x + (int64_t)t * D, eps, D, E);
        int my_expert;
        float my_p;
        warp_topk(p, p, E, k, my_expert, my_p);
        if (lane < k) {
            sel[(int64_t)t * k + lane] = my_expert;
            gate[(int64_t)t * k + lane] = my_p;
        }
    }
    block_parts(prob_parts, p, E);
}

// plan.sel, plan.gate and prob_parts (grap_parts_size(M, E)) from x (M, D) and ε.
inline void locmoe_router_forward(const RoutingPlan& plan, float* prob_parts, const floatX* x, const floatX* eps, int D,
                                  cudaStream_t stream) {
    const int M = plan.M, E = plan.E, k = plan.k, blocks = grap_blocks(M), threads = kGrapWarps * 32;
    const int per_lane = (int)ceil_div(E, 32);
    if (per_lane <= 1) locmoe_router_forward_kernel<1><<<blocks, threads, 0, stream>>>(plan.sel, plan.gate, prob_parts, x, eps, M, D, E, k);
    else if (per_lane <= 2) locmoe_router_forward_kernel<2><<<blocks, threads, 0, stream>>>(plan.sel, plan.gate, prob_parts, x, eps, M, D, E, k);
    else if (per_lane <= 4) locmoe_router_forward_kernel<4><<<blocks, threads, 0, stream>>>(plan.sel, plan.gate, prob_parts, x, eps, M, D, E, k);
    else locmoe_router_forward_kernel<8><<<blocks, threads, 0, stream>>>(plan.sel, plan.gate, prob_parts, x, eps, M, D, E, k);
    CUDA_CHECK_LAUNCH();
}

// What the losses kernel writes for one layer and micro-batch.
struct LocMoeLayerStats {
    float* coef;   // (E) dL/dp[t, e], the same for every row
    float* loss;   // (2) L_aux, L_loc
    int* dropped;  // (1) copies over capacity
};

// One block, thread e per expert, on the plan grouped before the drop (its group sizes n_e are the
// routed copies):
//   P_e = Σ_blocks prob_parts[b, e] / M (in block order);  f_e = n_e / (M k)
//   coef_e = (α E f_e + μ (log(P_e / D_e) + 1)) / M
//   L_aux = α E Σ_e f_e P_e;  L_loc = μ Σ_e P_e log(P_e / D_e)  (thread 0, in expert order)
//   dropped = Σ_e max(n_e − C, 0)   (C = 0: none)
__global__ void locmoe_losses_kernel(LocMoeLayerStats out, const float* prob_parts, const int* group_offset,
                                     const float* target, int blocks, int M, int E, int k, float alpha, float mu,
                                     int C) {
    __shared__ float aux[kMaxRouterExperts], loc[kMaxRouterExperts];
    __shared__ int over[kMaxRouterExperts];
    const int e = threadIdx.x;
    if (e < E) {
        float P = 0.f;
        for (int b = 0; b < blocks; b++) P += prob_parts[(int64_t)b * E + e];
        P /= M;
        const int n = group_offset[e + 1] - group_offset[e];
        const float f = (float)n / ((float)M * k), log_ratio = logf(fmaxf(P, FLT_MIN) / target[e]);  // as the reference: P = 0 is no NaN
        out.coef[e] = (alpha * E * f + mu * (log_ratio + 1.f)) / M;
        aux[e] = alpha * E * f * P;
        loc[e] = mu * P * log_ratio;
        over[e] = C > 0 && n > C ? n - C : 0;
    }
    __syncthreads();
    if (e != 0) return;
    float a = 0.f, l = 0.f;
    int dropped = 0;
    for (int i = 0; i < E; i++) {
        a += aux[i];
        l += loc[i];
        dropped += over[i];
    }
    out.loss[0] = a;
    out.loss[1] = l;
    *out.dropped = dropped;
}

// target: the rank's locality target D_l (E), fp32 on the device; C: the capacity (0: unlimited).
inline void locmoe_losses(const LocMoeLayerStats& out, const float* prob_parts, const RoutingPlan& plan,
                          const float* target, float alpha, float mu, int C, cudaStream_t stream) {
    locmoe_losses_kernel<<<1, kMaxRouterExperts, 0, stream>>>(out, prob_parts, plan.group_offset, target,
                                                              grap_blocks(plan.M), plan.M, plan.E, plan.k, alpha, mu, C);
    CUDA_CHECK_LAUNCH();
}

// The capacity drop, one thread per copy (t, j) of expert e: the grouping placed the copies of e by
// increasing row, so copy_pos − group_offset[e] is the number of earlier rows that chose e; at C or more
// the copy is dropped (sel = ~e): the latest rows of the micro-batch go first, each copy decided alone.
__global__ void capacity_drop_kernel(int* sel, const int* copy_pos, const int* group_offset, int64_t copies, int C) {
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= copies) return;
    const int e = sel[c];
    if (copy_pos[c] - group_offset[e] >= C) sel[c] = ~e;
}

// Marks the copies over capacity C > 0 in plan.sel and groups the kept ones again (group_copies).
inline void capacity_drop(const RoutingPlan& plan, int C, cudaStream_t stream) {
    const int64_t copies = plan.copies();
    capacity_drop_kernel<<<(unsigned)ceil_div(copies, 256), 256, 0, stream>>>(plan.sel, plan.copy_pos,
                                                                             plan.group_offset, copies, C);
    CUDA_CHECK_LAUNCH();
    group_copies(plan, stream);
}

// Backward, one warp per row t, p and z recomputed (grap_row):
//   dp_e = loss_scale · coef_e + Σ_{kept j: e_j = e} dw_j        (dw_j = ds_copy at the copy's position,
//                                                                 added in slot order)
//   dz = p ⊙ (dp − Σ_e p_e dp_e) ⊙ 1{z > 0};   dx[t, e·D/E + i] += (E/D) dz_e
//   eps_parts[block, e] = Σ over the block's rows of dz_e
template <int PER_LANE>
__global__ void __launch_bounds__(kGrapWarps * 32)
    locmoe_router_backward_kernel(floatX* dx, float* eps_parts, const floatX* x, const floatX* eps, const float* coef,
                                  float loss_scale, const RoutingPlan plan, const float* ds_copy, int M, int D, int E,
                                  int k) {
    const int lane = threadIdx.x % 32, t = blockIdx.x * kGrapWarps + threadIdx.x / 32, G = D / E;
    float dz[PER_LANE];
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) dz[q] = 0.f;
    if (t < M) {  // warp-uniform
        float p[PER_LANE], z[PER_LANE], dp[PER_LANE];
        grap_row(p, z, x + (int64_t)t * D, eps, D, E);
#pragma unroll
        for (int q = 0; q < PER_LANE; q++) dp[q] = lane + 32 * q < E ? loss_scale * coef[lane + 32 * q] : 0.f;
        for (int j = 0; j < k; j++) {
            const int e = plan.sel[(int64_t)t * k + j];
            if (e < 0 || e % 32 != lane) continue;  // dropped, or another lane's expert
            const float dw = ds_copy[plan.copy_pos[(int64_t)t * k + j]];
#pragma unroll
            for (int q = 0; q < PER_LANE; q++)
                if (q == e / 32) dp[q] += dw;  // a register index known at compile time
        }
        float dot = 0.f;
#pragma unroll
        for (int q = 0; q < PER_LANE; q++) dot += p[q] * dp[q];
        for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, offset);
        floatX* row = dx + (int64_t)t * D;
#pragma unroll
        for (int q = 0; q < PER_LANE; q++) {
            const int e = lane + 32 * q;
            if (e >= E) continue;
            dz[q] = z[q] > 0.f ? p[q] * (dp[q] - dot) : 0.f;
            for (int i = 0; i < G; i++) {
                floatX* v = row + (int64_t)e * G + i;
                *v = from_float<floatX>(to_float(*v) + dz[q] / G);
            }
        }
    }
    block_parts(eps_parts, dz, E);
}

// deps (E) += Σ_blocks parts[b, e], in block order; one thread per expert.
__global__ void add_parts_kernel(float* deps, const float* parts, int blocks, int E) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    float total = 0.f;
    for (int b = 0; b < blocks; b++) total += parts[(int64_t)b * E + e];
    deps[e] += total;
}

// dx (M, D) += the router's part (dx already holds the copies' dx, gather_input_grad); deps (E) fp32,
// accumulated. ds_copy: dw = dy·o of each kept copy (combine_backward's raw gate gradient); coef: the
// losses kernel's; scratch: grap_parts_size(M, E) floats.
inline void locmoe_router_backward(floatX* dx, float* deps, float* scratch, const floatX* x, const floatX* eps,
                                   const float* coef, float loss_scale, const RoutingPlan& plan, const float* ds_copy,
                                   int D, cudaStream_t stream) {
    const int M = plan.M, E = plan.E, k = plan.k, blocks = grap_blocks(M), threads = kGrapWarps * 32;
    const int per_lane = (int)ceil_div(E, 32);
    if (per_lane <= 1) locmoe_router_backward_kernel<1><<<blocks, threads, 0, stream>>>(dx, scratch, x, eps, coef, loss_scale, plan, ds_copy, M, D, E, k);
    else if (per_lane <= 2) locmoe_router_backward_kernel<2><<<blocks, threads, 0, stream>>>(dx, scratch, x, eps, coef, loss_scale, plan, ds_copy, M, D, E, k);
    else if (per_lane <= 4) locmoe_router_backward_kernel<4><<<blocks, threads, 0, stream>>>(dx, scratch, x, eps, coef, loss_scale, plan, ds_copy, M, D, E, k);
    else locmoe_router_backward_kernel<8><<<blocks, threads, 0, stream>>>(dx, scratch, x, eps, coef, loss_scale, plan, ds_copy, M, D, E, k);
    CUDA_CHECK_LAUNCH();
    add_parts_kernel<<<(unsigned)ceil_div(E, 256), 256, 0, stream>>>(deps, scratch, blocks, E);
    CUDA_CHECK_LAUNCH();
}

// The step's totals (2, 1) += one layer's micro-batch: its losses scaled like its gradient, its drops.
__global__ void add_router_stats_kernel(float* step_loss, int* step_dropped, const LocMoeLayerStats layer,
                                        float loss_scale) {
    step_loss[0] += loss_scale * layer.loss[0];
    step_loss[1] += loss_scale * layer.loss[1];
    *step_dropped += *layer.dropped;
}

inline void add_router_stats(float* step_loss, int* step_dropped, const LocMoeLayerStats& layer, float loss_scale,
                             cudaStream_t stream) {
    add_router_stats_kernel<<<1, 1, 0, stream>>>(step_loss, step_dropped, layer, loss_scale);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
