// What the three stages of the LatentMoE expert kernels share (moe/latent/io_experts.cuh is the
// entry): the tile shapes of both implementations, the fp32 kernels' shared-memory tile helpers, and
// the dispatch that turns the run-time head size and fe chunk width into template arguments.
//
// fp32 (SIMT, LMOE_FP32) kernels: each planner tile (kExpertTileRows rows) is split over blocks of
// kSimtTileRows; 4 threads per row; fe in chunks of kExpertChunk; shared rows padded by one float.
//
// Tensor-core (bf16) kernels: shared tiles are bf16 rows padded by 8 elements (tc/warp_tile.cuh);
// cp.async fills them, the next K/V chunk (or the next tile of rows) landing while the tensor cores
// work on the current one (double buffering).
//   forward, input gradient: one block of 4 warps per planner tile of kExpertTileRows = 128 rows;
//     warp w owns rows 32w..32w+31 and keeps their (32 × dh) fp32 accumulator in registers; the
//     hidden chunk goes from the first product to the second in registers. Two blocks per SM.
//   weight gradient: one block of 8 warps per (group, FC-wide slice of fe), FC up to 128, walking the
//     group's copies 64 rows at a time; its (FC × dh) dK and dV accumulators stay in registers.
//     In sm_90a builds the same kernel runs on wgmma (weight_backward_wgmma) for FC = 128, dh 64/128.
#pragma once
#include <type_traits>

#include "util/cuda_utils.cuh"
#include "util/launch.cuh"
#include "moe/gelu.cuh"
#include "moe/routing_plan.cuh"
#include "tc/warp_tile.cuh"

namespace lmoe {

// The copies of one row tile of the forward and input-gradient kernels: part `part` (ROWS rows) of
// planner tile `tile`, all of group g, head h = g / E; rows ≤ 0 when the part lies past the
// group's last copy. `part` is blockIdx.y (or 0), and unsigned as blockIdx.y is.
struct ExpertRowTile {
    int g, h, p0, rows;
};
template <int ROWS>
__device__ inline ExpertRowTile expert_row_tile(const RoutingPlan& plan, int tile, unsigned part, int E) {
    const int g = plan.tile_group[tile], h = g / E, p0 = plan.tile_start[tile] + part * ROWS;
    return {g, h, p0, min(ROWS, plan.group_offset[g + 1] - p0)};
}

// The x offsets of a tile's rows, for the tile loads: copy p0 + i is head h's sub-token of token
// row copy_row[p0 + i] (x is (N, ld), a head DH wide), gathered straight from x, whose permuted
// copy is never written. It holds references, as the [&] lambda it replaces did: with values
// instead, the compiler schedules some weight-gradient kernels differently.
template <int DH>
struct GatheredRows {
    const RoutingPlan& plan;
    const int64_t& ld;
    const int &p0, &h;
    __device__ int64_t operator()(int i) const { return plan.copy_row[p0 + i] * ld + (int64_t)h * DH; }
};

// ---------------------------------------------------------------------------------------------
// fp32 (SIMT) tiles.
constexpr int kExpertChunk = 32;     // fe columns per chunk (fe must be a multiple)
constexpr int kSimtTileRows = 64;    // rows of one block
constexpr int kExpertThreads = 256;  // 4 threads per row
static_assert(kExpertTileRows % kSimtTileRows == 0, "a planner tile splits into whole SIMT tiles");

// Shared-memory rows are padded by one float so threads reading different rows hit different banks.
template <int DH> struct ExpertTileSmem {
    static constexpr int ld_row = DH + 1, ld_chunk = kExpertChunk + 1;
    static constexpr int rows_floats = kSimtTileRows * ld_row;   // one (tile rows × dh) matrix
    static constexpr int chunk_floats = kExpertChunk * ld_row;     // one (chunk × dh) matrix
    static constexpr int hidden_floats = kSimtTileRows * ld_chunk;  // one (tile rows × chunk) matrix
    // `row_tiles` (tile rows × dh) tiles, a K and a V chunk, `hidden_tiles` (tile rows × chunk) tiles
    static constexpr size_t bytes(int row_tiles, int hidden_tiles) {
        return (row_tiles * rows_floats + 2 * chunk_floats + hidden_tiles * hidden_floats) * sizeof(float);
    }
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

// This thread's DH / 4 entries (r, cg + 4i) of a (tile rows × dh) accumulator += H B, H a (tile
// rows × chunk) hidden tile, B a (chunk × dh) one:  acc[i] += Σ_f H[r][f] B[f][cg + 4i].
template <int DH>
__device__ inline void hidden_times_chunk(float (&acc)[DH / 4], const float* H, const float* B, int r, int cg) {
    using S = ExpertTileSmem<DH>;
    for (int f = 0; f < kExpertChunk; f++) {
        const float hf = H[r * S::ld_chunk + f];
#pragma unroll
        for (int i = 0; i < DH / 4; i++) acc[i] += hf * B[f * S::ld_row + cg + 4 * i];
    }
}

// Writes those entries to out[(p0 + r) · DH + cg + 4i], for rows r below `rows`.
template <int DH>
__device__ inline void store_tile_row(floatX* out, const float (&acc)[DH / 4], int p0, int r, int rows, int cg) {
    if (r < rows)
#pragma unroll
        for (int i = 0; i < DH / 4; i++) out[(int64_t)(p0 + r) * DH + cg + 4 * i] = from_float<floatX>(acc[i]);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core tiles.
constexpr int kMmaRowsPerWarp = 32;
constexpr int kMmaTileThreads = kExpertTileRows / kMmaRowsPerWarp * 32;
constexpr int kMmaWeightThreads = 256;
constexpr int kMmaWeightRows = 64;  // rows per step of the weight-gradient walk
static_assert(kExpertTileRows % kMmaRowsPerWarp == 0, "whole warps per planner tile");

// Shared memory of the row-tile kernels: `row_tiles` (kExpertTileRows × dh) tiles, then two stages
// of `chunk_tiles` (FC × dh) chunks.
template <int DH, int FC> struct MmaTileSmem {
    static constexpr int ld = DH + 8, rows_elems = kExpertTileRows * ld, chunk_elems = FC * ld;
    static constexpr size_t bytes(int row_tiles, int chunk_tiles) {
        return (row_tiles * rows_elems + 2 * chunk_tiles * chunk_elems) * sizeof(bf16);
    }
};

// The K_g, V_g chunks of the row-tile kernels' fe loop, double-buffered: chunk c (FC rows of each)
// sits in stage c % 2 of Ks, Vs, and while the warps work on it, chunk c + 1 is copied into the other
// stage. The loop:
//     chunks.load(0); cp_async_commit();
//     for (int c = 0; c < F / FC; c++) { chunks.next(c, F); ... chunks.K(c), chunks.V(c) ... }
template <int DH, int FC>
struct KvChunks {
    using S = MmaTileSmem<DH, FC>;
    bf16 *Ks, *Vs;
    const bf16 *Kg, *Vg;
    __device__ void load(int c) const {
        load_chunk_async<DH, FC, kMmaTileThreads>(Ks + (c % 2) * S::chunk_elems, Kg + (int64_t)c * FC * DH);
        load_chunk_async<DH, FC, kMmaTileThreads>(Vs + (c % 2) * S::chunk_elems, Vg + (int64_t)c * FC * DH);
    }
    // Waits for chunk c (and every copy issued before it), then starts the copy of chunk c + 1.
    __device__ void next(int c, int F) const {
        cp_async_wait<0>();
        __syncthreads();  // chunk c has landed, and every warp is done with chunk c − 1, whose stage is refilled now
        if (c + 1 < F / FC) load(c + 1);
        cp_async_commit();
    }
    __device__ const bf16* K(int c) const { return Ks + (c % 2) * S::chunk_elems; }
    __device__ const bf16* V(int c) const { return Vs + (c % 2) * S::chunk_elems; }
};

// ---------------------------------------------------------------------------------------------
// Which implementation, and the template arguments of the kernels.

constexpr bool kExpertsOnTensorCores = std::is_same<floatX, __nv_bfloat16>::value;

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

// Launches the kernel of this build: tensor_cores(head_dim, chunk) in the bf16 build, with chunk the
// widest fe chunk up to Widest that divides fe; simt(head_dim) in the fp32 one. Both take
// std::integral_constant arguments, so the launcher sees DH and FC as compile-time constants.
template <int Widest, class TensorCores, class Simt>
void dispatch_expert_kernel(int dh, int fe, TensorCores&& tensor_cores, Simt&& simt) {
    dispatch_head_dim(dh, [&](auto head_dim) {
        if constexpr (kExpertsOnTensorCores)
            dispatch_fe_chunk<Widest>(fe, [&](auto chunk) { tensor_cores(head_dim, chunk); });
        else
            simt(head_dim);
    });
}

}  // namespace lmoe
