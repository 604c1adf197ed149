// Warp tiles: row-major bf16 tiles in shared memory, each row padded by 8 elements (16 bytes), which
// keeps ldmatrix free of bank conflicts, and what the kernels do with them:
//   load_rows_async, load_chunk_async   a block fills a tile with cp.async (gathered rows, or a
//                                       contiguous chunk), zero-filling rows past the valid ones;
//   warp_mma (warp_mma_nt, warp_mma_tn) a warp multiplies two tiles on mma.sync (tc/mma.cuh), its
//                                       (MT·16 × N) product or accumulator in registers;
//   warp_mma_hidden                     a warp multiplies its registers (an earlier product, packed to
//                                       bf16 as A operands) by a tile: a hidden activation goes from
//                                       one matmul to the next without leaving registers;
//   warp_store_rows                     a warp writes its accumulator rows to global memory as bf16.
// Users: the LatentMoE expert kernels (moe/latent/), the router (moe/router.cuh) and flash attention
// (dense/attention.cuh). The grouped GEMMs (moe/grouped/) share the fragment loads and mma.sync of
// tc/mma.cuh but keep their own loops (fixed 128-wide tiles, a slice of fragments loaded one slice
// ahead). One loop for every cp.async fill here, in tc/wgmma.cuh and
// in the grouped GEMMs was tried: the compiler then schedules the kernels differently, so each fill
// keeps its own short loop.
#pragma once
#include <cstdint>

#include "tc/mma.cuh"

namespace lmoe {

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

// This warp's acc (MT·16 rows from m0 × N columns from n0) += A B over k < KD, from an A tile
// stored [m][k] (or [k][m], A_TRANS) and a B tile stored [n][k] (or [k][n], B_TRANS). Per 16-deep
// step the warp loads its MT A operands, then one B pair at a time, each used by MT products at once.
template <int KD, int MT, int N, bool A_TRANS, bool B_TRANS>
__device__ inline void warp_mma(float (&acc)[MT][N / 8][4], const bf16* A, int lda, int m0, const bf16* B, int ldb,
                                int n0) {
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += 16) {
        uint32_t a[MT][4];
        load_a_tiles<MT, A_TRANS>(a, A, lda, m0, k0);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            load_b_pair<B_TRANS>(b, B, ldb, n0 + 16 * np, k0);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) mma_bf16_16816_pair(acc[mt][2 * np], acc[mt][2 * np + 1], a[mt], b);
        }
    }
}

// This warp's P (MT·16 rows from m0 × N columns from n0) = A B^T, a fresh product of an [m][k] and
// an [n][k] tile.
template <int KD, int MT, int N>
__device__ inline void warp_mma_nt(float (&p)[MT][N / 8][4], const bf16* A, int lda, int m0, const bf16* B, int ldb,
                                   int n0) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < N / 8; n++)
#pragma unroll
            for (int i = 0; i < 4; i++) p[mt][n][i] = 0.f;
    warp_mma<KD, MT, N, false, false>(p, A, lda, m0, B, ldb, n0);
}

// This warp's acc (MT·16 rows from m0 × N columns from n0) += A^T B, A stored transposed ([k][m])
// and B as [k][n]: a reduction over the tiles' rows.
template <int KD, int MT, int N>
__device__ inline void warp_mma_tn(float (&acc)[MT][N / 8][4], const bf16* At, int lda, int m0, const bf16* B, int ldb,
                                   int n0) {
    warp_mma<KD, MT, N, true, true>(acc, At, lda, m0, B, ldb, n0);
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
            load_b_pair<true>(b, B, ldb, np * 16, kk * 16);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) mma_bf16_16816_pair(acc[mt][2 * np], acc[mt][2 * np + 1], a[mt], b);
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

}  // namespace lmoe
