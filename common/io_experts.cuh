// The IO-aware expert kernels of Multi-Head LatentMoE (SPEC §4): FlashAttention's structure without
// the softmax. A tile of copies of one expert (rows X, gathered straight from the sub-token matrix)
// loops over the expert's hidden size in chunks:
//     A = GELU(X K_c^T)        O += A V_c
// and the (rows × fe) hidden activations never reach global memory. The backward recomputes them
// per tile. Expert weights K, V are (H, E, fe, dh) floatX; gradients fp32, accumulated.
//
// This first version does its tile products with fp32 FMAs on CUDA cores (correct and deterministic,
// far from the tensor-core floor of SPEC §9); the tile structure is the one a tensor-core version keeps.
#pragma once
#include <type_traits>

#include "cuda_utils.cuh"
#include "moe_permute.cuh"

namespace lmoe {

constexpr int kExpertChunk = 32;     // fe columns per chunk (fe must be a multiple)
constexpr int kExpertThreads = 256;  // 4 threads per tile row

__device__ inline float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ inline float gelu_grad(float x) {
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

// Shared-memory rows are padded by one float so threads reading different rows hit different banks.
template <int DH> struct ExpertTileSmem {
    static constexpr int ld_row = DH + 1, ld_chunk = kExpertChunk + 1;
    static constexpr int rows_floats = kExpertTileRows * ld_row;   // one (tile rows × dh) matrix
    static constexpr int chunk_floats = kExpertChunk * ld_row;     // one (chunk × dh) matrix
    static constexpr int hidden_floats = kExpertTileRows * ld_chunk;  // one (tile rows × chunk) matrix
};

// Loads `rows` rows of width DH into shared memory (zeros below them). Row r comes from
// src + row_offset(r); the gather from the sub-token matrix and the plain copy both use this.
template <int DH, class RowOffset>
__device__ void load_tile_rows(float* dst, const floatX* src, int rows, RowOffset row_offset) {
    constexpr int ld = ExpertTileSmem<DH>::ld_row;
    for (int i = threadIdx.x; i < kExpertTileRows * DH; i += blockDim.x) {
        const int r = i / DH, c = i % DH;
        dst[r * ld + c] = r < rows ? to_float(src[row_offset(r) + c]) : 0.f;
    }
}

template <int DH>
__device__ void load_chunk(float* dst, const floatX* src /* (chunk, DH) contiguous */) {
    constexpr int ld = ExpertTileSmem<DH>::ld_row;
    for (int i = threadIdx.x; i < kExpertChunk * DH; i += blockDim.x) dst[i / DH * ld + i % DH] = to_float(src[i]);
}

// This thread's 8 entries (r, cg + 4i) of a (tile rows × chunk) product  P[r][c] = Σ_d A[r][d] B[c][d].
template <int DH>
__device__ inline void tile_times_chunk_t(float (&out)[kExpertChunk / 4], const float* A, const float* B, int r,
                                          int cg) {
    constexpr int ld = ExpertTileSmem<DH>::ld_row;
#pragma unroll
    for (int i = 0; i < kExpertChunk / 4; i++) out[i] = 0.f;
    for (int d = 0; d < DH; d++) {
        const float a = A[r * ld + d];
#pragma unroll
        for (int i = 0; i < kExpertChunk / 4; i++) out[i] += a * B[(cg + 4 * i) * ld + d];
    }
}

// Forward, one block per tile of one (head, expert) group:  o[p] = V^T GELU(K x[row(p)])  (unweighted).
template <int DH>
__global__ void __launch_bounds__(kExpertThreads) expert_forward_kernel(floatX* o, const floatX* x, int64_t ld,
                                                                        const floatX* K, const floatX* V,
                                                                        const RoutingPlan plan, int E, int F) {
    using S = ExpertTileSmem<DH>;
    extern __shared__ float smem[];
    float *Xs = smem, *Ks = Xs + S::rows_floats, *Vs = Ks + S::chunk_floats, *As = Vs + S::chunk_floats;
    const int tile = blockIdx.x;
    if (tile >= *plan.num_tiles) return;
    const int g = plan.tile_group[tile], h = g / E, p0 = plan.tile_start[tile];
    const int rows = min(kExpertTileRows, plan.group_offset[g + 1] - p0);
    const floatX *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int r = threadIdx.x / 4, cg = threadIdx.x % 4;  // this thread: row r, columns cg + 4i

    load_tile_rows<DH>(Xs, x, rows, [&](int i) { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; });
    float acc[DH / 4] = {};
    for (int f0 = 0; f0 < F; f0 += kExpertChunk) {
        __syncthreads();
        load_chunk<DH>(Ks, Kg + (int64_t)f0 * DH);
        load_chunk<DH>(Vs, Vg + (int64_t)f0 * DH);
        __syncthreads();
        float s[kExpertChunk / 4];
        tile_times_chunk_t<DH>(s, Xs, Ks, r, cg);  // S = X K_c^T
#pragma unroll
        for (int i = 0; i < kExpertChunk / 4; i++) As[r * S::ld_chunk + cg + 4 * i] = gelu(s[i]);
        __syncthreads();
        for (int f = 0; f < kExpertChunk; f++) {  // O += A V_c
            const float a = As[r * S::ld_chunk + f];
#pragma unroll
            for (int i = 0; i < DH / 4; i++) acc[i] += a * Vs[f * S::ld_row + cg + 4 * i];
        }
    }
    if (r < rows)
#pragma unroll
        for (int i = 0; i < DH / 4; i++) o[(int64_t)(p0 + r) * DH + cg + 4 * i] = from_float<floatX>(acc[i]);
}

// Input gradient, one block per tile:  recompute S = X K_c^T; dA = dO V_c^T; dS = dA ⊙ GELU'(S);
// dX += dS K_c.  Written per copy; gather_input_grad sums a row's copies.
template <int DH>
__global__ void __launch_bounds__(kExpertThreads) expert_input_backward_kernel(floatX* dx_copy, const floatX* d_o,
                                                                               const floatX* x, int64_t ld,
                                                                               const floatX* K, const floatX* V,
                                                                               const RoutingPlan plan, int E, int F) {
    using S = ExpertTileSmem<DH>;
    extern __shared__ float smem[];
    float *Xs = smem, *dOs = Xs + S::rows_floats, *Ks = dOs + S::rows_floats, *Vs = Ks + S::chunk_floats;
    float* dSs = Vs + S::chunk_floats;
    const int tile = blockIdx.x;
    if (tile >= *plan.num_tiles) return;
    const int g = plan.tile_group[tile], h = g / E, p0 = plan.tile_start[tile];
    const int rows = min(kExpertTileRows, plan.group_offset[g + 1] - p0);
    const floatX *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int r = threadIdx.x / 4, cg = threadIdx.x % 4;

    load_tile_rows<DH>(Xs, x, rows, [&](int i) { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; });
    load_tile_rows<DH>(dOs, d_o, rows, [&](int i) { return (int64_t)(p0 + i) * DH; });
    float acc[DH / 4] = {};
    for (int f0 = 0; f0 < F; f0 += kExpertChunk) {
        __syncthreads();
        load_chunk<DH>(Ks, Kg + (int64_t)f0 * DH);
        load_chunk<DH>(Vs, Vg + (int64_t)f0 * DH);
        __syncthreads();
        float s[kExpertChunk / 4], da[kExpertChunk / 4];
        tile_times_chunk_t<DH>(s, Xs, Ks, r, cg);
        tile_times_chunk_t<DH>(da, dOs, Vs, r, cg);
#pragma unroll
        for (int i = 0; i < kExpertChunk / 4; i++) dSs[r * S::ld_chunk + cg + 4 * i] = da[i] * gelu_grad(s[i]);
        __syncthreads();
        for (int f = 0; f < kExpertChunk; f++) {  // dX += dS K_c
            const float ds = dSs[r * S::ld_chunk + f];
#pragma unroll
            for (int i = 0; i < DH / 4; i++) acc[i] += ds * Ks[f * S::ld_row + cg + 4 * i];
        }
    }
    if (r < rows)
#pragma unroll
        for (int i = 0; i < DH / 4; i++) dx_copy[(int64_t)(p0 + r) * DH + cg + 4 * i] = from_float<floatX>(acc[i]);
}

// Weight gradients, one block per (group, fe chunk), walking all of the group's copies in order, so
// each gradient element has one owner and a fixed summation order (no atomics):
//   dV_c += A^T dO,   dK_c += dS^T X      with A, dS recomputed per tile as above.
template <int DH>
__global__ void __launch_bounds__(kExpertThreads) expert_weight_backward_kernel(float* dK, float* dV, const floatX* d_o,
                                                                                const floatX* x, int64_t ld,
                                                                                const floatX* K, const floatX* V,
                                                                                const RoutingPlan plan, int E, int F) {
    using S = ExpertTileSmem<DH>;
    extern __shared__ float smem[];
    float *Xs = smem, *dOs = Xs + S::rows_floats, *Ks = dOs + S::rows_floats, *Vs = Ks + S::chunk_floats;
    float *As = Vs + S::chunk_floats, *dSs = As + S::hidden_floats;
    const int g = blockIdx.x, h = g / E, f0 = blockIdx.y * kExpertChunk;
    const int64_t wofs = ((int64_t)g * F + f0) * DH;  // this chunk of expert g's K, V, dK, dV
    const int r = threadIdx.x / 4, cg = threadIdx.x % 4;          // for the (rows × chunk) products
    const int c = threadIdx.x / 8, col0 = threadIdx.x % 8;         // for the (chunk × dh) accumulators
    load_chunk<DH>(Ks, K + wofs);
    load_chunk<DH>(Vs, V + wofs);
    float acc_k[DH / 8] = {}, acc_v[DH / 8] = {};
    for (int p0 = plan.group_offset[g]; p0 < plan.group_offset[g + 1]; p0 += kExpertTileRows) {
        const int rows = min(kExpertTileRows, plan.group_offset[g + 1] - p0);
        __syncthreads();
        load_tile_rows<DH>(Xs, x, rows, [&](int i) { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; });
        load_tile_rows<DH>(dOs, d_o, rows, [&](int i) { return (int64_t)(p0 + i) * DH; });
        __syncthreads();
        float s[kExpertChunk / 4], da[kExpertChunk / 4];
        tile_times_chunk_t<DH>(s, Xs, Ks, r, cg);
        tile_times_chunk_t<DH>(da, dOs, Vs, r, cg);
#pragma unroll
        for (int i = 0; i < kExpertChunk / 4; i++) {
            As[r * S::ld_chunk + cg + 4 * i] = gelu(s[i]);
            dSs[r * S::ld_chunk + cg + 4 * i] = da[i] * gelu_grad(s[i]);
        }
        __syncthreads();
        for (int rr = 0; rr < rows; rr++) {
            const float a = As[rr * S::ld_chunk + c], ds = dSs[rr * S::ld_chunk + c];
#pragma unroll
            for (int i = 0; i < DH / 8; i++) {
                acc_v[i] += a * dOs[rr * S::ld_row + col0 + 8 * i];
                acc_k[i] += ds * Xs[rr * S::ld_row + col0 + 8 * i];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DH / 8; i++) {
        dK[wofs + (int64_t)c * DH + col0 + 8 * i] += acc_k[i];
        dV[wofs + (int64_t)c * DH + col0 + 8 * i] += acc_v[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Launchers. dh must be 16, 32, 64 or 128 and fe a multiple of 32 (expert_shape_supported).

inline bool expert_shape_supported(int dh, int fe) {
    return (dh == 16 || dh == 32 || dh == 64 || dh == 128) && fe % kExpertChunk == 0;
}

template <class Kernel, class... Args>
void launch_expert_kernel(Kernel kernel, dim3 grid, size_t smem_floats, cudaStream_t stream, Args... args) {
    const size_t bytes = smem_floats * sizeof(float);
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    kernel<<<grid, kExpertThreads, bytes, stream>>>(args...);
    CUDA_CHECK_LAUNCH();
}

// Calls f(std::integral_constant<int, dh>{}), so f sees the head size as a compile-time constant.
template <class F>
void dispatch_head_dim(int dh, F&& f) {
    switch (dh) {
        case 16: f(std::integral_constant<int, 16>{}); break;
        case 32: f(std::integral_constant<int, 32>{}); break;
        case 64: f(std::integral_constant<int, 64>{}); break;
        case 128: f(std::integral_constant<int, 128>{}); break;
        default: die("config", "unsupported expert head size (dh must be 16, 32, 64 or 128)", "dispatch_head_dim",
                     __FILE__, __LINE__);
    }
}

// o (copies, dh) for every copy of the plan; max_tiles from routing_max_tiles().
inline void expert_forward(floatX* o, const floatX* x, int64_t ld, const floatX* K, const floatX* V,
                           const RoutingPlan& plan, int max_tiles, int dh, int E, int F, cudaStream_t stream) {
    dispatch_head_dim(dh, [&](auto head_dim) {
        constexpr int DH = decltype(head_dim)::value;
        using S = ExpertTileSmem<DH>;
        launch_expert_kernel(expert_forward_kernel<DH>, dim3(max_tiles),
                                 S::rows_floats + 2 * S::chunk_floats + S::hidden_floats, stream, o, x, ld, K, V, plan,
                                 E, F);
    });
}

// dx_copy (copies, dh), and dK, dV (H, E, fe, dh) fp32 accumulated, from d_o (copies, dh).
inline void expert_backward(floatX* dx_copy, float* dK, float* dV, const floatX* d_o, const floatX* x, int64_t ld,
                            const floatX* K, const floatX* V, const RoutingPlan& plan, int max_tiles, int dh, int H,
                            int E, int F, cudaStream_t stream) {
    dispatch_head_dim(dh, [&](auto head_dim) {
        constexpr int DH = decltype(head_dim)::value;
        using S = ExpertTileSmem<DH>;
        launch_expert_kernel(expert_input_backward_kernel<DH>, dim3(max_tiles),
                                 2 * S::rows_floats + 2 * S::chunk_floats + S::hidden_floats, stream, dx_copy, d_o, x,
                                 ld, K, V, plan, E, F);
        launch_expert_kernel(expert_weight_backward_kernel<DH>, dim3(H * E, F / kExpertChunk),
                                 2 * S::rows_floats + 2 * S::chunk_floats + 2 * S::hidden_floats, stream, dK, dV, d_o, x,
                                 ld, K, V, plan, E, F);
    });
}

}  // namespace lmoe
