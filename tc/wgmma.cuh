// Warpgroup matrix multiply (wgmma, Hopper's sm_90a only: everything here is compiled where
// __CUDA_ARCH_FEAT_SM90_ALL is defined, and LMOE_HAS_WGMMA tells the kernels that it was).
// A warpgroup of 4 warps computes D (64 × N, fp32 in registers) += A (64 × 16) B (16 × N) with A and
// B read from shared memory through descriptors, asynchronously: issue, commit, wait.
// Operand tiles use the 128-byte swizzle: a tile is cut into blocks of 64 columns (128 bytes per
// row); within a block, row r's 16-byte chunk c sits at chunk c ^ (r % 8), and blocks are 1024-byte
// aligned. Such a (rows × cols) tile is a K-major operand when its columns run along k, an MN-major
// one (transposed) when its rows do.
// Accumulator fragments: d[i] is (row 16·warp + lane/4 + 8·((i/2) % 2), col 8·(i/4) + 2·(lane%4) + i%2).
// Users: moe/latent/expert_weight_backward.cuh, moe/latent/expert_rows_wgmma.cuh.
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

// The cp.async copies of N_ROWS rows of DH bf16 into a 128B-swizzled shared tile (zeros from `rows`
// on), as load_rows_async (tc/warp_tile.cuh) does for a padded one.
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

// D (64 × N) += A B with A in registers (four bf16x2 a thread, as mma.sync's A: rows 16·warp + lane/4
// and + 8, k 2·(lane%4) and + 8) and B from shared memory: the accumulator fragments of an earlier
// product, packed to bf16 in pairs, are this A operand as they stand (wgmma_accumulators_as_a).
template <int TRANS_B>
__device__ inline void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}
template <int TRANS_B>
__device__ inline void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
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
}  // namespace lmoe
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
