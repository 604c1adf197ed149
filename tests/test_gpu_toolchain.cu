// GPU smoke test of the libraries the trainers build on, each checked against the CPU reference on
// fresh random inputs: cuBLAS in the row-major "y = x W^T" form the dense layers use, a one-rank
// NCCL all-reduce, and MPI starting without mpirun (a one-GPU run needs no launcher).
// Exits 77 (reported by CTest as skipped) when no GPU is present.
#include <cmath>
#include <cstdio>
#include <vector>

#include "util/cuda_utils.cuh"
#include "cpu/reference.h"
#include "util/rng.h"
#include "tests/check.h"

// y (N, O) = x (N, I) W^T with W (O, I), all row-major fp32. In column-major terms y^T = W x^T, so
// cuBLAS computes C (O×N) = op(W) (O×I) · x^T (I×N) with W's row-major buffer read as transposed.
void matmul_cublas(cublasHandle_t h, float* y, const float* x, const float* W, int N, int I, int O) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, O, N, I, &one, W, I, x, I, &zero, y, O));
}

void check_cublas(lmoe::Rng& rng) {
    const int N = 67, I = 96, O = 45;  // odd sizes catch transposed leading dimensions
    std::vector<float> x(N * I), W(O * I), y(N * O);
    for (float& v : x) v = float(rng.normal());
    for (float& v : W) v = float(rng.normal());
    std::vector<double> xd(x.begin(), x.end()), Wd(W.begin(), W.end()), yd(N * O);
    ref::matmul_forward(yd.data(), xd.data(), Wd.data(), N, I, O);

    float *dx, *dW, *dy;
    CUDA_CHECK(cudaMalloc(&dx, x.size() * 4));
    CUDA_CHECK(cudaMalloc(&dW, W.size() * 4));
    CUDA_CHECK(cudaMalloc(&dy, y.size() * 4));
    CUDA_CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dW, W.data(), W.size() * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(dy, 0xFF, y.size() * 4));  // poison: NaN wherever nothing is written
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_PEDANTIC_MATH));  // true fp32, no TF32
    matmul_cublas(h, dy, dx, dW, N, I, O);
    CUDA_CHECK(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost));
    double diff2 = 0, ref2 = 0;
    bool finite = true;
    for (size_t i = 0; i < y.size(); i++) {
        finite &= std::isfinite(y[i]);
        diff2 += (y[i] - yd[i]) * (y[i] - yd[i]);
        ref2 += yd[i] * yd[i];
    }
    double rel = std::sqrt(diff2 / ref2);
    std::printf("cuBLAS fp32 y = x W^T (%dx%dx%d): rel err %.2e vs the CPU reference\n", N, I, O, rel);
    CHECK_MSG(finite, "cuBLAS left unwritten (NaN) outputs");
    CHECK_MSG(rel < 1e-6, "cuBLAS matmul relative error " + std::to_string(rel));
    CUBLAS_CHECK(cublasDestroy(h));
    CUDA_CHECK(cudaFree(dx));
    CUDA_CHECK(cudaFree(dW));
    CUDA_CHECK(cudaFree(dy));
}

void check_nccl(lmoe::Rng& rng) {
    const int n = 1000;
    std::vector<float> host(n), back(n);
    for (float& v : host) v = float(rng.normal());
    float* buf;
    CUDA_CHECK(cudaMalloc(&buf, n * 4));
    CUDA_CHECK(cudaMemcpy(buf, host.data(), n * 4, cudaMemcpyHostToDevice));
    ncclComm_t comm;
    int device = 0;
    NCCL_CHECK(ncclCommInitAll(&comm, 1, &device));
    NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, comm, 0));
    CUDA_CHECK(cudaStreamSynchronize(0));
    CUDA_CHECK(cudaMemcpy(back.data(), buf, n * 4, cudaMemcpyDeviceToHost));
    CHECK_MSG(back == host, "a one-rank NCCL all-reduce must return its input unchanged");
    int version = 0;
    NCCL_CHECK(ncclGetVersion(&version));
    std::printf("NCCL %d: one-rank all-reduce ok\n", version);
    NCCL_CHECK(ncclCommDestroy(comm));
    CUDA_CHECK(cudaFree(buf));
}

int main(int argc, char** argv) {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::printf("skipped: no GPU found\n");
        return 77;
    }
    MPI_CHECK(MPI_Init(&argc, &argv));
    int world = 0;
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world));
    CHECK_MSG(world == 1, "started without mpirun, MPI must see one rank");
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("GPU 0: %s, sm_%d%d, %d SMs; MPI world %d\n", prop.name, prop.major, prop.minor,
                prop.multiProcessorCount, world);
    lmoe::Rng rng(42);
    check_cublas(rng);
    check_nccl(rng);
    MPI_CHECK(MPI_Finalize());
    return check::summary();
}
