// Tensor-core building blocks (sm_80+, used on Hopper): the bf16 m16n8k16 matrix-multiply-accumulate,
// ldmatrix loads of its operands from shared memory, and cp.async copies that fill shared memory
// while the tensor cores work on what is already there. Fragment layouts (PTX ISA, "mma.m16n8k16"):
// with g = lane / 4 and q = lane % 4,
//   A (16×16, bf16): a[0] = (row g,   k 2q..2q+1)   a[1] = (row g+8, k 2q..)
//                    a[2] = (row g,   k 2q+8..)     a[3] = (row g+8, k 2q+8..)
//   B (16×8,  bf16): b[0] = (k 2q..2q+1, col g)     b[1] = (k 2q+8.., col g)
//   C (16×8,  fp32): c[0..1] = (row g, cols 2q, 2q+1)   c[2..3] = (row g+8, cols 2q, 2q+1)
// so the accumulators of two adjacent 16×8 products are, packed to bf16, exactly the A operand of a
// following product (FlashAttention-2's trick): hidden activations go from one matmul to the next
// without leaving registers.
// Users: the LatentMoE expert kernels (through tc/warp_tile.cuh, tc/wgmma.cuh) and the MoE's grouped
// GEMMs (moe/grouped/grouped_gemm.cuh), whose epilogues also read ahead through read_all_then_write.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace lmoe {

using bf16 = __nv_bfloat16;

__device__ inline uint32_t smem_address(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// D += A B for one 16×8 tile.
__device__ inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row_address)));
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row_address)));
}

__device__ inline uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Operand loads from row-major shared-memory tiles of bf16 with `ld` elements per row. Each gives
// what one warp needs for one 16×16 A operand, or the B operands of two adjacent 16×8 tiles. An
// operand tile is stored with k along its rows ([m][k] for A, [n][k] for B), or transposed (TRANS:
// [k][m], [k][n]); ldmatrix's .trans form makes the two give the same fragments.

// A (16×16) at (m0, k0) of an [m][k] tile, or of a [k][m] one (TRANS).
template <bool TRANS = false>
__device__ inline void load_a(uint32_t (&a)[4], const bf16* tile, int ld, int m0, int k0) {
    const int lane = threadIdx.x % 32, i = lane / 8, r = lane % 8;
    if constexpr (TRANS) ldmatrix_x4_trans(a, tile + (k0 + r + (i / 2) * 8) * ld + m0 + (i % 2) * 8);
    else ldmatrix_x4(a, tile + (m0 + r + (i % 2) * 8) * ld + k0 + (i / 2) * 8);
}
// B for n-tiles n0..n0+7 (b[0], b[1]) and n0+8..n0+15 (b[2], b[3]), k0..k0+15, from an [n][k] tile,
// or from a [k][n] one (TRANS).
template <bool TRANS = false>
__device__ inline void load_b_pair(uint32_t (&b)[4], const bf16* tile, int ld, int n0, int k0) {
    const int lane = threadIdx.x % 32, i = lane / 8, r = lane % 8;
    if constexpr (TRANS) ldmatrix_x4_trans(b, tile + (k0 + r + (i % 2) * 8) * ld + n0 + (i / 2) * 8);
    else ldmatrix_x4(b, tile + (n0 + r + (i / 2) * 8) * ld + k0 + (i % 2) * 8);
}
// The A operands of MT row tiles m0 + 16·mt, and the B pairs of NP column pairs n0 + 16·np.
template <int MT, bool TRANS = false>
__device__ inline void load_a_tiles(uint32_t (&a)[MT][4], const bf16* tile, int ld, int m0, int k0) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++) load_a<TRANS>(a[mt], tile, ld, m0 + 16 * mt, k0);
}
template <int NP, bool TRANS = false>
__device__ inline void load_b_pairs(uint32_t (&b)[NP][4], const bf16* tile, int ld, int n0, int k0) {
#pragma unroll
    for (int np = 0; np < NP; np++) load_b_pair<TRANS>(b[np], tile, ld, n0 + 16 * np, k0);
}

// D0 += A B0, D1 += A B1 for two adjacent 16×8 tiles sharing A, with b as load_b_pair gives it.
__device__ inline void mma_bf16_16816_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[4]) {
    mma_bf16_16816(d0, a, b[0], b[1]);
    mma_bf16_16816(d1, a, b[2], b[3]);
}

// Asynchronous 16-byte copy global → shared (cp.async.cg: bypasses L1, the data is used once per
// block). With `valid` false nothing is read and the 16 bytes are zero-filled.
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid = true) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
// Asks L2 to fetch `rows` rows of `row_bytes` bytes, `stride` bytes apart from `p` on (the 128-byte
// lines that hold them, spread over the NT threads of the block): a kernel that ends in a
// read-modify-write of a tile issues it first, so that the epilogue's reads find L2 rather than DRAM.
template <int NT>
__device__ inline void prefetch_l2(const void* p, int rows, int row_bytes, int64_t stride) {
    const int lines = (row_bytes + 127) / 128 + 1;  // at most, for a row that does not start on a line
    for (int i = threadIdx.x; i < rows * lines; i += NT) {
        const char* row = static_cast<const char*>(p) + i / lines * stride;
        const int lead = (int)(reinterpret_cast<uintptr_t>(row) % 128), j = i % lines;
        if (j * 128 < lead + row_bytes) asm volatile("prefetch.L2 [%0];\n" ::"l"(row - lead + j * 128));
    }
}
// The reads of an epilogue's N accumulator pairs, all issued before the first write: old[j] = read(j),
// then write(j, old[j]) for each j. Done pair by pair, each read would wait for the write before it
// (a store may alias the next load, so neither the compiler nor the hardware moves the load ahead):
// one memory latency per pair instead of one per N pairs.
template <int N, class Read, class Write>
__device__ inline void read_all_then_write(Read read, Write write) {
    decltype(read(0)) old[N];
#pragma unroll
    for (int j = 0; j < N; j++) old[j] = read(j);
#pragma unroll
    for (int j = 0; j < N; j++) write(j, old[j]);
}
// Closes the group of copies issued since the last commit; cp_async_wait<n> waits until at most n
// groups are still in flight (the copies of this thread only: follow it with a barrier).
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int n>
__device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory"); }

}  // namespace lmoe
