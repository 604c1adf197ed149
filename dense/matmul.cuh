// Dense matmuls through cuBLAS (the project's one use of a library for arithmetic: plain GEMMs).
//
// Convention (cpu/reference.h): row-major tensors, a weight W: (O, I) maps I inputs to O outputs,
//   forward   out (N, O) = x (N, I) W^T
//   backward  dx  (N, I) = dout (N, O) W            (written, or added to dx)
//             dW  (O, I) += dout^T (O, N) x (N, I)   (fp32, always accumulated)
// cuBLAS is column-major: a row-major (R, C) buffer is the column-major (C, R) matrix, i.e. its
// transpose. So each product is computed transposed, out^T = W x^T and so on; the comments at each
// call give the column-major form. All products accumulate in fp32 (CUBLAS_COMPUTE_32F).
//
// Determinism (cuBLAS guide, "Results reproducibility"): every cuBLAS routine gives bitwise-identical
// results run to run on GPUs of the same architecture and SM count with the same toolkit version,
// provided a single CUDA stream is active on the handle. With several concurrent streams on one
// handle cuBLAS may pick different internal workspaces and implementations; so give each stream its
// own handle (make_cublas_handle per stream). The guarantee covers whatever cuBLAS does inside a call
// (e.g. a split-K reduction through its workspace); the only atomics-based variants are opt-in
// (cublasSetAtomicsMode), and make_cublas_handle pins that mode to "not allowed". Results are not
// reproducible across GPU models, SM counts or toolkit versions.
#pragma once
#include "util/cuda_utils.cuh"

namespace lmoe {

// A cuBLAS handle for the dense layers. LMOE_FP32 build: CUBLAS_PEDANTIC_MATH, true fp32 arithmetic
// (no TF32, no reduced-precision shortcuts), so the GPU can be checked tightly against the CPU
// reference. bf16 build: the default math mode (bf16 tensor cores, fp32 accumulation).
// Use one handle per CUDA stream (see the note on determinism above); destroy with cublasDestroy.
inline cublasHandle_t make_cublas_handle() {
    cublasHandle_t handle;
    CUBLAS_CHECK(cublasCreate(&handle));
#ifdef LMOE_FP32
    CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_PEDANTIC_MATH));
#else
    CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
#endif
    CUBLAS_CHECK(cublasSetAtomicsMode(handle, CUBLAS_ATOMICS_NOT_ALLOWED));  // the default; stated, not assumed
    return handle;
}

// out (N, O) floatX = x (N, I) floatX · W^T, W: (O, I) floatX.
// Column-major: out^T (O×N) = op_T(W as I×O) (O×I) · x^T (I×N).
inline void matmul_forward(cublasHandle_t handle, floatX* out, const floatX* x, const floatX* W, int N, int I, int O,
                           cudaStream_t stream) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasSetStream(handle, stream));
    CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, O, N, I, &one, W, kCudaFloatX, I, x, kCudaFloatX, I,
                              &zero, out, kCudaFloatX, O, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// dx (N, I) floatX  = (or += when accumulate_dx) dout (N, O) · W (O, I);  skipped when dx is null.
// dW (O, I) fp32   += dout^T · x   (floatX inputs, fp32 output: no rounding of the accumulated gradient).
inline void matmul_backward(cublasHandle_t handle, floatX* dx, float* dW, const floatX* dout, const floatX* x,
                            const floatX* W, int N, int I, int O, bool accumulate_dx, cudaStream_t stream) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasSetStream(handle, stream));
    if (dx) {
        // Column-major: dx^T (I×N) = W^T (I×O, W's buffer as is) · dout^T (O×N, dout's buffer as is).
        CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, I, N, O, &one, W, kCudaFloatX, I, dout,
                                  kCudaFloatX, O, accumulate_dx ? &one : &zero, dx, kCudaFloatX, I,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    // Column-major: dW^T (I×O) += x^T (I×N, x's buffer as is) · op_T(dout^T) (N×O).
    CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, I, O, N, &one, x, kCudaFloatX, I, dout, kCudaFloatX, O,
                              &one, dW, CUDA_R_32F, I, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace lmoe
