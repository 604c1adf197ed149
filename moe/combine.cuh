// The weight stage of both FFN kinds and its backward (SPEC §2.1, §2.2): each row's k expert outputs
// weighted by their gates and summed, in slot order; the backward's gate-softmax gradient; and the
// gather of each row's input gradient from its copies and the router. All three walk a RoutingPlan
// (moe/routing_plan.cuh) row by row, so every sum has a fixed order. They move kPack values (16
// bytes) per load and store: rows of D floatX with D a multiple of kPack, at 16-byte aligned addresses
// (ld a multiple of kPack too), which both trainers' shapes are.
#pragma once
#include "moe/routing_plan.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// The shapes the kernels below take; `caller` names the launcher in the message.
inline void check_pack_shape(int D, int64_t ld, const char* caller) {
    if (D % kPack != 0 || ld % kPack != 0)
        die("argument", "row width and stride must be multiples of 16 bytes", caller, __FILE__, __LINE__);
}

// Weight and merge: y[t, h] = Σ_j w[h, t, j] · o[pos(h, t, j)], slots summed in order (fp32).
// o is (H·M·k, D) in group order; y is (M, ld) with head h at columns h·D. One thread per kPack
// columns of a (t, h) row. Here and below, a copy with pos −1 (dropped by LocMoE's capacity) is skipped.
__global__ void combine_forward_kernel(floatX* y, int64_t ld, const floatX* o, const RoutingPlan plan, int M, int H,
                                       int D, int k) {
    const int packs = D / kPack;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)M * H * packs) return;
    const int c = (int)(idx % packs) * kPack, h = (int)(idx / packs % H);
    const int64_t t = idx / ((int64_t)packs * H);
    const int64_t slot0 = ((int64_t)h * M + t) * k;
    float acc[kPack] = {};
    for (int j = 0; j < k; j++) {
        const int64_t pos = plan.copy_pos[slot0 + j];
        if (pos < 0) continue;  // a dropped copy adds nothing
        const float w = plan.gate[slot0 + j];
        const Pack v = load_pack(o + pos * D + c);
#pragma unroll
        for (int i = 0; i < kPack; i++) acc[i] += w * to_float(v.v[i]);
    }
    store_pack(y + t * ld + (int64_t)h * D + c, acc);
}

// y (M, ld) from o (copies, D); D = dh (LatentMoE) or d (MoE).
inline void combine_forward(floatX* y, int64_t ld, const floatX* o, const RoutingPlan& plan, int D, cudaStream_t stream) {
    check_pack_shape(D, ld, "combine_forward");
    const int64_t n = (int64_t)plan.M * plan.H * (D / kPack);
    combine_forward_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(y, ld, o, plan, plan.M, plan.H, D, plan.k);
    CUDA_CHECK_LAUNCH();
}

// Backward of the weighting, one warp per (head, row):
//   dw_j = dy · o_j;   do_j = w_j dy   (to the copy's slot, for the expert backward);
//   ds_j = w_j (dw_j − Σ_i w_i dw_i)   (the gate softmax; stored per copy for the router backward).
// With gate_softmax false (LocMoE, whose gates are the full softmax's p) dw_j itself is stored.
// A row is D / kPack packs; when that is under 32 and divides it, the warp splits into segments of
// that many lanes and takes 32 / packs copies at once (bf16, dh = 128: two at once, 16 lanes each).
// A lane reads AHEAD packs of a copy (all it has when the row is at most AHEAD·seg packs) before it
// writes any: a write may alias the next read, so the reads after a write wait for the reads before it.
template <int AHEAD>
__global__ void __launch_bounds__(256)
    combine_backward_kernel(floatX* d_o, float* ds_copy, const floatX* dy, int64_t ld, const floatX* o,
                            const RoutingPlan plan, int M, int H, int D, int k, bool gate_softmax) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (warp >= (int64_t)H * M) return;
    const int h = (int)(warp / M);
    const int64_t t = warp % M, slot0 = warp * k;
    const floatX* dyt = dy + t * ld + (int64_t)h * D;
    const int packs = D / kPack;
    const int seg = packs < 32 && 32 % packs == 0 ? packs : 32;  // lanes per copy
    const int per_pass = 32 / seg, jj = lane / seg, v0 = lane % seg;
    // Lane j < k holds slot j's position and gate, all read at once rather than one pass after another.
    const int64_t lane_pos = lane < k ? plan.copy_pos[slot0 + lane] : -1;
    const float lane_gate = lane_pos >= 0 ? plan.gate[slot0 + lane] : 0.f;
    float lane_dgate = 0.f;
    for (int j0 = 0; j0 < k; j0 += per_pass) {
        const int j = j0 + jj;
        const int64_t pos = __shfl_sync(0xffffffff, lane_pos, j < k ? j : 0);
        const float w = __shfl_sync(0xffffffff, lane_gate, j < k ? j : 0);
        float dot = 0.f;
        if (j < k && pos >= 0)
            for (int v1 = v0; v1 < packs; v1 += AHEAD * seg) {
                Pack g[AHEAD], ov[AHEAD];
#pragma unroll
                for (int u = 0; u < AHEAD; u++) {
                    const int v = v1 + u * seg;
                    if (v < packs) g[u] = load_pack(dyt + v * kPack), ov[u] = load_pack(o + pos * D + v * kPack);
                }
#pragma unroll
                for (int u = 0; u < AHEAD; u++) {
                    const int v = v1 + u * seg;
                    if (v >= packs) break;
                    float scaled[kPack];
#pragma unroll
                    for (int i = 0; i < kPack; i++) {
                        dot += to_float(g[u].v[i]) * to_float(ov[u].v[i]);
                        scaled[i] = w * to_float(g[u].v[i]);
                    }
                    store_pack(d_o + pos * D + v * kPack, scaled);
                }
            }
        for (int offset = seg / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, offset);
        // slot j0 + i's sum sits in lane i·seg; lane j0 + i takes it
        const int from = lane - j0 >= 0 && lane - j0 < per_pass ? (lane - j0) * seg : 0;
        const float got = __shfl_sync(0xffffffff, dot, from);
        if (lane >= j0 && lane < j0 + per_pass && lane < k) lane_dgate = got;
    }
    float wdw = lane_gate * lane_dgate;
    for (int offset = 16; offset > 0; offset >>= 1) wdw += __shfl_xor_sync(0xffffffff, wdw, offset);
    if (lane_pos >= 0) ds_copy[lane_pos] = gate_softmax ? lane_gate * (lane_dgate - wdw) : lane_dgate;
}

// d_o (copies, D) and ds_copy (copies) from dy (M, ld).
inline void combine_backward(floatX* d_o, float* ds_copy, const floatX* dy, int64_t ld, const floatX* o,
                             const RoutingPlan& plan, int D, cudaStream_t stream, bool gate_softmax = true) {
    check_pack_shape(D, ld, "combine_backward");
    const int warps = 8, packs = D / kPack;
    const int per_lane = packs < 32 ? 1 : (int)ceil_div(packs, 32);  // packs of a copy per lane
    const dim3 grid((unsigned)ceil_div((int64_t)plan.H * plan.M, warps));
    if (per_lane == 1)
        combine_backward_kernel<1><<<grid, warps * 32, 0, stream>>>(d_o, ds_copy, dy, ld, o, plan, plan.M, plan.H, D,
                                                                   plan.k, gate_softmax);
    else
        combine_backward_kernel<4><<<grid, warps * 32, 0, stream>>>(d_o, ds_copy, dy, ld, o, plan, plan.M, plan.H, D,
                                                                   plan.k, gate_softmax);
    CUDA_CHECK_LAUNCH();
}

// Rt (H, E, D) = R (H, D, E) transposed, so that the gather below reads an expert's router column as
// contiguous packs. One thread per element of Rt.
__global__ void transpose_router_kernel(floatX* Rt, const floatX* R, int H, int D, int E) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)H * D * E) return;
    const int i = (int)(idx % D), e = (int)(idx / D % E);
    const int64_t h = idx / ((int64_t)D * E);
    Rt[idx] = R[(h * D + i) * E + e];
}

// The gradient of each row from its copies and the router, in the reference's order:
//   dx[t, h] = Σ_j dx_copy[pos(h, t, j)]  +  Σ_j R_h[:, e_j] ds_j      (written, not accumulated)
// Rt null: the copies' part only (LocMoE's router adds its own, moe/locmoe_router.cuh). One thread
// per kPack columns of a (t, h) row.
__global__ void gather_input_grad_kernel(floatX* dx, int64_t ld, const floatX* dx_copy, const float* ds_copy,
                                         const floatX* Rt, const RoutingPlan plan, int M, int H, int D, int E, int k) {
    const int packs = D / kPack;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)M * H * packs) return;
    const int c = (int)(idx % packs) * kPack, h = (int)(idx / packs % H);
    const int64_t t = idx / ((int64_t)packs * H);
    const int64_t slot0 = ((int64_t)h * M + t) * k;
    float acc[kPack] = {};
    for (int j = 0; j < k; j++) {
        const int64_t pos = plan.copy_pos[slot0 + j];
        if (pos < 0) continue;
        const Pack v = load_pack(dx_copy + pos * D + c);
#pragma unroll
        for (int i = 0; i < kPack; i++) acc[i] += to_float(v.v[i]);
    }
    if (Rt)
        for (int j = 0; j < k; j++) {
            const float ds = ds_copy[plan.copy_pos[slot0 + j]];
            const Pack r = load_pack(Rt + ((int64_t)h * E + plan.sel[slot0 + j]) * D + c);
#pragma unroll
            for (int i = 0; i < kPack; i++) acc[i] += to_float(r.v[i]) * ds;
        }
    store_pack(dx + t * ld + (int64_t)h * D + c, acc);
}

// dx (M, ld) from dx_copy (copies, D), ds_copy (copies) and the router R (H, D, E), transposed first
// into Rt (H, E, D floatX, scratch). R null: no router term (Rt unused); the top-k routers that pass R
// drop no copy, so every slot's ds and expert are real.
inline void gather_input_grad(floatX* dx, int64_t ld, const floatX* dx_copy, const float* ds_copy, const floatX* R,
                              floatX* Rt, const RoutingPlan& plan, int D, cudaStream_t stream) {
    check_pack_shape(D, ld, "gather_input_grad");
    if (R && !Rt) die("argument", "a router needs the scratch for its transpose", "gather_input_grad", __FILE__, __LINE__);
    const int H = plan.H, E = plan.E;
    if (R) {
        const int64_t n = (int64_t)H * D * E;
        transpose_router_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(Rt, R, H, D, E);
        CUDA_CHECK_LAUNCH();
    }
    const int64_t n = (int64_t)plan.M * H * (D / kPack);
    gather_input_grad_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(dx, ld, dx_copy, ds_copy, R ? Rt : nullptr,
                                                                             plan, plan.M, H, D, E, plan.k);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
