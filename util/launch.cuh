// Launching a kernel that needs more dynamic shared memory than the default 48 KB: the kernel's
// limit is raised to what this launch asks for first (a launch over the limit fails), then the
// launch is checked like every other CUDA call. Used by the expert kernels of both MoE families.
#pragma once
#include "util/cuda_utils.cuh"

namespace lmoe {

template <class Kernel, class... Args>
void launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream, Args... args) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes));
    kernel<<<grid, threads, smem_bytes, stream>>>(args...);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
