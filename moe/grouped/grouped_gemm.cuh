// Grouped expert GEMMs of the standard MoE (SPEC §2.2): the N·k routed copies, grouped by expert
// (moe/routing_plan.cuh's RoutingPlan with H = 1), go through their expert's two matrices:
//     pre = X_e W1_e^T      h = GELU(pre)      o = h W2_e^T                 forward (pre and h are kept)
//     dpre = (dO W2_e) ⊙ GELU'(pre)            dX = dpre W1_e               backward, per copy
//     dW2_e (+)= dO^T h                        dW1_e (+)= dpre^T X_e        backward, per expert
// X_e are the token rows the expert's copies came from, read straight from the token matrix through
// copy_row: the permuted copy of x is never written. W1: (E, f, d), W2: (E, d, f) floatX; dW1, dW2
// fp32, added to (+=, `accumulate`) or written (=, the first micro-batch of a step: every element,
// zeros for an expert without copies, so the gradients need no clearing before). This is the
// standard MoE, not the IO-aware one: the (copies × f) hidden activations pre and h go to global
// memory in the forward and are read back in the backward.
//
// Two kinds of kernels, both driven by device-side tile lists, so no count ever goes to the host:
//   row GEMMs (the four per-copy products): one block per (128 copies of one planner tile, all of one
//     expert; a tile of output columns); the block multiplies its rows by its expert's matrix.
//   weight-gradient GEMMs: one block per (expert, tile of its weight gradient), walking the expert's
//     copies in group order; each gradient element has one owner that sums in a fixed order (no
//     atomics), so the results are bitwise reproducible run to run.
//
// Three implementations of the same products; the launchers pick one:
//   wgmma (rows_gemm_wgmma_kernel, weight_grad_wgmma_kernel): Hopper's warpgroup MMA from 128B-swizzled
//     shared tiles, 128 × 256 output tiles; bf16 builds wherever device_has_wgmma() (an sm_90a build on
//     a compute capability 9.0 GPU), for every shape the launchers accept;
//   mma.sync (rows_gemm_mma_kernel, weight_grad_mma_kernel): m16n8k16 from ldmatrix-loaded padded
//     tiles, 128 × 128 output tiles; bf16 builds everywhere else (sm_90 builds, other GPUs);
//   SIMT (rows_gemm_simt_kernel, weight_grad_simt_kernel): the fp32 build (LMOE_FP32), a plain
//     shared-memory tiled kernel, so the math can be checked tightly against the CPU reference.
// The tensor-core kernels fill shared memory through a multistage pipeline (cp.async, TMA); the wgmma
// kernels' results leave through it as well, read back in 16-byte pieces along rows: bf16 for Store
// and Gelu; fp32 for the epilogues that read global memory before they write (GeluGrad, whose
// 8-byte stores meet 8 bytes of pre, and the weight gradients, whose (+)= moves 16 bytes). d and f
// must be multiples of 8 (16-byte row segments).
//
// Known limits (docs/perf/expert_kernels.md has the measurements): the mma.sync kernels' operand
// traffic leaves them bound by shared-memory and L2 bandwidth, well below the tensor-core ceiling. The
// wgmma kernels' operands are copied by the warpgroups that compute (by TMA from one of their
// threads, or by cp.async from all where rows are gathered or end with a group; a producer warpgroup
// copying by cp.async measured slower; no multicast within a cluster), each block reading its own
// from L2; their 193 KB of shared memory leave one block per SM, whose epilogue the SM does not
// overlap with math (the weight gradients of groups of ~1000 copies, 16 steps, run well below the rate
// of long groups; 128-wide tiles at two blocks per SM, and a persistent grid whose next tile's copies
// land during the epilogue, measured slower, docs/perf/expert_kernels.md); 256-wide tiles waste
// tensor work where f or d is not a multiple of 256. In all of them: dW1, whose X rows are gathered, is
// the slowest; and the weight gradients' fp32 traffic: every dW tile written (134 MB per matrix at
// p1), and read as well where they add (+=, the later micro-batches of a step), those reads issued a
// batch of pieces ahead of the writes (read_all_then_write).
//
// Shared with the LatentMoE kernels (moe/latent/): GELU (moe/gelu.cuh), the launch with a raised
// shared-memory limit (util/launch.cuh), the ldmatrix fragment loads and paired mma.sync of
// tc/mma.cuh, and the swizzled tile copies, descriptors, wgmma wrappers and epilogue of tc/wgmma.cuh. The
// mma.sync main loop is this file's own: it loads a whole 16-deep slice of fragments one slice ahead
// into registers, where tc/warp_tile.cuh's loops load one B pair next to its products.
#pragma once
#include <type_traits>

#include "util/cuda_utils.cuh"
#include "util/launch.cuh"
#include "moe/gelu.cuh"
#include "moe/routing_plan.cuh"
#include "tc/mma.cuh"
#include "tc/tma.cuh"
#include "tc/wgmma.cuh"

namespace lmoe {

// Row r of an operand: base + (index ? index[r] : r) · ld. With index = copy_row, the rows of the
// copies in group order are gathered from the token matrix.
template <class T>
struct Rows {
    const T* base;
    int64_t ld;
    const int* index;
    __device__ const T* row(int64_t r) const { return base + (index ? (int64_t)index[r] : r) * ld; }
};

// What a row GEMM writes for each (copy p, column n), with v = Σ_k A[p, k] B_e[k, n]:
//   Store:    out = v
//   Gelu:     out = v (pre), hidden = GELU(v) (h)
//   GeluGrad: out = v · GELU'(pre)  (dpre from dh)
enum class RowsEpilogue { Store, Gelu, GeluGrad };

// One row GEMM over a routing plan: out (copies, cols) = A (copies, K) · B_e, B_e the matrix of the
// copy's expert e: W_e^T for W (E, cols, K) (w_transposed), or W_e for W (E, K, cols).
template <class T>
struct RowsGemm {
    T* out;         // (copies, cols)
    T* hidden;      // Gelu only: (copies, cols)
    const T* pre;   // GeluGrad only: (copies, cols)
    Rows<T> a;      // (copies, K) in group order
    const T* w;     // (E, cols, K) or (E, K, cols)
    int K, cols;
    RoutingPlan plan;
};

// One weight-gradient GEMM: dw_e (rows_out, cols_out) (+)= Σ over copies p of expert e of
// a[p, :]^T b[p, :], a (copies, rows_out), b (copies, cols_out), copies in group order.
template <class T>
struct WeightGradGemm {
    float* dw;  // (E, rows_out, cols_out)
    Rows<T> a, b;
    int rows_out, cols_out;
    const int* group_offset;  // (E + 1)
    bool accumulate;          // dw += the sums, or dw = them (an expert without copies: zeros)
};

template <RowsEpilogue EPI, class T>
__device__ inline void store_rows_output(const RowsGemm<T>& p, int64_t at, float v) {
    if constexpr (EPI == RowsEpilogue::Store) {
        p.out[at] = from_float<T>(v);
    } else if constexpr (EPI == RowsEpilogue::Gelu) {
        p.out[at] = from_float<T>(v);
        p.hidden[at] = from_float<T>(gelu(v));
    } else {
        p.out[at] = from_float<T>(v * gelu_grad(to_float(p.pre[at])));
    }
}

// The mma.sync kernels' outputs (at, at + 1) of a row GEMM, as store_rows_output with the fast GELU:
// Store and Gelu, which only write.
template <RowsEpilogue EPI>
__device__ inline void store_rows_pair(const RowsGemm<bf16>& p, int64_t at, float v0, float v1) {
    static_assert(EPI != RowsEpilogue::GeluGrad, "GeluGrad reads pre: store_gelu_grad_pairs");
    *reinterpret_cast<uint32_t*>(p.out + at) = pack_bf16x2(v0, v1);
    if constexpr (EPI == RowsEpilogue::Gelu)
        *reinterpret_cast<uint32_t*>(p.hidden + at) = pack_bf16x2(gelu_fast(v0), gelu_fast(v1));
}

// The mma.sync kernel's GeluGrad outputs (at(j), at(j) + 1) for N accumulator pairs value(j) (at(j) < 0:
// pair j lies outside the output): out = value · GELU'(pre), the N pairs of pre read before any
// output is written.
template <int N, class At, class Value>
__device__ inline void store_gelu_grad_pairs(const RowsGemm<bf16>& p, At at, Value value) {
    read_all_then_write<N>(
        [&](int j) { return at(j) >= 0 ? *reinterpret_cast<const __nv_bfloat162*>(p.pre + at(j)) : __nv_bfloat162{}; },
        [&](int j, __nv_bfloat162 pre) {
            const float2 v = value(j);
            if (at(j) >= 0)
                *reinterpret_cast<uint32_t*>(p.out + at(j)) =
                    pack_bf16x2(v.x * gelu_grad_fast(__low2float(pre)), v.y * gelu_grad_fast(__high2float(pre)));
        });
}

// dw[at(j), at(j) + 1] (+)= value(j) for N accumulator pairs of the mma.sync weight gradient (at(j) < 0:
// pair j lies outside the gradient), all N 8-byte reads issued before the first write.
template <int N, class At, class Value>
__device__ inline void add_pairs(float* dw, bool accumulate, At at, Value value) {
    read_all_then_write<N>(
        [&](int j) { return accumulate && at(j) >= 0 ? *reinterpret_cast<const float2*>(dw + at(j)) : float2{}; },
        [&](int j, float2 old) {
            const float2 v = value(j);
            if (at(j) >= 0) *reinterpret_cast<float2*>(dw + at(j)) = make_float2(old.x + v.x, old.y + v.y);
        });
}

// The copies [p0, p0 + rows) of part `part` (of `part_rows` rows) of planner tile `tile`, and their
// expert g; rows <= 0 when the part lies past the tile's last copy.
struct TilePart {
    int g, p0, rows;
};
__device__ inline TilePart tile_part(const RoutingPlan& plan, int tile, int part, int part_rows) {
    const int g = plan.tile_group[tile], start = plan.tile_start[tile], p0 = start + part * part_rows;
    const int end = min(plan.group_offset[g + 1], start + kExpertTileRows);
    return {g, p0, min(part_rows, end - p0)};
}

// The block of a row GEMM: the copies [p0, p0 + rows) of part blockIdx.z (of `part_rows` copies) of
// planner tile blockIdx.y, its output columns from n0 = blockIdx.x · tile_cols on, and its expert g and
// g's matrix w; false when the tile is past the plan's or the part past the tile's last copy.
template <class T>
struct RowsBlock {
    int g, p0, rows, n0;
    const T* w;
};
template <class T>
__device__ inline bool rows_block(RowsBlock<T>& b, const RowsGemm<T>& p, int part_rows, int tile_cols) {
    if ((int)blockIdx.y >= *p.plan.num_tiles) return false;
    const TilePart part = tile_part(p.plan, blockIdx.y, blockIdx.z, part_rows);
    b = {part.g, part.p0, part.rows, (int)blockIdx.x * tile_cols, p.w + (int64_t)part.g * p.K * p.cols};
    return part.rows > 0;
}

// ---------------------------------------------------------------------------------------------
// fp32 (SIMT) kernels: 64 × 64 output tiles, 256 threads of 4 × 4 outputs, 16-deep steps through
// shared memory.

constexpr int kSimtGemmTile = 64, kSimtGemmDepth = 16, kSimtGemmThreads = 256;

// Row GEMM: block (column tile, planner tile, 64-row part of the planner tile).
template <RowsEpilogue EPI, bool W_TRANSPOSED>
__global__ void __launch_bounds__(kSimtGemmThreads) rows_gemm_simt_kernel(const RowsGemm<float> p) {
    __shared__ float As[kSimtGemmDepth][kSimtGemmTile + 1], Bs[kSimtGemmDepth][kSimtGemmTile + 1];
    RowsBlock<float> block;
    if (!rows_block(block, p, kSimtGemmTile, kSimtGemmTile)) return;
    const int p0 = block.p0, rows = block.rows, n0 = block.n0, K = p.K, cols = p.cols;
    const float* w = block.w;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // rows ty + 16i, columns tx + 16j
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += kSimtGemmDepth) {
        for (int i = threadIdx.x; i < kSimtGemmDepth * kSimtGemmTile; i += blockDim.x) {
            const int ka = i % kSimtGemmDepth, m = i / kSimtGemmDepth;  // A rows are contiguous in k
            As[ka][m] = m < rows && k0 + ka < K ? p.a.row(p0 + m)[k0 + ka] : 0.f;
            const int kb = W_TRANSPOSED ? i % kSimtGemmDepth : i / kSimtGemmTile;
            const int n = W_TRANSPOSED ? i / kSimtGemmDepth : i % kSimtGemmTile;
            const bool inside = n0 + n < cols && k0 + kb < K;
            Bs[kb][n] = !inside ? 0.f : W_TRANSPOSED ? w[(int64_t)(n0 + n) * K + k0 + kb] : w[(int64_t)(k0 + kb) * cols + n0 + n];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kSimtGemmDepth; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int r = ty + 16 * i, n = n0 + tx + 16 * j;
            if (r < rows && n < cols) store_rows_output<EPI>(p, (int64_t)(p0 + r) * cols + n, acc[i][j]);
        }
}

// Weight gradient: block (output tile, expert), copies summed in group order.
__global__ void __launch_bounds__(kSimtGemmThreads) weight_grad_simt_kernel(const WeightGradGemm<float> p) {
    __shared__ float As[kSimtGemmDepth][kSimtGemmTile + 1], Bs[kSimtGemmDepth][kSimtGemmTile + 1];
    const int g = blockIdx.y, tiles_n = (int)ceil_div(p.cols_out, kSimtGemmTile);
    const int m0 = blockIdx.x / tiles_n * kSimtGemmTile, n0 = blockIdx.x % tiles_n * kSimtGemmTile;
    const int begin = p.group_offset[g], end = p.group_offset[g + 1];
    if (begin == end && p.accumulate) return;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    for (int k0 = begin; k0 < end; k0 += kSimtGemmDepth) {
        for (int i = threadIdx.x; i < kSimtGemmDepth * kSimtGemmTile; i += blockDim.x) {
            const int kk = i / kSimtGemmTile, c = i % kSimtGemmTile;
            const bool copy = k0 + kk < end;
            As[kk][c] = copy && m0 + c < p.rows_out ? p.a.row(k0 + kk)[m0 + c] : 0.f;
            Bs[kk][c] = copy && n0 + c < p.cols_out ? p.b.row(k0 + kk)[n0 + c] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kSimtGemmDepth; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    float* dw = p.dw + (int64_t)g * p.rows_out * p.cols_out;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < p.rows_out && n < p.cols_out) {
                float& out = dw[(int64_t)m * p.cols_out + n];
                out = p.accumulate ? out + acc[i][j] : acc[i][j];
            }
        }
}

// ---------------------------------------------------------------------------------------------
// mma.sync kernels (bf16 without wgmma). A block computes a 128 × 128 output tile with 4 warps
// (2 × 2, each 64 × 64: 128 fp32 accumulators per thread), stepping kGemmDepth deep along the
// reduction.
// Operands are staged in shared memory in one of two shapes, both padded by 8 elements per row so
// ldmatrix is free of bank conflicts:
//   deep   [128 rows][depth k]: an operand stored k-contiguous (the copies' rows, W in the forward)
//   wide   [depth k][128 cols]: an operand stored column-contiguous (W in the backward, and both
//          operands of the weight gradients, whose reduction runs over copies)
// Two pipelines overlap memory and math (CUTLASS's multistage main loop): cp.async fills stage
// s + stages − 1 while the tensor cores work on stage s, and each warp loads the ldmatrix
// fragments of the next 16-deep slice while its mma.sync run on the current one.
// Depth and stages (of these kernels alone) are a tuning knob: 64 deep × 3 stages measured slightly
// faster on the p1 and p2 layers as a whole, but slower for some kernels (dx_copy at p2;
// docs/perf/single_gpu.md); 32 × 4 is the tested default.
#ifndef LMOE_GEMM_DEPTH
#define LMOE_GEMM_DEPTH 32
#define LMOE_GEMM_STAGES 4
#endif
constexpr int kGemmTile = 128, kGemmDepth = LMOE_GEMM_DEPTH, kGemmStages = LMOE_GEMM_STAGES, kGemmThreads = 128;
constexpr int kLdDeep = kGemmDepth + 8, kLdWide = kGemmTile + 8;
constexpr int kGemmOperandElems =
    kGemmTile * kLdDeep > kGemmDepth * kLdWide ? kGemmTile * kLdDeep : kGemmDepth * kLdWide;
constexpr size_t kGemmSmemBytes = (size_t)kGemmStages * 2 * kGemmOperandElems * sizeof(bf16);
constexpr int kRowsPerThread = kGemmTile * kGemmDepth / 8 / kGemmThreads;  // 16-byte segments of a tile per thread
static_assert(kGemmDepth % 32 == 0 && kGemmStages >= 2, "an even number of 16-deep slices per stage");

// Issues the copies of a deep tile: this thread's tile rows r = threadIdx.x / (depth/8) + j·step
// come from row[j] (null: a zero row), k from k0; columns at or past K read as zeros.
__device__ inline void load_deep_tile(bf16* s, const bf16* const (&row)[kRowsPerThread], int k0, int K, const bf16* any) {
    constexpr int segs = kGemmDepth / 8, step = kGemmThreads / segs;
    const int seg = threadIdx.x % segs, k = k0 + seg * 8;
#pragma unroll
    for (int j = 0; j < kRowsPerThread; j++) {
        const int r = threadIdx.x / segs + step * j;
        const bool valid = row[j] != nullptr && k < K;
        cp_async_16(s + r * kLdDeep + seg * 8, valid ? row[j] + k : any, valid);
    }
}

// Issues the copies of a wide tile: this thread's tile rows i = threadIdx.x / 16 + j·step are the
// operand rows row[j] (base + row[j]·ld; negative: a zero row), columns col0..col0+127; columns at
// or past cols read as zeros.
__device__ inline void load_wide_tile(bf16* s, const bf16* base, int64_t ld, const int64_t (&row)[kRowsPerThread],
                                      int col0, int cols) {
    constexpr int step = kGemmThreads / 16;
    const int seg = threadIdx.x % 16, c = col0 + seg * 8;
#pragma unroll
    for (int j = 0; j < kRowsPerThread; j++) {
        const int i = threadIdx.x / 16 + step * j;
        const bool valid = row[j] >= 0 && c < cols;
        cp_async_16(s + i * kLdWide + seg * 8, valid ? base + row[j] * ld + c : base, valid);
    }
}

// One warp's operands of a 16-deep slice: A for its 64 rows, B for its 64 columns (pairs of 8).
struct WarpFragments {
    uint32_t a[4][4], b[4][4];
};

// A is deep ([m][k]) or wide ([k][m]), B deep ([n][k]) or wide ([k][n]).
template <bool A_DEEP, bool B_DEEP>
__device__ inline void load_fragments(WarpFragments& f, const bf16* sa, const bf16* sb, int wm, int wn, int k0) {
    load_a_tiles<4, !A_DEEP>(f.a, sa, A_DEEP ? kLdDeep : kLdWide, wm, k0);
    load_b_pairs<4, !B_DEEP>(f.b, sb, B_DEEP ? kLdDeep : kLdWide, wn, k0);
}

// acc (this warp's 64 × 64) += A B over one slice.
__device__ inline void warp_mma_slice(float (&acc)[4][8][4], const WarpFragments& f) {
#pragma unroll
    for (int np = 0; np < 4; np++)
#pragma unroll
        for (int mt = 0; mt < 4; mt++) mma_bf16_16816_pair(acc[mt][2 * np], acc[mt][2 * np + 1], f.a[mt], f.b[np]);
}

// The pipelined reduction of one block over `steps` steps; load(stage, step) issues step's copies
// into stage, and is called for steps 0, 1, 2, ... in order.
template <bool A_DEEP, bool B_DEEP, class Load>
__device__ inline void gemm_mainloop(float (&acc)[4][8][4], bf16* smem, int steps, Load load) {
    constexpr int slices = kGemmDepth / 16;
    const int warp = threadIdx.x / 32, wm = warp / 2 * 64, wn = warp % 2 * 64;
    auto stage = [&](int step) { return smem + (step % kGemmStages) * 2 * kGemmOperandElems; };
#pragma unroll
    for (int s = 0; s < kGemmStages - 1; s++) {
        if (s < steps) load(s, s);
        cp_async_commit();
    }
    cp_async_wait<kGemmStages - 2>();
    __syncthreads();
    WarpFragments frag[2];
    load_fragments<A_DEEP, B_DEEP>(frag[0], stage(0), stage(0) + kGemmOperandElems, wm, wn, 0);
    for (int step = 0; step < steps; step++) {
        const bf16* sa = stage(step);
#pragma unroll
        for (int slice = 0; slice < slices; slice++) {
            if (slice == slices - 1) {
                // Step + 1 has landed, and every warp has read its last fragments of the stage that
                // the next step refills.
                cp_async_wait<kGemmStages - 2>();
                __syncthreads();
                sa = stage(step + 1);
            }
            load_fragments<A_DEEP, B_DEEP>(frag[(slice + 1) % 2], sa, sa + kGemmOperandElems, wm, wn,
                                           (slice + 1) % slices * 16);
            if (slice == 0) {
                const int fill = step + kGemmStages - 1;
                if (fill < steps) load(fill % kGemmStages, fill);
                cp_async_commit();
            }
            warp_mma_slice(acc, frag[slice % 2]);
        }
    }
}

// Row GEMM on mma.sync: block (column tile, planner tile, 128-row part of the planner tile).
template <RowsEpilogue EPI, bool W_TRANSPOSED>
__global__ void __launch_bounds__(kGemmThreads) rows_gemm_mma_kernel(const RowsGemm<bf16> p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* smem = reinterpret_cast<bf16*>(smem_raw);
    RowsBlock<bf16> block;
    if (!rows_block(block, p, kGemmTile, kGemmTile)) return;
    const int p0 = block.p0, rows = block.rows, n0 = block.n0, K = p.K, cols = p.cols;
    const bf16* w = block.w;
    const bf16 *a_row[kRowsPerThread], *w_row[kRowsPerThread];  // this thread's rows of the deep tiles
#pragma unroll
    for (int j = 0; j < kRowsPerThread; j++) {
        const int r = threadIdx.x / (kGemmDepth / 8) + kGemmThreads / (kGemmDepth / 8) * j;
        a_row[j] = r < rows ? p.a.row(p0 + r) : nullptr;
        w_row[j] = n0 + r < cols ? w + (int64_t)(n0 + r) * K : nullptr;
    }
    auto load = [&](int stage, int step) {
        bf16* sa = smem + stage * 2 * kGemmOperandElems;
        const int k0 = step * kGemmDepth;
        load_deep_tile(sa, a_row, k0, K, w);
        if constexpr (W_TRANSPOSED) {
            load_deep_tile(sa + kGemmOperandElems, w_row, k0, K, w);
        } else {
            int64_t k[kRowsPerThread];
#pragma unroll
            for (int j = 0; j < kRowsPerThread; j++) {
                const int i = k0 + threadIdx.x / 16 + kGemmThreads / 16 * j;
                k[j] = i < K ? i : -1;
            }
            load_wide_tile(sa + kGemmOperandElems, w, cols, k, n0, cols);
        }
    };
    float acc[4][8][4] = {};
    gemm_mainloop<true, W_TRANSPOSED>(acc, smem, (int)ceil_div(K, kGemmDepth), load);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const int wm = warp / 2 * 64, wn = warp % 2 * 64;
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int r = wm + 16 * mt + gq + 8 * half;
            if (r >= rows) continue;
            if constexpr (EPI == RowsEpilogue::GeluGrad) {
                store_gelu_grad_pairs<8>(  // this row's eight pairs, one per n-tile
                    p,
                    [&](int nt) {
                        const int n = n0 + wn + 8 * nt + 2 * q;  // cols is a multiple of 8: n + 1 < cols too
                        return n < cols ? (int64_t)(p0 + r) * cols + n : int64_t{-1};
                    },
                    [&](int nt) { return make_float2(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]); });
            } else {
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    const int n = n0 + wn + 8 * nt + 2 * q;
                    if (n >= cols) continue;
                    store_rows_pair<EPI>(p, (int64_t)(p0 + r) * cols + n, acc[mt][nt][2 * half],
                                         acc[mt][nt][2 * half + 1]);
                }
            }
        }
}

// Weight gradient on mma.sync: block (output tile, expert), the expert's copies in group order.
__global__ void __launch_bounds__(kGemmThreads) weight_grad_mma_kernel(const WeightGradGemm<bf16> p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* smem = reinterpret_cast<bf16*>(smem_raw);
    const int g = blockIdx.y, tiles_n = (int)ceil_div(p.cols_out, kGemmTile);
    const int m0 = blockIdx.x / tiles_n * kGemmTile, n0 = blockIdx.x % tiles_n * kGemmTile;
    const int begin = p.group_offset[g], end = p.group_offset[g + 1];
    if (begin == end && p.accumulate) return;
    // Storage rows of this thread's tile rows for the next load step (negative: past the group),
    // read one step ahead so that the index lookup (copy_row, for the gathered X) is off the
    // critical path.
    int64_t a_rows[kRowsPerThread], b_rows[kRowsPerThread];
    auto fetch_rows = [&](int step) {
#pragma unroll
        for (int j = 0; j < kRowsPerThread; j++) {
            const int r = begin + step * kGemmDepth + threadIdx.x / 16 + kGemmThreads / 16 * j;
            a_rows[j] = r < end ? (p.a.index ? p.a.index[r] : r) : -1;
            b_rows[j] = r < end ? (p.b.index ? p.b.index[r] : r) : -1;
        }
    };
    fetch_rows(0);
    auto load = [&](int stage, int step) {
        bf16* sa = smem + stage * 2 * kGemmOperandElems;
        load_wide_tile(sa, p.a.base, p.a.ld, a_rows, m0, p.rows_out);
        load_wide_tile(sa + kGemmOperandElems, p.b.base, p.b.ld, b_rows, n0, p.cols_out);
        fetch_rows(step + 1);
    };
    float acc[4][8][4] = {};
    gemm_mainloop<false, false>(acc, smem, (int)ceil_div(end - begin, kGemmDepth), load);

    float* dw = p.dw + (int64_t)g * p.rows_out * p.cols_out;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const int wm = warp / 2 * 64, wn = warp % 2 * 64;
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int m = m0 + wm + 16 * mt + gq + 8 * half;
            if (m >= p.rows_out) continue;
            add_pairs<8>(  // this row's eight pairs, one per n-tile
                dw, p.accumulate,
                [&](int nt) {
                    const int n = n0 + wn + 8 * nt + 2 * q;
                    return n < p.cols_out ? (int64_t)m * p.cols_out + n : int64_t{-1};
                },
                [&](int nt) { return make_float2(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]); });
        }
}

// ---------------------------------------------------------------------------------------------
// wgmma kernels (sm_90a builds, tc/wgmma.cuh): the same products as the mma.sync kernels above, in
// 128 × 256 output tiles. A block of two warpgroups, warpgroup w owning tile rows 64w..64w+63
// (64 × 256 fp32 accumulators: 128 a thread), steps kWgDepth = 64 deep along the reduction; per
// step each warpgroup issues four m64n256k16 products and waits for them one step later
// (wgmma_wait<1>), so the tensor cores always have a step queued. Operands sit in 128B-swizzled
// tiles, A (16 KB) and B (32 KB) in each of kWgStages = 4 stages, handed on by mbarriers: a stage's
// full barrier completes when its copies have landed, its empty one when both warpgroups' products
// of it are done, and a stage is refilled as soon as it is empty: three steps in flight behind the
// one computed in the row GEMMs, two in the weight gradients. The weight matrices come by TMA
// (tc/tma.cuh: one thread, whole boxes, zeros past the matrix's edges), and so do the row GEMMs'
// copies' rows where they lie in group order; rows gathered through copy_row (which TMA cannot
// follow) and the weight gradients' rows (a group's end is no tensor edge) by cp.async from every
// thread. A tile is K-major when its rows run along M or N (the copies' rows in the row GEMMs, W's
// rows in the forward) and MN-major when they run along k (W in the backward, both operands of the
// weight gradients, whose reduction runs over copies), which wgmma reads transposed. Zero-filled rows
// and columns make partial tiles and partial steps exact, so the kernels take every shape the
// launchers accept. They exist in every build; without wgmma their bodies are empty and they are
// never launched.
constexpr int kWgTileM = 128, kWgTileN = 256, kWgDepth = 64, kWgStages = 4, kWgThreads = 256;
constexpr int kWgAElems = kWgTileM * kWgDepth, kWgBElems = kWgTileN * kWgDepth;
constexpr size_t kWgStageBytes = (size_t)kWgStages * (kWgAElems + kWgBElems) * sizeof(bf16);
// the stages, their full and empty barriers, and 1 KB to align the stages (wgmma_align_smem)
constexpr size_t kWgSmemBytes = kWgStageBytes + 2 * kWgStages * sizeof(uint64_t) + 1024;
static_assert(kWgTileM == 2 * 64 && kWgThreads == 2 * 128, "two warpgroups of 64 rows per tile");
static_assert(2 * 64 * kWgTileN * sizeof(float) <= kWgStageBytes, "the epilogues' fp32 tiles of both warpgroups fit in the stages");

#if defined(LMOE_HAS_WGMMA)
// The stages of a wgmma GEMM block and their barriers, set up by the whole block. A stage's full
// barrier expects `full_arrivals`: one from every thread that copies by cp.async, once its copies
// have landed, and one from thread 0 announcing the bytes of its TMA copies; with tma_only, thread 0
// alone copies (and waits for stages to empty), and the others only compute.
struct WgmmaStages {
    bf16* smem;  // kWgStages × (A, B), 1024-byte aligned
    uint64_t* full;
    uint64_t* empty;
    bool tma_only;
    __device__ WgmmaStages(unsigned char* smem_raw, int full_arrivals, bool tma_only_) : tma_only(tma_only_) {
        smem = reinterpret_cast<bf16*>(wgmma_align_smem(smem_raw));
        full = reinterpret_cast<uint64_t*>(reinterpret_cast<unsigned char*>(smem) + kWgStageBytes);
        empty = full + kWgStages;
        if (threadIdx.x == 0) {
            for (int s = 0; s < kWgStages; s++) {
                mbarrier_init(full + s, full_arrivals);
                mbarrier_init(empty + s, kWgThreads);
            }
            fence_mbarrier_init();
        }
        __syncthreads();  // initialised before anyone arrives
    }
    __device__ bf16* a(int step) const { return smem + step % kWgStages * (kWgAElems + kWgBElems); }
    __device__ bf16* b(int step) const { return a(step) + kWgAElems; }
    __device__ uint64_t* full_bar(int step) const { return full + step % kWgStages; }
    __device__ uint64_t* empty_bar(int step) const { return empty + step % kWgStages; }
};

// The pipelined reduction of one block over `steps` steps: acc (this warpgroup's 64 × 256) += A B,
// with the copies of AHEAD steps in flight behind the one computed. load(step) issues step's copies
// into stages.a(step), stages.b(step) and arrives on stages.full_bar(step); it is called for steps
// 0, 1, 2, ... in order, each once the stage's products of kWgStages steps before are done. With
// AHEAD = kWgStages − 1 the copies of step s + AHEAD go into the stage of step s − 1, after s's
// products are issued and s − 1's done; with AHEAD = kWgStages − 2, into the stage of step s − 2,
// done since step s − 1, before s's products are issued (the weight gradients' cp.async copies from
// every thread keep pace better so).
template <int AHEAD, bool A_MN_MAJOR, bool B_MN_MAJOR, class Load>
__device__ inline void wgmma_gemm_mainloop(float (&acc)[kWgTileN / 2], const WgmmaStages& stages, int steps, Load load) {
    static_assert(AHEAD == kWgStages - 1 || AHEAD == kWgStages - 2, "a stage is refilled one or two steps after its products");
    // bytes between the tiles' 64-column blocks: rows · 128
    constexpr uint32_t a_block = (A_MN_MAJOR ? kWgDepth : kWgTileM) * 128;
    constexpr uint32_t b_block = (B_MN_MAJOR ? kWgDepth : kWgTileN) * 128;
    // This warpgroup's 64 rows of A: rows 64w.. of a K-major tile, 64-column block w of an MN-major
    // one; 8 KB in either way.
    const int a_offset = threadIdx.x / 128 * 64 * 64;
    const bool loads = !stages.tma_only || threadIdx.x == 0;
    auto refill = [&](int fill) {
        if (!loads || fill >= steps) return;
        if (fill >= kWgStages) mbarrier_wait(stages.empty_bar(fill), (fill / kWgStages - 1) % 2);
        load(fill);
    };
    for (int s = 0; s < AHEAD; s++) refill(s);
    wgmma_fence_operands(acc);
    for (int step = 0; step < steps; step++) {
        mbarrier_wait(stages.full_bar(step), step / kWgStages % 2);
        fence_proxy_async();  // the cp.async copies of the stage, visible to wgmma
        if constexpr (AHEAD == kWgStages - 2) refill(step + AHEAD);
        const bf16 *a = stages.a(step) + a_offset, *b = stages.b(step);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < kWgDepth / 16; k++) {
            const uint64_t desc_a = A_MN_MAJOR ? wgmma_desc_mnmajor(a, a_block, k) : wgmma_desc_kmajor(a, a_block, k);
            const uint64_t desc_b = B_MN_MAJOR ? wgmma_desc_mnmajor(b, b_block, k) : wgmma_desc_kmajor(b, b_block, k);
            wgmma_ss<kWgTileN, A_MN_MAJOR, B_MN_MAJOR>(acc, desc_a, desc_b, 1);
        }
        wgmma_commit();
        wgmma_wait<1>();  // step − 1's products are done
        if (step > 0) mbarrier_arrive(stages.empty_bar(step - 1));
        if constexpr (AHEAD == kWgStages - 1) refill(step + AHEAD);
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
}
#endif  // LMOE_HAS_WGMMA

// Row GEMM on wgmma: block (256-column tile, planner tile, 128-row part of the planner tile):
// out[copies, n0..] = A B_e through the epilogue EPI, per 64-deep step A = the copies' rows
// (128 × 64, K-major) and B_e = W_e^T, W's rows n0.. (256 × 64, K-major: one TMA box), or W_e, 64 of
// W's rows (64 × 256, MN-major: four boxes of 64 columns). w_map is W's tensor map, a_map A's where
// A's rows are not gathered (rows_gemm_a_map): then thread 0 copies everything by TMA, A's box
// reaching past the tile's rows into the next tile's, whose outputs are never stored; gathered
// rows (copy_row) come by cp.async from every thread.
template <RowsEpilogue EPI, bool W_TRANSPOSED>
__global__ void __launch_bounds__(kWgThreads, 1)
    rows_gemm_wgmma_kernel(const RowsGemm<bf16> p, const __grid_constant__ CUtensorMap w_map,
                           const __grid_constant__ CUtensorMap a_map) {
#if defined(LMOE_HAS_WGMMA)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    RowsBlock<bf16> block;
    if (!rows_block(block, p, kWgTileM, kWgTileN)) return;
    const bool a_by_tma = p.a.index == nullptr;
    const WgmmaStages stages(smem_raw, a_by_tma ? 1 : kWgThreads + 1, a_by_tma);
    const int p0 = block.p0, rows = block.rows, n0 = block.n0, K = p.K, cols = p.cols;
    using ACopy = SwizzledTileCopy<kWgTileM, kWgDepth, kWgThreads>;
    const ACopy a_copy;
    const bf16* a_row[ACopy::passes];  // this thread's rows of a gathered A tile, the same every step
#pragma unroll
    for (int j = 0; j < ACopy::passes; j++) {
        const int r = a_copy.row(j);
        a_row[j] = !a_by_tma && r < rows ? p.a.row(p0 + r) : nullptr;
    }
    auto load = [&](int step) {
        const int k0 = step * kWgDepth;
        uint64_t* full = stages.full_bar(step);
        if (threadIdx.x == 0) {
            mbarrier_arrive_expect_tx(full, (kWgBElems + (a_by_tma ? kWgAElems : 0)) * (int)sizeof(bf16));
            if (a_by_tma) tma_load_3d(stages.a(step), a_map, k0, p0, 0, full);
            if constexpr (W_TRANSPOSED) {
                tma_load_3d(stages.b(step), w_map, k0, n0, block.g, full);
            } else {
#pragma unroll
                for (int j = 0; j < kWgTileN / 64; j++)
                    tma_load_3d(stages.b(step) + j * 64 * kWgDepth, w_map, n0 + 64 * j, k0, block.g, full);
            }
        }
        if (a_by_tma) return;
#pragma unroll
        for (int j = 0; j < ACopy::passes; j++) {
            const int k = k0 + a_copy.col();
            const bool valid = a_row[j] != nullptr && k < K;
            a_copy.issue(stages.a(step), j, valid ? a_row[j] + k : p.a.base, valid);
        }
        cp_async_mbarrier_arrive(full);
    };
    float acc[kWgTileN / 2];
#pragma unroll
    for (int i = 0; i < kWgTileN / 2; i++) acc[i] = 0.f;
    wgmma_gemm_mainloop<kWgStages - 1, false, !W_TRANSPOSED>(acc, stages, (int)ceil_div(K, kWgDepth), load);

    // Through shared memory (tc/wgmma.cuh's epilogues): the stages are free once both warpgroups'
    // last products are done, 64 KB of them for each warpgroup's 64 rows: two bf16 tiles (the Store
    // and Gelu results; Gelu's hidden values in the second) or one fp32 tile (GeluGrad, whose
    // accumulators meet pre in fp32).
    const int wg = threadIdx.x / 128;
    __syncthreads();
    constexpr uint32_t block_bytes = 64 * 128, tile_bytes = kWgTileN / 64 * block_bytes;
    unsigned char* tile = reinterpret_cast<unsigned char*>(stages.smem) + wg * 2 * tile_bytes;
    if constexpr (EPI == RowsEpilogue::GeluGrad) {
        wgmma_accumulators_to_tile_f32<kWgTileN>(tile, acc);
        warpgroup_barrier(wg);
        const TilePiecesF32<kWgTileN> pieces{tile};
        auto at = [&](int j) {  // of piece j in out and pre; −1 outside (cols % 8 == 0: whole pieces)
            const int r = 64 * wg + pieces.row(j), n = n0 + pieces.col(j);
            return r < rows && n < cols ? (int64_t)(p0 + r) * cols + n : int64_t{-1};
        };
        constexpr int batch = 16;  // pieces whose pre is read at once
        static_assert(pieces.count % batch == 0, "whole batches of pieces");
#pragma unroll
        for (int j0 = 0; j0 < pieces.count; j0 += batch)
            read_all_then_write<batch>(
                [&](int j) { return at(j0 + j) >= 0 ? *reinterpret_cast<const uint2*>(p.pre + at(j0 + j)) : uint2{}; },
                [&](int j, uint2 pre) {
                    if (at(j0 + j) < 0) return;
                    const float4 v = pieces.value(j0 + j);
                    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pre.x));
                    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pre.y));
                    *reinterpret_cast<uint2*>(p.out + at(j0 + j)) =
                        make_uint2(pack_bf16x2(v.x * gelu_grad_fast(lo.x), v.y * gelu_grad_fast(lo.y)),
                                   pack_bf16x2(v.z * gelu_grad_fast(hi.x), v.w * gelu_grad_fast(hi.y)));
                });
    } else {
        wgmma_accumulators_to_tile<kWgTileN>(tile, block_bytes, acc);
        if constexpr (EPI == RowsEpilogue::Gelu)
            wgmma_accumulators_to_tile<kWgTileN>(tile + tile_bytes, block_bytes, acc, [](float v) { return gelu_fast(v); });
        warpgroup_barrier(wg);
        auto store = [&](bf16* to, const unsigned char* from) {
            for_each_tile_piece<kWgTileN>(from, block_bytes, [&](int r, int c, uint4 v) {
                const int n = n0 + 8 * c;
                if (64 * wg + r < rows && n < cols) *reinterpret_cast<uint4*>(to + (int64_t)(p0 + 64 * wg + r) * cols + n) = v;
            });
        };
        store(p.out, tile);
        if constexpr (EPI == RowsEpilogue::Gelu) store(p.hidden, tile + tile_bytes);
    }
#endif
}

// Weight gradient on wgmma: block (128 × 256 output tile, expert), the expert's copies in group
// order, 64 a step: dw_e[m0.., n0..] (+)= a[copies, m0..]^T b[copies, n0..], both tiles MN-major
// (64 copies × 128 or 256 columns).
__global__ void __launch_bounds__(kWgThreads, 1) weight_grad_wgmma_kernel(const WeightGradGemm<bf16> p) {
#if defined(LMOE_HAS_WGMMA)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int g = blockIdx.y, tiles_n = (int)ceil_div(p.cols_out, kWgTileN);
    const int m0 = blockIdx.x / tiles_n * kWgTileM, n0 = blockIdx.x % tiles_n * kWgTileN;
    const int begin = p.group_offset[g], end = p.group_offset[g + 1];
    if (begin == end && p.accumulate) return;
    const WgmmaStages stages(smem_raw, kWgThreads, false);
    float* dw = p.dw + (int64_t)g * p.rows_out * p.cols_out;
    // The dW tile the epilogue adds to, into L2 while the products run.
    if (p.accumulate)
        prefetch_l2<kWgThreads>(dw + (int64_t)m0 * p.cols_out + n0, min(kWgTileM, p.rows_out - m0),
                                min(kWgTileN, p.cols_out - n0) * (int)sizeof(float), (int64_t)p.cols_out * sizeof(float));
    using ACopy = SwizzledTileCopy<kWgDepth, kWgTileM, kWgThreads>;
    using BCopy = SwizzledTileCopy<kWgDepth, kWgTileN, kWgThreads>;
    const ACopy a_copy;
    const BCopy b_copy;
    // Storage rows of this thread's tile rows for the next load step (negative: past the group),
    // read one step ahead so that the index lookup (copy_row, for the gathered X) is off the
    // critical path.
    int a_rows[ACopy::passes], b_rows[BCopy::passes];
    auto fetch_rows = [&](int step) {
        const int r0 = begin + step * kWgDepth;
#pragma unroll
        for (int j = 0; j < ACopy::passes; j++) {
            const int r = r0 + a_copy.row(j);
            a_rows[j] = r < end ? (p.a.index ? p.a.index[r] : r) : -1;
        }
#pragma unroll
        for (int j = 0; j < BCopy::passes; j++) {
            const int r = r0 + b_copy.row(j);
            b_rows[j] = r < end ? (p.b.index ? p.b.index[r] : r) : -1;
        }
    };
    fetch_rows(0);
    const int a_col = m0 + a_copy.col(), b_col = n0 + b_copy.col();
    auto load = [&](int step) {
#pragma unroll
        for (int j = 0; j < ACopy::passes; j++) {
            const bool valid = a_rows[j] >= 0 && a_col < p.rows_out;
            a_copy.issue(stages.a(step), j, valid ? p.a.base + (int64_t)a_rows[j] * p.a.ld + a_col : p.a.base, valid);
        }
#pragma unroll
        for (int j = 0; j < BCopy::passes; j++) {
            const bool valid = b_rows[j] >= 0 && b_col < p.cols_out;
            b_copy.issue(stages.b(step), j, valid ? p.b.base + (int64_t)b_rows[j] * p.b.ld + b_col : p.b.base, valid);
        }
        cp_async_mbarrier_arrive(stages.full_bar(step));
        fetch_rows(step + 1);
    };
    float acc[kWgTileN / 2];
#pragma unroll
    for (int i = 0; i < kWgTileN / 2; i++) acc[i] = 0.f;
    wgmma_gemm_mainloop<kWgStages - 2, true, true>(acc, stages, (int)ceil_div(end - begin, kWgDepth), load);

    // dw (+)= acc through an fp32 tile (tc/wgmma.cuh) in the freed stages, 64 KB a warpgroup: the
    // read-modify-write in float4 pieces along dw's rows, 16 pieces' reads in flight at a time.
    const int wg = threadIdx.x / 128;
    __syncthreads();
    unsigned char* tile = reinterpret_cast<unsigned char*>(stages.smem) + wg * kWgTileN / 32 * (64 * 128);
    wgmma_accumulators_to_tile_f32<kWgTileN>(tile, acc);
    warpgroup_barrier(wg);
    const TilePiecesF32<kWgTileN> pieces{tile};
    auto at = [&](int j) {  // of piece j in dw; −1 outside (cols_out % 8 == 0: whole pieces)
        const int m = m0 + 64 * wg + pieces.row(j), n = n0 + pieces.col(j);
        return m < p.rows_out && n < p.cols_out ? (int64_t)m * p.cols_out + n : int64_t{-1};
    };
    constexpr int batch = 16;
    static_assert(pieces.count % batch == 0, "whole batches of pieces");
#pragma unroll
    for (int j0 = 0; j0 < pieces.count; j0 += batch)
        read_all_then_write<batch>(
            [&](int j) {
                return p.accumulate && at(j0 + j) >= 0 ? *reinterpret_cast<const float4*>(dw + at(j0 + j)) : float4{};
            },
            [&](int j, float4 old) {
                if (at(j0 + j) < 0) return;
                const float4 v = pieces.value(j0 + j);
                *reinterpret_cast<float4*>(dw + at(j0 + j)) =
                    make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
            });
#endif
}

// ---------------------------------------------------------------------------------------------
// Launchers.

inline bool grouped_gemm_shape_supported(int d, int f) { return d % 8 == 0 && f % 8 == 0; }

// W's tensor map for rows_gemm_wgmma_kernel, per expert: boxes of 64 along W's contiguous dimension
// by 256 of W's rows (W_e^T, K-major) or 64 (W_e, MN-major).
template <bool W_TRANSPOSED>
CUtensorMap rows_gemm_weight_map(const RowsGemm<bf16>& p) {
    const uint64_t inner = W_TRANSPOSED ? p.K : p.cols, outer = W_TRANSPOSED ? p.cols : p.K;
    return make_tensor_map(p.w, {inner, outer, (uint64_t)p.plan.groups()}, {inner, inner * outer}, 64,
                           W_TRANSPOSED ? kWgTileN : kWgDepth);
}
// A's tensor map where its rows are not gathered (the plan's copies, K of each, ld apart), in boxes
// of 64 × 128 rows; with gathered rows no map (the kernel does not read it). A must hold
// plan.copies() rows (the worst case, for plans whose copies are counted on the device): a tile's
// box reads up to 127 rows past the tile, zeros past the last.
inline CUtensorMap rows_gemm_a_map(const RowsGemm<bf16>& p) {
    if (p.a.index != nullptr) return CUtensorMap{};
    const uint64_t copies = (uint64_t)p.plan.copies();
    return make_tensor_map(p.a.base, {(uint64_t)p.K, copies, 1}, {(uint64_t)p.a.ld, (uint64_t)p.a.ld * copies}, 64,
                           kWgTileM);
}

// out (copies, cols) for every tile of the plan. The element type and the device pick the
// implementation: for bf16 wgmma where device_has_wgmma() (it takes every shape), mma.sync elsewhere;
// the SIMT kernel for fp32.
template <RowsEpilogue EPI, bool W_TRANSPOSED, class T>
void grouped_rows_gemm(const RowsGemm<T>& p, cudaStream_t stream) {
    const int max_tiles = p.plan.max_tiles;
    if constexpr (std::is_same<T, bf16>::value) {
        if (device_has_wgmma()) {
            const dim3 grid((unsigned)ceil_div(p.cols, kWgTileN), max_tiles,
                            (unsigned)ceil_div(kExpertTileRows, kWgTileM));
            launch_with_smem(rows_gemm_wgmma_kernel<EPI, W_TRANSPOSED>, grid, kWgThreads, kWgSmemBytes, stream, p,
                             rows_gemm_weight_map<W_TRANSPOSED>(p), rows_gemm_a_map(p));
        } else {
            const dim3 grid((unsigned)ceil_div(p.cols, kGemmTile), max_tiles,
                            (unsigned)ceil_div(kExpertTileRows, kGemmTile));
            launch_with_smem(rows_gemm_mma_kernel<EPI, W_TRANSPOSED>, grid, kGemmThreads, kGemmSmemBytes, stream, p);
        }
    } else {
        rows_gemm_simt_kernel<EPI, W_TRANSPOSED>
            <<<dim3((unsigned)ceil_div(p.cols, kSimtGemmTile), max_tiles, (unsigned)ceil_div(kExpertTileRows, kSimtGemmTile)),
               kSimtGemmThreads, 0, stream>>>(p);
        CUDA_CHECK_LAUNCH();
    }
}

// dw (E, rows_out, cols_out) (+)= per-expert a^T b (p.accumulate); the kernel picked as for grouped_rows_gemm.
template <class T>
void grouped_weight_grad(const WeightGradGemm<T>& p, int E, cudaStream_t stream) {
    if constexpr (std::is_same<T, bf16>::value) {
        if (device_has_wgmma()) {
            const int tiles = (int)(ceil_div(p.rows_out, kWgTileM) * ceil_div(p.cols_out, kWgTileN));
            launch_with_smem(weight_grad_wgmma_kernel, dim3(tiles, E), kWgThreads, kWgSmemBytes, stream, p);
        } else {
            const int tiles = (int)(ceil_div(p.rows_out, kGemmTile) * ceil_div(p.cols_out, kGemmTile));
            launch_with_smem(weight_grad_mma_kernel, dim3(tiles, E), kGemmThreads, kGemmSmemBytes, stream, p);
        }
    } else {
        const int tiles = (int)(ceil_div(p.rows_out, kSimtGemmTile) * ceil_div(p.cols_out, kSimtGemmTile));
        weight_grad_simt_kernel<<<dim3(tiles, E), kSimtGemmThreads, 0, stream>>>(p);
        CUDA_CHECK_LAUNCH();
    }
}

// The four stages of the expert computation. x (N, ld) holds the token rows; pre, h, dpre are
// (copies, f); o, d_o, dx_copy are (copies, d); all in group order.

// pre (copies, f) = X_e W1_e^T;  h = GELU(pre).
inline void expert_up_forward(floatX* pre, floatX* h, const floatX* x, int64_t ld, const floatX* W1,
                              const RoutingPlan& plan, int d, int f, cudaStream_t stream) {
    grouped_rows_gemm<RowsEpilogue::Gelu, true, floatX>({pre, h, nullptr, {x, ld, plan.copy_row}, W1, d, f, plan}, stream);
}

// o (copies, d) = h W2_e^T.
inline void expert_down_forward(floatX* o, const floatX* h, const floatX* W2, const RoutingPlan& plan, int d, int f,
                                cudaStream_t stream) {
    grouped_rows_gemm<RowsEpilogue::Store, true, floatX>({o, nullptr, nullptr, {h, f, nullptr}, W2, f, d, plan}, stream);
}

// Backward of expert_down_forward and of the GELU: dpre (copies, f) = (d_o W2_e) ⊙ GELU'(pre);
// dW2_e (d, f) += d_o^T h, or = with accumulate false.
inline void expert_down_backward(floatX* dpre, float* dW2, bool accumulate, const floatX* d_o, const floatX* h,
                                 const floatX* pre, const floatX* W2, const RoutingPlan& plan, int d, int f,
                                 cudaStream_t stream) {
    grouped_rows_gemm<RowsEpilogue::GeluGrad, false, floatX>({dpre, nullptr, pre, {d_o, d, nullptr}, W2, d, f, plan},
                                                             stream);
    grouped_weight_grad<floatX>({dW2, {d_o, d, nullptr}, {h, f, nullptr}, d, f, plan.group_offset, accumulate}, plan.E,
                                stream);
}

// Backward of expert_up_forward: dx_copy (copies, d) = dpre W1_e;  dW1_e (f, d) += dpre^T X_e, or = with
// accumulate false.
inline void expert_up_backward(floatX* dx_copy, float* dW1, bool accumulate, const floatX* dpre, const floatX* x,
                               int64_t ld, const floatX* W1, const RoutingPlan& plan, int d, int f, cudaStream_t stream) {
    grouped_rows_gemm<RowsEpilogue::Store, false, floatX>({dx_copy, nullptr, nullptr, {dpre, f, nullptr}, W1, f, d, plan},
                                                          stream);
    grouped_weight_grad<floatX>({dW1, {dpre, f, nullptr}, {x, ld, plan.copy_row}, f, d, plan.group_offset, accumulate},
                                plan.E, stream);
}

}  // namespace lmoe
