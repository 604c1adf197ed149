// The weight stage of both FFN kinds and its backward (SPEC §2.1, §2.2): each row's k expert outputs
// weighted by their gates and summed, in slot order; the backward's gate-softmax gradient; and the
// gather of each row's input gradient from its copies and the router. All three walk a RoutingPlan
// (moe/routing_plan.cuh) row by row, so every sum has a fixed order.
#pragma once
#include "moe/routing_plan.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// Weight and merge: y[t, h] = Σ_j w[h, t, j] · o[pos(h, t, j)], slots summed in order (fp32).
// o is (H·M·k, D) in group order; y is (M, ld) with head h at columns h·D. Here and below, a copy with
// pos −1 (dropped by LocMoE's capacity) is skipped.
__global__ void combine_forward_kernel(floatX* y, int64_t ld, const floatX* o, const RoutingPlan plan, int M, int H,
                                       int D, int k) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)M * H * D) return;
    const int i = (int)(idx % D), h = (int)(idx / D % H);
    const int64_t t = idx / ((int64_t)D * H);
    const int64_t slot0 = ((int64_t)h * M + t) * k;
    float acc = 0.f;
    for (int j = 0; j < k; j++) {
        const int64_t pos = plan.copy_pos[slot0 + j];
        if (pos >= 0) acc += plan.gate[slot0 + j] * to_float(o[pos * D + i]);  // a dropped copy adds nothing
    }
    y[t * ld + (int64_t)h * D + i] = from_float<floatX>(acc);
}

// y (M, ld) from o (copies, D); D = dh (LatentMoE) or d (MoE).
inline void combine_forward(floatX* y, int64_t ld, const floatX* o, const RoutingPlan& plan, int D, cudaStream_t stream) {
    const int64_t n = (int64_t)plan.M * plan.H * D;
    combine_forward_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(y, ld, o, plan, plan.M, plan.H, D, plan.k);
    CUDA_CHECK_LAUNCH();
}

// Backward of the weighting, one warp per (head, row):
//   dw_j = dy · o_j;   do_j = w_j dy   (to the copy's slot, for the expert backward);
//   ds_j = w_j (dw_j − Σ_i w_i dw_i)   (the gate softmax; stored per copy for the router backward).
// With gate_softmax false (LocMoE, whose gates are the full softmax's p) dw_j itself is stored.
__global__ void combine_backward_kernel(floatX* d_o, float* ds_copy, const floatX* dy, int64_t ld, const floatX* o,
                                        const RoutingPlan plan, int M, int H, int D, int k, bool gate_softmax) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (warp >= (int64_t)H * M) return;
    const int h = (int)(warp / M);
    const int64_t t = warp % M, slot0 = warp * k;
    const floatX* dyt = dy + t * ld + (int64_t)h * D;
    float my_dgate = 0.f, my_gate = 0.f;  // lane j < k holds slot j's
    for (int j = 0; j < k; j++) {
        const int64_t pos = plan.copy_pos[slot0 + j];
        if (pos < 0) continue;  // warp-uniform
        const float w = plan.gate[slot0 + j];
        float dot = 0.f;
        for (int i = lane; i < D; i += 32) {
            float g = to_float(dyt[i]);
            dot += g * to_float(o[pos * D + i]);
            d_o[pos * D + i] = from_float<floatX>(w * g);
        }
        for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, offset);
        if (lane == j) {
            my_dgate = dot;
            my_gate = w;
        }
    }
    float wdw = my_gate * my_dgate;
    for (int offset = 16; offset > 0; offset >>= 1) wdw += __shfl_xor_sync(0xffffffff, wdw, offset);
    if (lane < k && plan.copy_pos[slot0 + lane] >= 0)
        ds_copy[plan.copy_pos[slot0 + lane]] = gate_softmax ? my_gate * (my_dgate - wdw) : my_dgate;
}

// d_o (copies, D) and ds_copy (copies) from dy (M, ld).
inline void combine_backward(floatX* d_o, float* ds_copy, const floatX* dy, int64_t ld, const floatX* o,
                             const RoutingPlan& plan, int D, cudaStream_t stream, bool gate_softmax = true) {
    const int warps = 8;
    combine_backward_kernel<<<(unsigned)ceil_div((int64_t)plan.H * plan.M, warps), warps * 32, 0, stream>>>(
        d_o, ds_copy, dy, ld, o, plan, plan.M, plan.H, D, plan.k, gate_softmax);
    CUDA_CHECK_LAUNCH();
}

// The gradient of each row from its copies and the router, in the reference's order:
//   dx[t, h] = Σ_j dx_copy[pos(h, t, j)]  +  Σ_j R_h[:, e_j] ds_j      (written, not accumulated)
// R null: the copies' part only (LocMoE's router adds its own, moe/locmoe_router.cuh).
__global__ void gather_input_grad_kernel(floatX* dx, int64_t ld, const floatX* dx_copy, const float* ds_copy,
                                         const floatX* R, const RoutingPlan plan, int M, int H, int D, int E, int k) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)M * H * D) return;
    const int i = (int)(idx % D), h = (int)(idx / D % H);
    const int64_t t = idx / ((int64_t)D * H);
    const int64_t slot0 = ((int64_t)h * M + t) * k;
    float acc = 0.f;
    for (int j = 0; j < k; j++) {
        const int64_t pos = plan.copy_pos[slot0 + j];
        if (pos >= 0) acc += to_float(dx_copy[pos * D + i]);
    }
    if (R) {
        const floatX* Ri = R + ((int64_t)h * D + i) * E;
        for (int j = 0; j < k; j++) acc += to_float(Ri[plan.sel[slot0 + j]]) * ds_copy[plan.copy_pos[slot0 + j]];
    }
    dx[t * ld + (int64_t)h * D + i] = from_float<floatX>(acc);
}

// dx (M, ld) from dx_copy (copies, D), ds_copy (copies) and the router R (H, D, E).
inline void gather_input_grad(floatX* dx, int64_t ld, const floatX* dx_copy, const float* ds_copy, const floatX* R,
                              const RoutingPlan& plan, int D, cudaStream_t stream) {
    const int64_t n = (int64_t)plan.M * plan.H * D;
    gather_input_grad_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(dx, ld, dx_copy, ds_copy, R, plan, plan.M,
                                                                             plan.H, D, plan.E, plan.k);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
