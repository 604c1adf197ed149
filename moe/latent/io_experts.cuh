// The IO-aware expert kernels of Multi-Head LatentMoE (SPEC §4): FlashAttention's structure without
// the softmax. A tile of copies of one expert (rows X, gathered straight from the sub-token matrix)
// loops over the expert's hidden size in chunks:
//     A = GELU(X K_c^T)        O += A V_c
// and the (rows × fe) hidden activations never reach global memory. The backward recomputes them
// per tile. Expert weights K, V are (H, E, fe, dh) floatX; gradients fp32, accumulated.
//
// Two implementations of the same tiles: in the default bf16 build the tile products run on tensor
// cores (mma.sync m16n8k16, the hidden activations passed between products in registers; the weight
// gradient on wgmma where the build targets sm_90a); the fp32 build (LMOE_FP32) does them with fp32
// FMAs on CUDA cores, so the math can be checked tightly. All are deterministic: every output element
// has one owner and a fixed summation order.
//
// Speed (H100, p1 = 8192 tokens, H 8, dh 128, E 64, fe 512, k 8; docs/experts_perf.md has the log):
// forward 1.21 → 0.53 ms, input gradient + weight gradient 5.67 → 0.73 + 1.31 ms (sm_90) or
// 0.73 + 1.10 ms (sm_90a, wgmma). The mma.sync kernels run at 35-46 % of the tensor pipe: with
// 255 registers they hold two warps per scheduler, too few to hide ldmatrix and mma latency.
#pragma once
#include <type_traits>

#include "util/cuda_utils.cuh"
#include "tc/mma.cuh"
#include "moe/routing_plan.cuh"

namespace lmoe {

// fp32 (SIMT) kernels: each planner tile (kExpertTileRows rows) is split over blocks of kSimtTileRows.
constexpr int kExpertChunk = 32;     // fe columns per chunk (fe must be a multiple)
constexpr int kSimtTileRows = 64;    // rows of one block
constexpr int kExpertThreads = 256;  // 4 threads per row
static_assert(kExpertTileRows % kSimtTileRows == 0, "a planner tile splits into whole SIMT tiles");

__device__ inline float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ inline float gelu_grad(float x) {
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

// Shared-memory rows are padded by one float so threads reading different rows hit different banks.
template <int DH> struct ExpertTileSmem {
    static constexpr int ld_row = DH + 1, ld_chunk = kExpertChunk + 1;
    static constexpr int rows_floats = kSimtTileRows * ld_row;   // one (tile rows × dh) matrix
    static constexpr int chunk_floats = kExpertChunk * ld_row;     // one (chunk × dh) matrix
    static constexpr int hidden_floats = kSimtTileRows * ld_chunk;  // one (tile rows × chunk) matrix
};

// Loads `rows` rows of width DH into shared memory (zeros below them). Row r comes from
// src + row_offset(r); the gather from the sub-token matrix and the plain copy both use this.
template <int DH, class RowOffset>
__device__ void load_tile_rows(float* dst, const floatX* src, int rows, RowOffset row_offset) {
    constexpr int ld = ExpertTileSmem<DH>::ld_row;
    for (int i = threadIdx.x; i < kSimtTileRows * DH; i += blockDim.x) {
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

// Forward, one block per kSimtTileRows rows (blockIdx.y-th part of planner tile blockIdx.x):  o[p] = V^T GELU(K x[row(p)])  (unweighted).
template <int DH>
__global__ void __launch_bounds__(kExpertThreads) expert_forward_kernel(floatX* o, const floatX* x, int64_t ld,
                                                                        const floatX* K, const floatX* V,
                                                                        const RoutingPlan plan, int E, int F) {
    using S = ExpertTileSmem<DH>;
    extern __shared__ float smem[];
    float *Xs = smem, *Ks = Xs + S::rows_floats, *Vs = Ks + S::chunk_floats, *As = Vs + S::chunk_floats;
    const int tile = blockIdx.x;
    if (tile >= *plan.num_tiles) return;
    const int g = plan.tile_group[tile], h = g / E, p0 = plan.tile_start[tile] + blockIdx.y * kSimtTileRows;
    const int rows = min(kSimtTileRows, plan.group_offset[g + 1] - p0);
    if (rows <= 0) return;
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

// Input gradient, one block per kSimtTileRows rows:  recompute S = X K_c^T; dA = dO V_c^T; dS = dA ⊙ GELU'(S);
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
    const int g = plan.tile_group[tile], h = g / E, p0 = plan.tile_start[tile] + blockIdx.y * kSimtTileRows;
    const int rows = min(kSimtTileRows, plan.group_offset[g + 1] - p0);
    if (rows <= 0) return;
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
    for (int p0 = plan.group_offset[g]; p0 < plan.group_offset[g + 1]; p0 += kSimtTileRows) {
        const int rows = min(kSimtTileRows, plan.group_offset[g + 1] - p0);
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
// Tensor-core versions (bf16). Shared tiles are bf16 rows padded by 8 elements (16 bytes), which
// keeps ldmatrix free of bank conflicts; cp.async fills them, the next K/V chunk (or the next tile of
// rows) landing while the tensor cores work on the current one (double buffering).
//   forward, input gradient: one block of 4 warps per planner tile of kExpertTileRows = 128 rows;
//     warp w owns rows 32w..32w+31 and keeps their (32 × dh) fp32 accumulator in registers; the
//     hidden chunk goes from the first product to the second in registers. Two blocks per SM.
//   weight gradient: one block of 8 warps per (group, FC-wide slice of fe), FC up to 128, walking the
//     group's copies 64 rows at a time; its (FC × dh) dK and dV accumulators stay in registers.
//     In sm_90a builds the same kernel runs on wgmma (weight_backward_wgmma) for FC = 128, dh 64/128.

using bf16 = __nv_bfloat16;
constexpr int kMmaRowsPerWarp = 32;
constexpr int kMmaTileThreads = kExpertTileRows / kMmaRowsPerWarp * 32;
constexpr int kMmaWeightThreads = 256;
constexpr int kMmaWeightRows = 64;  // rows per step of the weight-gradient walk
static_assert(kExpertTileRows % kMmaRowsPerWarp == 0, "whole warps per planner tile");

// GELU and its derivative in the tensor-core kernels, whose results are rounded to bf16 next:
// Φ(x) = (1 + erf(x/√2)) / 2 through Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, far under bf16's
// 4e-3), which shares its exp(−x²/2) with the density φ: two MUFU operations and a dozen FMAs, where
// erff alone costs ~25 instructions and gelu would leave the forward kernel bound by its ALU work.
__device__ inline float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ inline float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// Φ(x), with e = exp(−x²/2) returned for the density.
__device__ inline float normal_cdf(float x, float& e) {
    e = ex2_approx(x * x * -0.72134752044448170f);  // −log2(e) / 2
    const float t = rcp_approx(fmaf(0.23164190f, fabsf(x), 1.f));  // 1 / (1 + p |x| / √2)
    const float tail = e * t * fmaf(fmaf(fmaf(fmaf(0.5307027145f, t, -0.7265760135f), t, 0.7107068705f), t,
                                         -0.142248368f), t, 0.127414796f);  // (1 − erf(|x|/√2)) / 2
    return x >= 0.f ? 1.f - tail : tail;
}
__device__ inline float gelu_fast(float x) {
    float e;
    return x * normal_cdf(x, e);
}
__device__ inline float gelu_grad_fast(float x) {
    float e;
    const float cdf = normal_cdf(x, e);
    return fmaf(x * 0.3989422804014327f, e, cdf);  // Φ(x) + x φ(x)
}

// Issues the cp.async copies of N_ROWS rows of DH bf16 into a padded shared tile: row r < rows from
// src + row_offset(r), zeros from `rows` on. Thread i copies 16-byte column i % (DH/8) of every
// (NT / (DH/8))-th row, so a warp reads whole rows.
template <int DH, int N_ROWS, int NT, class RowOffset>
__device__ inline void load_rows_async(bf16* dst, const bf16* src, int rows, RowOffset row_offset) {
    constexpr int vecs = DH / 8, ld = DH + 8, step = NT / vecs;
    static_assert(NT % vecs == 0, "whole rows per pass");
    const int r0 = threadIdx.x / vecs, v = threadIdx.x % vecs;
#pragma unroll
    for (int j = 0; j < (N_ROWS + step - 1) / step; j++) {
        const int r = r0 + j * step;
        if (N_ROWS % step != 0 && r >= N_ROWS) break;
        const bool valid = r < rows;
        cp_async_16(dst + r * ld + v * 8, valid ? src + row_offset(r) + v * 8 : src, valid);
    }
}
// The same for N_ROWS contiguous rows (a chunk of K or V).
template <int DH, int N_ROWS, int NT>
__device__ inline void load_chunk_async(bf16* dst, const bf16* src) {
    constexpr int vecs = DH / 8, ld = DH + 8, step = NT / vecs;
    static_assert(NT % vecs == 0, "whole rows per pass");
    const int r0 = threadIdx.x / vecs, v = threadIdx.x % vecs;
    dst += r0 * ld + v * 8;
    src += r0 * DH + v * 8;
#pragma unroll
    for (int j = 0; j < (N_ROWS + step - 1) / step; j++) {
        if (N_ROWS % step != 0 && r0 + j * step >= N_ROWS) break;
        cp_async_16(dst + j * step * ld, src + j * step * DH);
    }
}

// This warp's P (MT·16 rows from m0 × N columns from n0) = A B^T over k < KD, A an [m][k] and B an
// [n][k] shared tile.
template <int KD, int MT, int N>
__device__ inline void warp_mma_nt(float (&p)[MT][N / 8][4], const bf16* A, int lda, int m0, const bf16* B, int ldb,
                                   int n0) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < N / 8; n++)
#pragma unroll
            for (int i = 0; i < 4; i++) p[mt][n][i] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += 16) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) load_a(a[mt], A, lda, m0 + 16 * mt, k0);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            load_b_pair(b, B, ldb, n0 + 16 * np, k0);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma_bf16_16816(p[mt][2 * np], a[mt], b[0], b[1]);
                mma_bf16_16816(p[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// This warp's acc (MT·16 rows from m0 × N columns from n0) += A^T B over k < KD, A stored
// transposed ([k][m]) and B as [k][n].
template <int KD, int MT, int N>
__device__ inline void warp_mma_tn(float (&acc)[MT][N / 8][4], const bf16* At, int lda, int m0, const bf16* B, int ldb,
                                   int n0) {
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += 16) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) load_a_trans(a[mt], At, lda, m0 + 16 * mt, k0);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            load_b_pair_trans(b, B, ldb, n0 + 16 * np, k0);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma_bf16_16816(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma_bf16_16816(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// acc (MT·16 rows × DH) += Hd B, with Hd (MT·16 × KW) this warp's accumulators of an earlier product,
// packed to bf16 as A operands, and B a [KW][DH] shared tile.
template <int DH, int MT, int KW>
__device__ inline void warp_mma_hidden(float (&acc)[MT][DH / 8][4], const float (&hd)[MT][KW / 8][4], const bf16* B,
                                       int ldb) {
#pragma unroll
    for (int kk = 0; kk < KW / 16; kk++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            a[mt][0] = pack_bf16x2(hd[mt][2 * kk][0], hd[mt][2 * kk][1]);
            a[mt][1] = pack_bf16x2(hd[mt][2 * kk][2], hd[mt][2 * kk][3]);
            a[mt][2] = pack_bf16x2(hd[mt][2 * kk + 1][0], hd[mt][2 * kk + 1][1]);
            a[mt][3] = pack_bf16x2(hd[mt][2 * kk + 1][2], hd[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int np = 0; np < DH / 16; np++) {
            uint32_t b[4];
            load_b_pair_trans(b, B, ldb, np * 16, kk * 16);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma_bf16_16816(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma_bf16_16816(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// Writes a warp's (MT·16 × DH) accumulator rows to out[(p0 + m0 + row) · DH + col] as bf16, rows
// below `rows` only.
template <int DH, int MT>
__device__ inline void warp_store_rows(bf16* out, const float (&acc)[MT][DH / 8][4], int p0, int m0, int rows) {
    const int lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < DH / 8; nt++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int row = m0 + 16 * mt + gq + 8 * half;
                if (row < rows)
                    *reinterpret_cast<uint32_t*>(out + (int64_t)(p0 + row) * DH + nt * 8 + 2 * q) =
                        pack_bf16x2(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
            }
}

// Shared memory of the row-tile kernels: `row_tiles` (kExpertTileRows × dh) tiles, then two stages
// of `chunk_tiles` (FC × dh) chunks.
template <int DH, int FC> struct MmaTileSmem {
    static constexpr int ld = DH + 8, rows_elems = kExpertTileRows * ld, chunk_elems = FC * ld;
    static constexpr size_t bytes(int row_tiles, int chunk_tiles) {
        return (row_tiles * rows_elems + 2 * chunk_tiles * chunk_elems) * sizeof(bf16);
    }
};

// Forward: o[p] = V^T GELU(K x[row(p)]) for the tile's copies, fe in chunks of FC:
//   S = X K_c^T,  O += GELU(S) V_c      (S and GELU(S) in registers).
template <int DH, int FC>
__global__ void __launch_bounds__(kMmaTileThreads, 2)
    expert_forward_mma_kernel(bf16* o, const bf16* x, int64_t ld, const bf16* K, const bf16* V, const RoutingPlan plan,
                              int E, int F) {
    using S = MmaTileSmem<DH, FC>;
    constexpr int MT = kMmaRowsPerWarp / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Xs = reinterpret_cast<bf16*>(smem_raw);  // (tile rows, dh)
    bf16* Ks = Xs + S::rows_elems;                  // 2 × (FC, dh)
    bf16* Vs = Ks + 2 * S::chunk_elems;             // 2 × (FC, dh)
    const int tile = blockIdx.x;
    if (tile >= *plan.num_tiles) return;
    const int g = plan.tile_group[tile], h = g / E, p0 = plan.tile_start[tile];
    const int rows = min(kExpertTileRows, plan.group_offset[g + 1] - p0);
    const bf16 *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int m0 = threadIdx.x / 32 * kMmaRowsPerWarp;
    auto load_chunk = [&](int c) {
        load_chunk_async<DH, FC, kMmaTileThreads>(Ks + (c % 2) * S::chunk_elems, Kg + (int64_t)c * FC * DH);
        load_chunk_async<DH, FC, kMmaTileThreads>(Vs + (c % 2) * S::chunk_elems, Vg + (int64_t)c * FC * DH);
    };

    load_rows_async<DH, kExpertTileRows, kMmaTileThreads>(
        Xs, x, rows, [&](int i) { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; });
    load_chunk(0);
    cp_async_commit();
    float acc[MT][DH / 8][4] = {};
    for (int c = 0; c < F / FC; c++) {
        cp_async_wait<0>();
        __syncthreads();  // chunk c has landed, and every warp is done with chunk c − 1, whose stage is refilled now
        if (c + 1 < F / FC) load_chunk(c + 1);
        cp_async_commit();
        float s[MT][FC / 8][4];
        warp_mma_nt<DH, MT, FC>(s, Xs, S::ld, m0, Ks + (c % 2) * S::chunk_elems, S::ld, 0);  // S = X K_c^T
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < FC / 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) s[mt][n][i] = gelu_fast(s[mt][n][i]);
        warp_mma_hidden<DH, MT, FC>(acc, s, Vs + (c % 2) * S::chunk_elems, S::ld);  // O += A V_c
    }
    warp_store_rows<DH, MT>(o, acc, p0, m0, rows);
}

// Input gradient, fe in chunks of FC: recompute S = X K_c^T; dA = dO V_c^T; dS = dA ⊙ GELU'(S);
// dX += dS K_c.  Written per copy; gather_input_grad sums a row's copies.
template <int DH, int FC>
__global__ void __launch_bounds__(kMmaTileThreads, 2)
    expert_input_backward_mma_kernel(bf16* dx_copy, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K,
                                     const bf16* V, const RoutingPlan plan, int E, int F) {
    using S = MmaTileSmem<DH, FC>;
    constexpr int MT = kMmaRowsPerWarp / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Xs = reinterpret_cast<bf16*>(smem_raw);  // (tile rows, dh)
    bf16* dOs = Xs + S::rows_elems;                 // (tile rows, dh)
    bf16* Ks = dOs + S::rows_elems;                 // 2 × (FC, dh)
    bf16* Vs = Ks + 2 * S::chunk_elems;             // 2 × (FC, dh)
    const int tile = blockIdx.x;
    if (tile >= *plan.num_tiles) return;
    const int g = plan.tile_group[tile], h = g / E, p0 = plan.tile_start[tile];
    const int rows = min(kExpertTileRows, plan.group_offset[g + 1] - p0);
    const bf16 *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int m0 = threadIdx.x / 32 * kMmaRowsPerWarp;
    auto load_chunk = [&](int c) {
        load_chunk_async<DH, FC, kMmaTileThreads>(Ks + (c % 2) * S::chunk_elems, Kg + (int64_t)c * FC * DH);
        load_chunk_async<DH, FC, kMmaTileThreads>(Vs + (c % 2) * S::chunk_elems, Vg + (int64_t)c * FC * DH);
    };

    load_rows_async<DH, kExpertTileRows, kMmaTileThreads>(
        Xs, x, rows, [&](int i) { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; });
    load_rows_async<DH, kExpertTileRows, kMmaTileThreads>(dOs, d_o + (int64_t)p0 * DH, rows,
                                                          [](int i) { return (int64_t)i * DH; });
    load_chunk(0);
    cp_async_commit();
    float acc[MT][DH / 8][4] = {};
    for (int c = 0; c < F / FC; c++) {
        cp_async_wait<0>();
        __syncthreads();  // chunk c has landed, and every warp is done with chunk c − 1, whose stage is refilled now
        if (c + 1 < F / FC) load_chunk(c + 1);
        cp_async_commit();
        const bf16 *Kc = Ks + (c % 2) * S::chunk_elems, *Vc = Vs + (c % 2) * S::chunk_elems;
        float s[MT][FC / 8][4], da[MT][FC / 8][4];
        warp_mma_nt<DH, MT, FC>(s, Xs, S::ld, m0, Kc, S::ld, 0);
        warp_mma_nt<DH, MT, FC>(da, dOs, S::ld, m0, Vc, S::ld, 0);
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < FC / 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) da[mt][n][i] *= gelu_grad_fast(s[mt][n][i]);
        warp_mma_hidden<DH, MT, FC>(acc, da, Kc, S::ld);  // dX += dS K_c
    }
    warp_store_rows<DH, MT>(dx_copy, acc, p0, m0, rows);
}

// Warp layouts of the weight-gradient kernel for an FC-wide slice of fe (FC = 32, 64 or 128):
//   row products S, dA (64 rows × FC): s_warps_m × s_warps_n warps of (s_rows × s_cols);
//   reductions dK, dV (FC × dh):        r_warps_f × r_warps_d warps of (r_rows × r_cols), the rest idle
//                                        (only when FC·dh is small).
template <int DH, int FC> struct MmaWeightLayout {
    static constexpr int warps = kMmaWeightThreads / 32;
    static constexpr int s_warps_n = FC / 16 < 4 ? FC / 16 : 4, s_warps_m = warps / s_warps_n;
    static constexpr int s_rows = kMmaWeightRows / s_warps_m, s_cols = FC / s_warps_n;
    static constexpr int r_warps_d = DH / 16 < 2 ? DH / 16 : 2;
    static constexpr int r_warps_f = FC / 16 < warps / r_warps_d ? FC / 16 : warps / r_warps_d;
    static constexpr int r_rows = FC / r_warps_f, r_cols = DH / r_warps_d;
    static_assert(s_rows % 16 == 0 && s_cols % 16 == 0 && r_rows % 16 == 0 && r_cols % 16 == 0, "whole mma tiles");
    // shared memory: K, V slices (FC × dh); two stages of X, dO (64 × dh); A, dS (64 × FC)
    static constexpr int ld = DH + 8, ld_hidden = FC + 8;
    static constexpr int slice_elems = FC * ld, rows_elems = kMmaWeightRows * ld, hidden_elems = kMmaWeightRows * ld_hidden;
    static constexpr size_t bytes_mma = (2 * slice_elems + 4 * rows_elems + 2 * hidden_elems) * sizeof(bf16);
    // the wgmma version (sm_90a builds): unpadded swizzled tiles, three stages of X, dO, and 1 KB to
    // align the tiles to 1024 bytes
    static constexpr bool on_wgmma = FC == 128 && (DH == 64 || DH == 128);
    static constexpr size_t bytes_wgmma = (2 * FC * DH + 6 * kMmaWeightRows * DH + 2 * FC * kMmaWeightRows) * sizeof(bf16) + 1024;
    static constexpr size_t bytes = on_wgmma && bytes_wgmma > bytes_mma ? bytes_wgmma : bytes_mma;
};

// ---------------------------------------------------------------------------------------------
// Warpgroup matrix multiply (wgmma, sm_90a only: compiled where __CUDA_ARCH_FEAT_SM90_ALL is
// defined). A warpgroup of 4 warps computes D (64 × N, fp32 in registers) += A (64 × 16) B (16 × N)
// with A and B read from shared memory through descriptors. Operand tiles use the 128-byte swizzle:
// a tile is cut into blocks of 64 columns (128 bytes per row); within a block, row r's 16-byte
// chunk c sits at chunk c ^ (r % 8), and blocks are 1024-byte aligned. Such a (rows × cols) tile is
// a K-major operand when its columns run along k, an MN-major one (transposed) when its rows do.
// Accumulator fragments: d[i] is (row 16·warp + lane/4 + 8·((i/2) % 2), col 8·(i/4) + 2·(lane%4) + i%2).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LMOE_HAS_WGMMA 1

// The cp.async copies of N_ROWS rows of DH bf16 into a 128B-swizzled shared tile (zeros from `rows`
// on), as load_rows_async.
template <int DH, int N_ROWS, int NT, class RowOffset>
__device__ inline void load_rows_swizzled_async(bf16* dst, const bf16* src, int rows, RowOffset row_offset) {
    constexpr int vecs = DH / 8, step = NT / vecs;
    static_assert(NT % vecs == 0 && N_ROWS % step == 0, "whole rows per pass");
    const int r0 = threadIdx.x / vecs, v = threadIdx.x % vecs;
    unsigned char* block = reinterpret_cast<unsigned char*>(dst) + v / 8 * N_ROWS * 128;
#pragma unroll
    for (int j = 0; j < N_ROWS / step; j++) {
        const int r = r0 + j * step;
        const bool valid = r < rows;
        cp_async_16(block + r * 128 + ((v % 8) ^ (r % 8)) * 16, valid ? src + row_offset(r) + v * 8 : src, valid);
    }
}

// Descriptor of a 128B-swizzled operand starting at `tile`: lbo = bytes between 64-column blocks
// (MN-major), sbo = bytes between groups of 8 rows.
__device__ inline uint64_t wgmma_desc(const void* tile, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((smem_address(tile) & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 | (uint64_t)(sbo >> 4) << 32 |
           1ull << 62;
}
__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int n>
__device__ inline void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(n) : "memory"); }
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue and wait.
template <int N>
__device__ inline void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared-memory writes of ordinary stores (and cp.async) become visible to wgmma's reads.
__device__ inline void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int TRANS_B>
__device__ inline void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, %35;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}
template <int TRANS_B>
__device__ inline void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, %67;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}

// Weight gradients on wgmma for an FC = 128 slice of fe and dh = 64 or 128: two warpgroups, warpgroup
// w owning fe rows 64w..64w+63 of the slice. Per 64 copies (three stages of X, dO in flight):
//   S, dA (64 × 64 fe, registers) = X K_w^T, dO V_w^T             (X, dO K-major)
//   A^T, dS^T (64 fe × 64 rows) → shared memory, swizzled
//   dV_w += A^T dO,  dK_w += dS^T X       (64 × dh accumulators; dO, X read MN-major, same tiles)
// The block meets once per 64 rows (they have landed; the stage of the previous rows is refilled);
// a warpgroup meets only itself between writing A^T, dS^T and reading them.
template <int DH, int FC>
__device__ inline void weight_backward_wgmma(float* dK, float* dV, const bf16* d_o, const bf16* x, int64_t ld,
                                             const bf16* K, const bf16* V, const RoutingPlan& plan, int E, int F,
                                             unsigned char* smem_raw) {
    static_assert(FC == 128 && (DH == 64 || DH == 128), "wgmma path: fe slice 128, dh 64 or 128");
    constexpr int BR = 64, NT = kMmaWeightThreads, STAGES = 3;
    constexpr int slice_elems = FC * DH, rows_elems = BR * DH, hidden_elems = FC * BR;
    constexpr uint32_t slice_block = FC * 128, rows_block = BR * 128;  // bytes of one 64-column block
    unsigned char* smem = smem_raw + ((1024 - (smem_address(smem_raw) & 1023)) & 1023);
    bf16* Ks = reinterpret_cast<bf16*>(smem);  // (FC, dh) swizzled
    bf16* Vs = Ks + slice_elems;                // (FC, dh)
    bf16* Xs = Vs + slice_elems;                // STAGES × (64, dh)
    bf16* dOs = Xs + STAGES * rows_elems;       // STAGES × (64, dh)
    bf16* At = dOs + STAGES * rows_elems;       // (FC, 64): A^T
    bf16* dSt = At + hidden_elems;              // (FC, 64): dS^T
    const int g = blockIdx.y, h = g / E, f0 = blockIdx.x * FC;
    const int begin = plan.group_offset[g], end = plan.group_offset[g + 1];
    const int64_t wofs = ((int64_t)g * F + f0) * DH;
    const int wg = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    auto load_rows = [&](int p0, int stage) {
        const int rows = min(BR, end - p0);
        load_rows_swizzled_async<DH, BR, NT>(Xs + stage * rows_elems, x, rows,
                                             [&](int i) { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; });
        load_rows_swizzled_async<DH, BR, NT>(dOs + stage * rows_elems, d_o + (int64_t)p0 * DH, rows,
                                             [](int i) { return (int64_t)i * DH; });
    };
    const auto contiguous = [](int i) { return (int64_t)i * DH; };
    load_rows_swizzled_async<DH, FC, NT>(Ks, K + wofs, FC, contiguous);
    load_rows_swizzled_async<DH, FC, NT>(Vs, V + wofs, FC, contiguous);
    if (begin < end) load_rows(begin, 0);
    cp_async_commit();
    if (begin + BR < end) load_rows(begin + BR, 1);
    cp_async_commit();

    // Descriptors: K-major operands step 32 bytes per k16 inside a 64-column block; MN-major ones 16 rows.
    auto kmajor = [](const bf16* tile, uint32_t block_bytes, int k) {
        return wgmma_desc(reinterpret_cast<const unsigned char*>(tile) + (k / 4) * block_bytes + (k % 4) * 32, 16, 1024);
    };
    auto mnmajor = [](const bf16* tile, int k) {
        return wgmma_desc(reinterpret_cast<const unsigned char*>(tile) + k * 16 * 128, rows_block, 1024);
    };
    const bf16 *Kw = Ks + wg * 64 * 64, *Vw = Vs + wg * 64 * 64;  // this warpgroup's 64 fe rows (block 0)
    const bf16 *Atw = At + wg * 64 * BR, *dStw = dSt + wg * 64 * BR;
    float acc_k[DH / 2], acc_v[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; i++) acc_k[i] = acc_v[i] = 0.f;
    for (int p0 = begin, it = 0; p0 < end; p0 += BR, it++) {
        cp_async_wait<1>();
        fence_proxy_async();
        __syncthreads();  // these rows have landed, and both warpgroups are done with the previous ones
        if (p0 + 2 * BR < end) load_rows(p0 + 2 * BR, (it + 2) % STAGES);  // into the stage of rows it - 1
        cp_async_commit();
        const bf16 *Xt = Xs + it % STAGES * rows_elems, *dOt = dOs + it % STAGES * rows_elems;
        float s[32], da[32];  // no initial values: the first product overwrites them
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < DH / 16; k++) wgmma_m64n64k16<0>(s, kmajor(Xt, rows_block, k), kmajor(Kw, slice_block, k), k);
#pragma unroll
        for (int k = 0; k < DH / 16; k++) wgmma_m64n64k16<0>(da, kmajor(dOt, rows_block, k), kmajor(Vw, slice_block, k), k);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(s);
        wgmma_fence_operands(da);
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const int f = wg * 64 + 8 * (i / 4) + 2 * q + i % 2, r = 16 * warp + gq + 8 * (i / 2 % 2);
            const int at = f * 64 + (((r / 8) ^ (f % 8)) * 8) + r % 8;  // swizzled (FC, 64) bf16 tile
            float e;
            const float cdf = normal_cdf(s[i], e);
            At[at] = __float2bfloat16(s[i] * cdf);
            dSt[at] = __float2bfloat16(da[i] * fmaf(s[i] * 0.3989422804014327f, e, cdf));
        }
        fence_proxy_async();
        asm volatile("bar.sync %0, 128;" ::"r"(1 + wg) : "memory");  // this warpgroup's A^T, dS^T complete
        wgmma_fence_operands(acc_v);
        wgmma_fence_operands(acc_k);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BR / 16; k++) {
            if constexpr (DH == 128) {
                wgmma_m64n128k16<1>(acc_v, kmajor(Atw, 0, k), mnmajor(dOt, k), 1);
                wgmma_m64n128k16<1>(acc_k, kmajor(dStw, 0, k), mnmajor(Xt, k), 1);
            } else {
                wgmma_m64n64k16<1>(acc_v, kmajor(Atw, 0, k), mnmajor(dOt, k), 1);
                wgmma_m64n64k16<1>(acc_k, kmajor(dStw, 0, k), mnmajor(Xt, k), 1);
            }
        }
        wgmma_commit();
        wgmma_wait<0>();  // waiting here, not at the next rows, keeps ptxas from serializing the products
    }
    wgmma_fence_operands(acc_v);
    wgmma_fence_operands(acc_k);
#pragma unroll
    for (int i = 0; i < DH / 2; i += 2) {
        const int f = wg * 64 + 16 * warp + gq + 8 * (i / 2 % 2), c = 8 * (i / 4) + 2 * q;
        const int64_t at = wofs + (int64_t)f * DH + c;
        float2* dk = reinterpret_cast<float2*>(dK + at);
        float2* dv = reinterpret_cast<float2*>(dV + at);
        const float2 k_old = *dk, v_old = *dv;
        *dk = make_float2(k_old.x + acc_k[i], k_old.y + acc_k[i + 1]);
        *dv = make_float2(v_old.x + acc_v[i], v_old.y + acc_v[i + 1]);
    }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Weight gradients, one block per (FC-wide slice of fe, group) — slices fastest, so the blocks of a
// group run together and share its X, dO through L2 — walking the group's copies in order, so each
// gradient element has one owner and a fixed summation order (no atomics). Per 64 rows: recompute
// S = X K_c^T, dA = dO V_c^T; park A = GELU(S) and dS = dA ⊙ GELU'(S) in shared memory as bf16;
// then  dV_c += A^T dO,  dK_c += dS^T X.
template <int DH, int FC>
__global__ void __launch_bounds__(kMmaWeightThreads, 1)
    expert_weight_backward_mma_kernel(float* dK, float* dV, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K,
                                      const bf16* V, const RoutingPlan plan, int E, int F) {
    using L = MmaWeightLayout<DH, FC>;
    constexpr int BR = kMmaWeightRows, NT = kMmaWeightThreads;
    constexpr int S_MT = L::s_rows / 16, R_MT = L::r_rows / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
#if defined(LMOE_HAS_WGMMA)
    if constexpr (MmaWeightLayout<DH, FC>::on_wgmma) {
        weight_backward_wgmma<DH, FC>(dK, dV, d_o, x, ld, K, V, plan, E, F, smem_raw);
        return;
    }
#endif
    bf16* Ks = reinterpret_cast<bf16*>(smem_raw);  // (FC, dh)
    bf16* Vs = Ks + L::slice_elems;                 // (FC, dh)
    bf16* Xs = Vs + L::slice_elems;                 // 2 × (64, dh)
    bf16* dOs = Xs + 2 * L::rows_elems;             // 2 × (64, dh)
    bf16* As = dOs + 2 * L::rows_elems;             // (64, FC)
    bf16* dSs = As + L::hidden_elems;               // (64, FC)
    const int g = blockIdx.y, h = g / E, f0 = blockIdx.x * FC;
    const int begin = plan.group_offset[g], end = plan.group_offset[g + 1];
    const int64_t wofs = ((int64_t)g * F + f0) * DH;  // this slice of expert g's K, V, dK, dV
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const int sm0 = warp / L::s_warps_n * L::s_rows, sn0 = warp % L::s_warps_n * L::s_cols;
    const int rf0 = warp / L::r_warps_d * L::r_rows, rd0 = warp % L::r_warps_d * L::r_cols;
    const bool reducer = warp < L::r_warps_f * L::r_warps_d;
    auto load_rows = [&](int p0, int stage) {
        const int rows = min(BR, end - p0);
        load_rows_async<DH, BR, NT>(Xs + stage * L::rows_elems, x, rows,
                                    [&](int i) { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; });
        load_rows_async<DH, BR, NT>(dOs + stage * L::rows_elems, d_o + (int64_t)p0 * DH, rows,
                                    [](int i) { return (int64_t)i * DH; });
    };

    load_chunk_async<DH, FC, NT>(Ks, K + wofs);
    load_chunk_async<DH, FC, NT>(Vs, V + wofs);
    if (begin < end) load_rows(begin, 0);
    cp_async_commit();
    float acc_k[R_MT][L::r_cols / 8][4] = {}, acc_v[R_MT][L::r_cols / 8][4] = {};
    for (int p0 = begin, it = 0; p0 < end; p0 += BR, it++) {
        cp_async_wait<0>();
        __syncthreads();  // these rows have landed, and every warp is done with the previous step
        if (p0 + BR < end) load_rows(p0 + BR, (it + 1) % 2);
        cp_async_commit();
        const bf16 *Xt = Xs + (it % 2) * L::rows_elems, *dOt = dOs + (it % 2) * L::rows_elems;
        {
            float s[S_MT][L::s_cols / 8][4], da[S_MT][L::s_cols / 8][4];
            warp_mma_nt<DH, S_MT, L::s_cols>(s, Xt, L::ld, sm0, Ks, L::ld, sn0);
            warp_mma_nt<DH, S_MT, L::s_cols>(da, dOt, L::ld, sm0, Vs, L::ld, sn0);
#pragma unroll
            for (int mt = 0; mt < S_MT; mt++)
#pragma unroll
                for (int n = 0; n < L::s_cols / 8; n++)
#pragma unroll
                    for (int half = 0; half < 2; half++) {
                        const int r = sm0 + 16 * mt + gq + 8 * half, c = sn0 + n * 8 + 2 * q;
                        float e0, e1;
                        const float s0 = s[mt][n][2 * half], s1 = s[mt][n][2 * half + 1];
                        const float cdf0 = normal_cdf(s0, e0), cdf1 = normal_cdf(s1, e1);
                        *reinterpret_cast<uint32_t*>(As + r * L::ld_hidden + c) = pack_bf16x2(s0 * cdf0, s1 * cdf1);
                        *reinterpret_cast<uint32_t*>(dSs + r * L::ld_hidden + c) =
                            pack_bf16x2(da[mt][n][2 * half] * fmaf(s0 * 0.3989422804014327f, e0, cdf0),
                                        da[mt][n][2 * half + 1] * fmaf(s1 * 0.3989422804014327f, e1, cdf1));
                    }
        }
        __syncthreads();  // A and dS complete
        if (reducer) {
            warp_mma_tn<BR, R_MT, L::r_cols>(acc_v, As, L::ld_hidden, rf0, dOt, L::ld, rd0);  // dV_c += A^T dO
            warp_mma_tn<BR, R_MT, L::r_cols>(acc_k, dSs, L::ld_hidden, rf0, Xt, L::ld, rd0);  // dK_c += dS^T X
        }
    }
    if (!reducer) return;
#pragma unroll
    for (int mt = 0; mt < R_MT; mt++)
#pragma unroll
        for (int nt = 0; nt < L::r_cols / 8; nt++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int64_t at = wofs + (int64_t)(rf0 + 16 * mt + gq + 8 * half) * DH + rd0 + nt * 8 + 2 * q;
                float2* dk = reinterpret_cast<float2*>(dK + at);
                float2* dv = reinterpret_cast<float2*>(dV + at);
                const float2 k_old = *dk, v_old = *dv;
                *dk = make_float2(k_old.x + acc_k[mt][nt][2 * half], k_old.y + acc_k[mt][nt][2 * half + 1]);
                *dv = make_float2(v_old.x + acc_v[mt][nt][2 * half], v_old.y + acc_v[mt][nt][2 * half + 1]);
            }
}

// ---------------------------------------------------------------------------------------------
// Launchers. dh must be 16, 32, 64 or 128 and fe a multiple of 32 (expert_shape_supported).

inline bool expert_shape_supported(int dh, int fe) {
    return (dh == 16 || dh == 32 || dh == 64 || dh == 128) && fe % kExpertChunk == 0;
}

template <class Kernel, class... Args>
void launch_expert_kernel(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream, Args... args) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes));
    kernel<<<grid, threads, smem_bytes, stream>>>(args...);
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

// Calls f(std::integral_constant<int, FC>{}) with the widest fe chunk FC (128, 64 or 32, at most
// Widest) that divides fe.
template <int Widest, class F>
void dispatch_fe_chunk(int fe, F&& f) {
    if constexpr (Widest >= 128)
        if (fe % 128 == 0) return f(std::integral_constant<int, 128>{});
    if constexpr (Widest >= 64)
        if (fe % 64 == 0) return f(std::integral_constant<int, 64>{});
    f(std::integral_constant<int, 32>{});
}

constexpr bool kExpertsOnTensorCores = std::is_same<floatX, __nv_bfloat16>::value;
// fe chunk widths of the tensor-core kernels, measured best: the forward's 64 beats 32 by 9 %; the
// input gradient's 32 keeps two blocks per SM (64 would halve that and spill).
constexpr int kForwardChunk = 64, kInputBackwardChunk = 32, kWeightBackwardSlice = 128;

// o (copies, dh) for every copy of the plan.
inline void expert_forward(floatX* o, const floatX* x, int64_t ld, const floatX* K, const floatX* V,
                           const RoutingPlan& plan, int dh, int F, cudaStream_t stream) {
    const int max_tiles = plan.max_tiles, E = plan.E;
    dispatch_head_dim(dh, [&](auto head_dim) {
        constexpr int DH = decltype(head_dim)::value;
        if constexpr (kExpertsOnTensorCores) {
            dispatch_fe_chunk<kForwardChunk>(F, [&](auto chunk) {
                constexpr int FC = decltype(chunk)::value;
                launch_expert_kernel(expert_forward_mma_kernel<DH, FC>, dim3(max_tiles), kMmaTileThreads,
                                     MmaTileSmem<DH, FC>::bytes(1, 2), stream, o, x, ld, K, V, plan, E, F);
            });
        } else {
            using S = ExpertTileSmem<DH>;
            launch_expert_kernel(expert_forward_kernel<DH>, dim3(max_tiles, kExpertTileRows / kSimtTileRows),
                                 kExpertThreads, (S::rows_floats + 2 * S::chunk_floats + S::hidden_floats) * sizeof(float),
                                 stream, o, x, ld, K, V, plan, E, F);
        }
    });
}

// dx_copy (copies, dh) from d_o (copies, dh): each copy's input gradient, before gather_input_grad.
inline void expert_input_backward(floatX* dx_copy, const floatX* d_o, const floatX* x, int64_t ld, const floatX* K,
                                  const floatX* V, const RoutingPlan& plan, int dh, int F, cudaStream_t stream) {
    const int max_tiles = plan.max_tiles, E = plan.E;
    dispatch_head_dim(dh, [&](auto head_dim) {
        constexpr int DH = decltype(head_dim)::value;
        if constexpr (kExpertsOnTensorCores) {
            dispatch_fe_chunk<kInputBackwardChunk>(F, [&](auto chunk) {
                constexpr int FC = decltype(chunk)::value;
                launch_expert_kernel(expert_input_backward_mma_kernel<DH, FC>, dim3(max_tiles), kMmaTileThreads,
                                     MmaTileSmem<DH, FC>::bytes(2, 2), stream, dx_copy, d_o, x, ld, K, V, plan, E, F);
            });
        } else {
            using S = ExpertTileSmem<DH>;
            launch_expert_kernel(expert_input_backward_kernel<DH>, dim3(max_tiles, kExpertTileRows / kSimtTileRows),
                                 kExpertThreads,
                                 (2 * S::rows_floats + 2 * S::chunk_floats + S::hidden_floats) * sizeof(float), stream,
                                 dx_copy, d_o, x, ld, K, V, plan, E, F);
        }
    });
}

// dK, dV (H, E, fe, dh) fp32, accumulated, from d_o (copies, dh).
inline void expert_weight_backward(float* dK, float* dV, const floatX* d_o, const floatX* x, int64_t ld,
                                   const floatX* K, const floatX* V, const RoutingPlan& plan, int dh, int F,
                                   cudaStream_t stream) {
    const int H = plan.H, E = plan.E;
    dispatch_head_dim(dh, [&](auto head_dim) {
        constexpr int DH = decltype(head_dim)::value;
        if constexpr (kExpertsOnTensorCores) {
            dispatch_fe_chunk<kWeightBackwardSlice>(F, [&](auto slice) {
                constexpr int FC = decltype(slice)::value;
                launch_expert_kernel(expert_weight_backward_mma_kernel<DH, FC>, dim3(F / FC, H * E), kMmaWeightThreads,
                                     MmaWeightLayout<DH, FC>::bytes, stream, dK, dV, d_o, x, ld, K, V, plan, E, F);
            });
        } else {
            using S = ExpertTileSmem<DH>;
            launch_expert_kernel(expert_weight_backward_kernel<DH>, dim3(H * E, F / kExpertChunk), kExpertThreads,
                                 (2 * S::rows_floats + 2 * S::chunk_floats + 2 * S::hidden_floats) * sizeof(float),
                                 stream, dK, dV, d_o, x, ld, K, V, plan, E, F);
        }
    });
}

// Both gradients: dx_copy (copies, dh), and dK, dV (H, E, fe, dh) fp32 accumulated, from d_o (copies, dh).
inline void expert_backward(floatX* dx_copy, float* dK, float* dV, const floatX* d_o, const floatX* x, int64_t ld,
                            const floatX* K, const floatX* V, const RoutingPlan& plan, int dh, int F,
                            cudaStream_t stream) {
    expert_input_backward(dx_copy, d_o, x, ld, K, V, plan, dh, F, stream);
    expert_weight_backward(dK, dV, d_o, x, ld, K, V, plan, dh, F, stream);
}

}  // namespace lmoe
