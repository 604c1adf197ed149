// Warpgroup matrix multiply (wgmma, Hopper's sm_90a only: everything here is compiled where
// __CUDA_ARCH_FEAT_SM90_ALL is defined, and LMOE_HAS_WGMMA tells the kernels that it was).
// A warpgroup of 4 warps computes D (64 × N, fp32 in registers) += A (64 × 16) B (16 × N) with A and
// B read from shared memory through descriptors (wgmma_ss), or A from registers (wgmma_rs),
// asynchronously: issue, commit, wait. N is 64, 128 or 256.
// Operand tiles use the 128-byte swizzle: a tile is cut into blocks of 64 columns (128 bytes per
// row); within a block, row r's 16-byte chunk c sits at chunk c ^ (r % 8), and blocks are 1024-byte
// aligned. Such a (rows × cols) tile is a K-major operand when its columns run along k, an MN-major
// one (transposed) when its rows do.
// Accumulator fragments: d[i] is (row 16·warp + lane/4 + 8·((i/2) % 2), col 8·(i/4) + 2·(lane%4) + i%2).
// Users: moe/latent/expert_weight_backward.cuh, moe/latent/expert_rows_wgmma.cuh,
// moe/grouped/grouped_gemm.cuh, dense/attention.cuh.
#pragma once
#include <cstdint>
#include <string>

#include "tc/mma.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// Whether the code this build runs on the current GPU has wgmma: an sm_90a build (its architecture
// list, LMOE_CUDA_ARCHITECTURES, names 90a) on a compute capability 9.0 GPU, whose driver then loads the
// sm_90a code. Host code is compiled without the device's target features, so the launchers that pick
// a wgmma kernel (with its own block size) ask here; cached per process (one GPU kind per process).
inline bool device_has_wgmma() {
    static const bool has = [] {
        if (std::string(LMOE_CUDA_ARCHITECTURES).find("90a") == std::string::npos) return false;
        int device = 0;
        cudaDeviceProp prop{};
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
        return prop.major == 9 && prop.minor == 0;
    }();
    return has;
}

}  // namespace lmoe

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LMOE_HAS_WGMMA 1

namespace lmoe {

// Byte offset of 16-byte chunk `chunk` (0..7) of row r within a 64-column block of a 128B-swizzled tile.
__device__ inline int swizzled_chunk(int r, int chunk) { return r * 128 + (chunk ^ (r % 8)) * 16; }

// This thread's share of the cp.async copies of a (ROWS × COLS) bf16 tile into its 128B-swizzled
// shared layout: NT threads, each copying 16 bytes at tile column col() of rows row(j), j < passes.
template <int ROWS, int COLS, int NT>
struct SwizzledTileCopy {
    static constexpr int vecs = COLS / 8, step = NT / vecs, passes = ROWS / step;
    static_assert(COLS % 64 == 0 && NT % vecs == 0 && ROWS % step == 0, "whole 64-column blocks, whole rows per pass");
    int r0 = threadIdx.x / vecs, v = threadIdx.x % vecs;
    __device__ int row(int j) const { return r0 + j * step; }
    __device__ int col() const { return v * 8; }
    // Issues row(j)'s copy from `from` (zeros when !valid; `from` is a valid address either way).
    __device__ void issue(bf16* tile, int j, const bf16* from, bool valid) const {
        unsigned char* block = reinterpret_cast<unsigned char*>(tile) + v / 8 * ROWS * 128;
        const int r = row(j);
        cp_async_16(block + r * 128 + ((v % 8) ^ (r % 8)) * 16, from, valid);
    }
};

// The cp.async copies of N_ROWS rows of DH bf16 into a 128B-swizzled shared tile (zeros from `rows`
// on), as load_rows_async (tc/warp_tile.cuh) does for a padded one.
template <int DH, int N_ROWS, int NT, class RowOffset>
__device__ inline void load_rows_swizzled_async(bf16* dst, const bf16* src, int rows, RowOffset row_offset) {
    const SwizzledTileCopy<N_ROWS, DH, NT> copy;
#pragma unroll
    for (int j = 0; j < copy.passes; j++) {
        const int r = copy.row(j);
        const bool valid = r < rows;
        copy.issue(dst, j, valid ? src + row_offset(r) + copy.col() : src, valid);
    }
}

// The start of dynamic shared memory rounded up to the 1024 bytes that swizzled tiles are aligned to
// (a kernel asks for 1 KB more than its tiles).
__device__ inline unsigned char* wgmma_align_smem(unsigned char* smem_raw) {
    return smem_raw + ((1024 - (smem_address(smem_raw) & 1023)) & 1023);
}

// Descriptor of a 128B-swizzled operand starting at `tile`: lbo = bytes between 64-column blocks
// (MN-major), sbo = bytes between groups of 8 rows.
__device__ inline uint64_t wgmma_desc(const void* tile, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((smem_address(tile) & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 | (uint64_t)(sbo >> 4) << 32 |
           1ull << 62;
}
// Descriptors of k16 step k of a swizzled operand tile whose 64-column blocks lie block_bytes
// (rows · 128) apart. K-major (rows along M or N, columns along k): 32 bytes a step within a
// block, then the next block. MN-major (rows along k, columns along M or N): 16 rows a step; an
// instruction wider than 64 in M or N reads the next 64 from the next block (lbo).
__device__ inline uint64_t wgmma_desc_kmajor(const void* tile, uint32_t block_bytes, int k) {
    return wgmma_desc(reinterpret_cast<const unsigned char*>(tile) + (k / 4) * block_bytes + (k % 4) * 32, 16, 1024);
}
__device__ inline uint64_t wgmma_desc_mnmajor(const void* tile, uint32_t block_bytes, int k) {
    return wgmma_desc(reinterpret_cast<const unsigned char*>(tile) + k * 16 * 128, block_bytes, 1024);
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
// A barrier among the 128 threads of warpgroup w (0 or 1) alone: named barrier 1 + w (__syncthreads
// is 0), spelled out so that ptxas sees which barriers the kernel uses.
__device__ inline void warpgroup_barrier(int w) {
    if (w == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}
// Turns of two warpgroups that take the tensor cores in alternation (ping-pong): warpgroup w waits
// for its turn, issues its products, and hands the turn to the other, so that one warpgroup's
// elementwise work runs while the other's products do. Named barriers 3 + w, each completed by the
// 128 threads that wait on it and the 128 of the other warpgroup that arrive: warpgroup 0 takes its
// first turn without waiting, and warpgroup 1 does not hand on after its last, so that the waits of
// each barrier equal its arrivals.
__device__ inline void warpgroup_wait_turn(int w) {
    if (w == 0) asm volatile("bar.sync 3, 256;\n" ::: "memory");
    else asm volatile("bar.sync 4, 256;\n" ::: "memory");
}
__device__ inline void warpgroup_pass_turn(int w) {
    if (w == 0) asm volatile("bar.arrive 4, 256;\n" ::: "memory");
    else asm volatile("bar.arrive 3, 256;\n" ::: "memory");
}
// Warpgroup wg's turns 0 .. turns − 1 (as many for both warpgroups), with that rule for the first
// and the last: take(turn) before a turn's products, pass(turn) after them.
struct Turns {
    int wg, turns;
    __device__ void take(int turn) const {
        if (wg == 1 || turn > 0) warpgroup_wait_turn(wg);
    }
    __device__ void pass(int turn) const {
        if (wg == 0 || turn < turns - 1) warpgroup_pass_turn(wg);
    }
};

// Warp-specialised kernels move registers between warpgroups: a producer warpgroup that only issues
// copies gives its registers up to N a thread, consumers claim up to N (it waits until the block's
// pool has them). Every warp of a warpgroup executes the same one; N a multiple of 8 in 24..256.
template <int N>
__device__ inline void warpgroup_release_registers() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ inline void warpgroup_claim_registers() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

// Epilogues through shared memory. Straight from the accumulators, each store instruction of a warp
// writes 4-byte pairs, 16 bytes into each of 8 rows; instead a warpgroup packs its (64 × N)
// accumulators into a 128B-swizzled tile of its own (rows 0..63, 64-column blocks block_bytes apart:
// the 8 rows one store instruction touches sit in 8 different 16-byte chunks, so it is conflict-free),
// passes a warpgroup_barrier, and reads the tile back in 16-byte pieces, each warp's 32 pieces whole
// 128-byte row segments (4 wavefronts): a quarter of the global stores, and whole lines.
struct Unchanged {
    __device__ float operator()(float v) const { return v; }
};
// pair(r, col, a, b) for each of this thread's accumulator pairs (d[i], d[i + 1]) of a (64 × N)
// product: row r, columns col and col + 1 (the fragment layout at the top of this file).
template <int N, class Pair>
__device__ inline void for_each_accumulator_pair(const float (&d)[N / 2], Pair pair) {
    const int warp = threadIdx.x / 32 % 4, gq = threadIdx.x % 32 / 4, q = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < N / 2; i += 2) pair(16 * warp + gq + 8 * (i / 2 % 2), 8 * (i / 4) + 2 * q, d[i], d[i + 1]);
}
// This thread's accumulator fragments, each value mapped by f, packed to bf16 into the tile.
template <int N, class F = Unchanged>
__device__ inline void wgmma_accumulators_to_tile(unsigned char* tile, uint32_t block_bytes, const float (&d)[N / 2],
                                                  F f = {}) {
    for_each_accumulator_pair<N>(d, [&](int r, int col, float a, float b) {
        *reinterpret_cast<uint32_t*>(tile + col / 64 * block_bytes + swizzled_chunk(r, col % 64 / 8) + col % 8 * 2) =
            pack_bf16x2(f(a), f(b));
    });
}
// Then this thread's pieces of the tile: piece(r, c, v) gets v = row r's columns 8c .. 8c + 7.
template <int N, class Piece>
__device__ inline void for_each_tile_piece(const unsigned char* tile, uint32_t block_bytes, Piece piece) {
    constexpr int vecs = N / 8;  // pieces of a row
#pragma unroll
    for (int j = 0; j < 64 * vecs / 128; j++) {
        const int v = threadIdx.x % 128 + 128 * j, r = v / vecs, c = v % vecs;
        piece(r, c, *reinterpret_cast<const uint4*>(tile + c / 8 * block_bytes + swizzled_chunk(r, c % 8)));
    }
}

// The same in fp32, for the epilogues that read global memory before they write (a weight gradient's
// +=, GeluGrad's pre): the tile holds 32-column blocks of 64 rows × 128 bytes, 8 KB apart, row r's
// 16-byte chunk c (4 floats) at chunk c ^ 2·(r % 4). One float2 store instruction of a warp (rows r0
// .. r0 + 7, r0 % 8 = 0, two chunks each) then touches each bank twice, the fewest 256 bytes allow,
// and each half-warp (rows r0 .. r0 + 3, r0 + 4 .. r0 + 7) every bank once; the float4 reads of
// TilePiecesF32 take, per quarter-warp, the 8 chunks of one row in one block.
__device__ inline int swizzled_f32_at(int r, int col) {
    return col / 32 * (64 * 128) + r * 128 + ((col % 32 / 4) ^ (2 * (r % 4))) * 16 + col % 4 * 4;
}
template <int N>
__device__ inline void wgmma_accumulators_to_tile_f32(unsigned char* tile, const float (&d)[N / 2]) {
    static_assert(N % 32 == 0, "whole 32-column blocks");
    for_each_accumulator_pair<N>(d, [&](int r, int col, float a, float b) {
        *reinterpret_cast<float2*>(tile + swizzled_f32_at(r, col)) = make_float2(a, b);
    });
}
// This thread's pieces of such a tile: piece j (j < count) is row row(j)'s columns col(j) .. col(j) + 3,
// and a warp's 32 consecutive pieces lie along rows (512 bytes of one row for N = 128, 256).
template <int N>
struct TilePiecesF32 {
    static_assert(N >= 32 && N % 32 == 0, "whole 32-column blocks, a quarter-warp's pieces in one row");
    static constexpr int per_row = N / 4, count = 64 * per_row / 128;
    const unsigned char* tile;
    __device__ int row(int j) const { return (threadIdx.x % 128 + 128 * j) / per_row; }
    __device__ int col(int j) const { return (threadIdx.x % 128 + 128 * j) % per_row * 4; }
    __device__ float4 value(int j) const {
        return *reinterpret_cast<const float4*>(tile + swizzled_f32_at(row(j), col(j)));
    }
};

// mbarriers in shared memory, for pipelines whose stages are handed on without a block barrier: a
// barrier initialised for `count` arrivals completes a phase when that many have arrived, and a
// waiter names the phase by its parity (0, 1, 0, ...).
__device__ inline void mbarrier_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
}
__device__ inline void mbarrier_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
}
// This thread's arrival, made when all the cp.async copies it has issued so far have landed.
__device__ inline void cp_async_mbarrier_arrive(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(bar)) : "memory");
}
__device__ inline void mbarrier_wait(uint64_t* bar, int parity) {
    uint32_t done = 0;
    while (!done)
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_address(bar)), "r"(parity)
            : "memory");
}

// The accumulators of an m64nNk16 product, operands %0 .. %(N/2 − 1) of its asm: their constraints
// (D) and their register list (R); the instruction's other operands follow, numbered from N/2.
#define LMOE_WGMMA_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define LMOE_WGMMA_F16(d, i) \
    LMOE_WGMMA_F4(d, i), LMOE_WGMMA_F4(d, i + 4), LMOE_WGMMA_F4(d, i + 8), LMOE_WGMMA_F4(d, i + 12)
#define LMOE_WGMMA_D32(d) LMOE_WGMMA_F16(d, 0), LMOE_WGMMA_F16(d, 16)
#define LMOE_WGMMA_D64(d) LMOE_WGMMA_D32(d), LMOE_WGMMA_F16(d, 32), LMOE_WGMMA_F16(d, 48)
#define LMOE_WGMMA_D128(d) \
    LMOE_WGMMA_D64(d), LMOE_WGMMA_F16(d, 64), LMOE_WGMMA_F16(d, 80), LMOE_WGMMA_F16(d, 96), LMOE_WGMMA_F16(d, 112)
#define LMOE_WGMMA_R32 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define LMOE_WGMMA_R64 LMOE_WGMMA_R32 ", " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define LMOE_WGMMA_R128 LMOE_WGMMA_R64 ", " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
// The asm of wgmma_ss and wgmma_rs; DA, DB, ACC, TA, TB, A0 .. A3: the operand numbers of desc_a,
// desc_b, accumulate, TRANS_A, TRANS_B and a[0 .. 3] (asm wants them spelled out).
#define LMOE_WGMMA_SS(N, R, D, DA, DB, ACC, TA, TB)                                                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #ACC ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" R "}, %" #DA ", %" #DB \
                 ", p, 1, 1, %" #TA ", %" #TB ";\n}\n"                                               \
                 : D                                                                                 \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B))
#define LMOE_WGMMA_RS(N, R, D, A0, A1, A2, A3, DB, ACC, TB)                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #ACC ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" R "}, {%" #A0 ", %" #A1 \
                 ", %" #A2 ", %" #A3 "}, %" #DB ", p, 1, 1, %" #TB ";\n}\n"                          \
                 : D                                                                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))

// D (64 × N, N = 64, 128 or 256) += A (64 × 16) B (16 × N) from shared memory; TRANS_A = 1 reads A
// MN-major (its tile's rows along k), TRANS_B = 1 reads B MN-major; accumulate = 0 overwrites D.
template <int N, int TRANS_A, int TRANS_B>
__device__ inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma widths 64, 128, 256");
    if constexpr (N == 64) LMOE_WGMMA_SS(64, LMOE_WGMMA_R32, LMOE_WGMMA_D32(d), 32, 33, 34, 35, 36);
    else if constexpr (N == 128) LMOE_WGMMA_SS(128, LMOE_WGMMA_R64, LMOE_WGMMA_D64(d), 64, 65, 66, 67, 68);
    else LMOE_WGMMA_SS(256, LMOE_WGMMA_R128, LMOE_WGMMA_D128(d), 128, 129, 130, 131, 132);
}

// D (64 × N) += A B with A in registers (four bf16x2 a thread, as mma.sync's A: rows 16·warp + lane/4
// and + 8, k 2·(lane%4) and + 8) and B from shared memory: the accumulator fragments of an earlier
// product, packed to bf16 in pairs, are this A operand as they stand (wgmma_accumulators_as_a).
template <int N, int TRANS_B>
__device__ inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma widths 64, 128, 256");
    if constexpr (N == 64) LMOE_WGMMA_RS(64, LMOE_WGMMA_R32, LMOE_WGMMA_D32(d), 32, 33, 34, 35, 36, 37, 38);
    else if constexpr (N == 128) LMOE_WGMMA_RS(128, LMOE_WGMMA_R64, LMOE_WGMMA_D64(d), 64, 65, 66, 67, 68, 69, 70);
    else LMOE_WGMMA_RS(256, LMOE_WGMMA_R128, LMOE_WGMMA_D128(d), 128, 129, 130, 131, 132, 133, 134);
}

#undef LMOE_WGMMA_F4
#undef LMOE_WGMMA_F16
#undef LMOE_WGMMA_D32
#undef LMOE_WGMMA_D64
#undef LMOE_WGMMA_D128
#undef LMOE_WGMMA_R32
#undef LMOE_WGMMA_R64
#undef LMOE_WGMMA_R128
#undef LMOE_WGMMA_SS
#undef LMOE_WGMMA_RS

// d (64 × N) = A B^T over K = 16·KSTEPS, A (64 rows) and B (N rows) K-major tiles of a_block and
// b_block bytes per 64-column block; issued, not committed (the caller commits once with its other
// products).
template <int N, int KSTEPS>
__device__ inline void wgmma_kmajor(float (&d)[N / 2], const void* a, uint32_t a_block, const void* b,
                                    uint32_t b_block) {
#pragma unroll
    for (int k = 0; k < KSTEPS; k++)
        wgmma_ss<N, 0, 0>(d, wgmma_desc_kmajor(a, a_block, k), wgmma_desc_kmajor(b, b_block, k), k);
}

// The A operands of a product's KK k-steps from the fp32 accumulators of a (64 × 16·KK) one:
// d[8kk .. 8kk + 7] hold rows lane/4 and + 8, columns 16kk + 2·(lane%4) (+1) and + 8, in the order
// the A operand of k-step kk wants them.
template <int KK>
__device__ inline void wgmma_accumulators_as_a(uint32_t (&a)[KK][4], const float (&d)[8 * KK]) {
#pragma unroll
    for (int kk = 0; kk < KK; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++) a[kk][i] = pack_bf16x2(d[8 * kk + 2 * i], d[8 * kk + 2 * i + 1]);
}

// The pair of second products of a transposed backward (attention's dV, dK; the LatentMoE weight
// gradient's dV, dK): c0 += A0 B0 and c1 += A1 B1, (64 × N) accumulators, over K = 64 rows, with A0, A1
// the bf16 packing of the (64 × 64) fp32 accumulators a0, a1 taken as register A operands and B0, B1
// MN-major tiles of b_block bytes per 64-column block; k-steps interleaved, issued, not committed.
template <int N>
__device__ inline void wgmma_rs_pair_from_accumulators(float (&c0)[N / 2], const float (&a0)[32], const void* b0,
                                                       float (&c1)[N / 2], const float (&a1)[32], const void* b1,
                                                       uint32_t b_block) {
    uint32_t A0[4][4], A1[4][4];
    wgmma_accumulators_as_a<4>(A0, a0);
    wgmma_accumulators_as_a<4>(A1, a1);
    wgmma_fence_operands(c0);
    wgmma_fence_operands(c1);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        wgmma_rs<N, 1>(c0, A0[kk], wgmma_desc_mnmajor(b0, b_block, kk), 1);
        wgmma_rs<N, 1>(c1, A1[kk], wgmma_desc_mnmajor(b1, b_block, kk), 1);
    }
}
}  // namespace lmoe
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
