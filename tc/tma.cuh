// The tensor memory accelerator (TMA, Hopper's bulk tensor copy; sm_90a kernels): one thread copies a
// whole box of a matrix from global into shared memory, laid out with the 128-byte swizzle of
// tc/wgmma.cuh's operand tiles, and the copy's bytes complete an mbarrier's phase. The box is
// described on the host by a tensor map (make_tensor_map), passed to the kernel as a
// __grid_constant__ parameter; boxes that reach past the matrix's edges read zeros there, so
// partial tiles need no masking. Users: moe/grouped/grouped_gemm.cuh, moe/latent/expert_rows_wgmma.cuh,
// dense/attention.cuh.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "tc/wgmma.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// The tensor map of a bf16 array of rank 3, dims[0] innermost (contiguous), strides in elements of
// dims 1 and 2, read in boxes of box0 × box1 × 1 elements (box0 · 2 = 128 bytes: one 64-column block
// of a swizzled tile, box1 rows). The driver's encoder is looked up once through the runtime, so
// nothing links against libcuda.
inline CUtensorMap make_tensor_map(const bf16* base, const uint64_t (&dims)[3], const uint64_t (&strides)[2],
                                   uint32_t box0, uint32_t box1) {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
        CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
        if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
            std::fprintf(stderr, "error: the CUDA driver has no cuTensorMapEncodeTiled (TMA needs a driver for CUDA 12 or later)\n");
            std::exit(1);
        }
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    CUtensorMap map{};
    const cuuint64_t global_dim[3] = {dims[0], dims[1], dims[2]};
    const cuuint64_t global_stride[2] = {strides[0] * sizeof(bf16), strides[1] * sizeof(bf16)};  // bytes
    const cuuint32_t box[3] = {box0, box1, 1}, element_stride[3] = {1, 1, 1};
    const CUresult status = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<bf16*>(base), global_dim,
                                   global_stride, box, element_stride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                   CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (status != CUDA_SUCCESS) {
        std::fprintf(stderr, "error: cuTensorMapEncodeTiled failed (CUresult %d) for dims %llu x %llu x %llu, box %u x %u\n",
                     (int)status, (unsigned long long)dims[0], (unsigned long long)dims[1], (unsigned long long)dims[2],
                     box0, box1);
        std::exit(1);
    }
    return map;
}

}  // namespace lmoe

#if defined(LMOE_HAS_WGMMA)
namespace lmoe {

// Makes mbarrier_init visible to the async proxy (the TMA unit completes transactions on it).
__device__ inline void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// This thread's arrival on bar, announcing `bytes` more that copies will deliver to it in this phase.
__device__ inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
                 : "memory");
}

// The box of `map` at element coordinates (c0, c1, c2) into dst (1024-byte aligned), its bytes counted
// on bar.
__device__ inline void tma_load_3d(void* dst, const CUtensorMap& map, int c0, int c1, int c2, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
            smem_address(dst)),
        "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_address(bar))
        : "memory");
}

}  // namespace lmoe
#endif  // LMOE_HAS_WGMMA
