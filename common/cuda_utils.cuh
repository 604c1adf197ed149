// Status checks for every CUDA, cuBLAS, NCCL and MPI call: a failure names the call, the file and
// line, and ends the program (a GPU error leaves the context unusable, so there is nothing to resume).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>

namespace lmoe {

[[noreturn]] inline void die(const char* kind, const char* what, const char* call, const char* file, int line) {
    std::fprintf(stderr, "%s error \"%s\" in %s at %s:%d\n", kind, what, call, file, line);
    std::exit(1);
}

}  // namespace lmoe

#define CUDA_CHECK(call)                                                                          \
    do {                                                                                          \
        cudaError_t err_ = (call);                                                                \
        if (err_ != cudaSuccess) lmoe::die("CUDA", cudaGetErrorString(err_), #call, __FILE__, __LINE__); \
    } while (0)
// After a kernel launch: catches bad launch configurations at once.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
#define CUBLAS_CHECK(call)                                                                        \
    do {                                                                                          \
        cublasStatus_t st_ = (call);                                                              \
        if (st_ != CUBLAS_STATUS_SUCCESS) lmoe::die("cuBLAS", cublasGetStatusString(st_), #call, __FILE__, __LINE__); \
    } while (0)
#define NCCL_CHECK(call)                                                                          \
    do {                                                                                          \
        ncclResult_t r_ = (call);                                                                 \
        if (r_ != ncclSuccess) lmoe::die("NCCL", ncclGetErrorString(r_), #call, __FILE__, __LINE__); \
    } while (0)
#define MPI_CHECK(call)                                                                           \
    do {                                                                                          \
        int rc_ = (call);                                                                         \
        if (rc_ != MPI_SUCCESS) lmoe::die("MPI", "call failed", #call, __FILE__, __LINE__);       \
    } while (0)
