// Status checks for every CUDA, cuBLAS, NCCL and MPI call: a failure names the call, the file and
// line, and ends the program (a GPU error leaves the context unusable, so there is nothing to resume).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#ifndef LMOE_CUDA_ARCHITECTURES
#define LMOE_CUDA_ARCHITECTURES "?"
#endif

namespace lmoe {

[[noreturn]] inline void die(const char* kind, const char* what, const char* call, const char* file, int line) {
    std::fprintf(stderr, "%s error \"%s\" in %s at %s:%d\n", kind, what, call, file, line);
    std::exit(1);
}

// A template, so that every file including this header shares one definition of it.
template <int>
__global__ void architecture_probe_kernel() {}

// Empty when this build's GPU code runs on the current device; otherwise what to tell the user (a
// binary holds code for the CMAKE_CUDA_ARCHITECTURES it was built with, LMOE_CUDA_ARCHITECTURES).
inline std::string gpu_architecture_mismatch() {
    cudaFuncAttributes attributes;
    const cudaError_t err = cudaFuncGetAttributes(&attributes, architecture_probe_kernel<0>);
    if (err == cudaSuccess) return "";
    cudaGetLastError();  // clear the error
    if (err != cudaErrorNoKernelImageForDevice && err != cudaErrorInvalidDeviceFunction)
        return std::string("the GPU cannot run this program's code: ") + cudaGetErrorString(err);
    int device = 0;
    cudaDeviceProp prop{};
    cudaGetDevice(&device);
    cudaGetDeviceProperties(&prop, device);
    const std::string cc = std::to_string(prop.major) + std::to_string(prop.minor);
    return std::string("this binary holds GPU code for CUDA architecture ") + LMOE_CUDA_ARCHITECTURES +
           " only, which cannot run on " + prop.name + " (compute capability " + std::to_string(prop.major) + "." +
           std::to_string(prop.minor) + "): rebuild with cmake -B build -G Ninja -DCMAKE_CUDA_ARCHITECTURES=" + cc;
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

// ---------------------------------------------------------------------------------------------
// Precision (SPEC §5): activations and matmul inputs are floatX, bf16 by default; the LMOE_FP32
// build makes them fp32 so the GPU code can be checked tightly against the CPU reference. Master
// weights, gradients, optimizer state, router logits and softmax statistics are always fp32.
#include <cuda_bf16.h>

#include <vector>

#ifdef LMOE_FP32
using floatX = float;
constexpr cudaDataType_t kCudaFloatX = CUDA_R_32F;
#else
using floatX = __nv_bfloat16;
constexpr cudaDataType_t kCudaFloatX = CUDA_R_16BF;
#endif

__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __host__ __device__ inline T from_float(float x);
template <> __host__ __device__ inline float from_float<float>(float x) { return x; }
template <> __host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

namespace lmoe {

// 16 bytes of floatX, the unit of a vectorised load or store (8 values in bf16, 4 in fp32).
constexpr int kPack = 16 / sizeof(floatX);
struct alignas(16) Pack {
    floatX v[kPack];
};
// The Pack at p (16-byte aligned); kPack fp32 values rounded to floatX and stored as one Pack at p.
__device__ inline Pack load_pack(const floatX* p) { return *reinterpret_cast<const Pack*>(p); }
__device__ inline void store_pack(floatX* p, const float (&v)[kPack]) {
    Pack out;
#pragma unroll
    for (int i = 0; i < kPack; i++) out.v[i] = from_float<floatX>(v[i]);
    *reinterpret_cast<Pack*>(p) = out;
}

// A device allocation that frees itself; tests and the trainers hold their buffers in these.
template <class T>
class DeviceBuffer {
  public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t n) { resize(n); }
    ~DeviceBuffer() { if (ptr_) cudaFree(ptr_); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) { o.ptr_ = nullptr; o.n_ = 0; }

    void resize(size_t n) {
        if (ptr_) CUDA_CHECK(cudaFree(ptr_));
        ptr_ = nullptr;
        n_ = n;
        if (n) CUDA_CHECK(cudaMalloc(&ptr_, n * sizeof(T)));
    }
    T* get() const { return ptr_; }
    size_t size() const { return n_; }
    void upload(const std::vector<T>& host) {
        if (host.size() != n_) resize(host.size());
        CUDA_CHECK(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
    }
    std::vector<T> download() const {
        std::vector<T> host(n_);
        CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
        return host;
    }
    // The same, ordered on `stream` alone, which it synchronises. download() goes through the legacy
    // default stream and so also waits for the work of every other stream (a model's optimizer
    // stream among them): what a training step reads back goes through this one.
    std::vector<T> download(cudaStream_t stream) const {
        std::vector<T> host(n_);
        CUDA_CHECK(cudaMemcpyAsync(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        return host;
    }
    // Fills every byte with 0xFF: NaN for floats and bf16, -1 for integers. Tests poison outputs this
    // way before a kernel runs, so an element the kernel never wrote cannot pass for a right one.
    void poison() { CUDA_CHECK(cudaMemset(ptr_, 0xFF, n_ * sizeof(T))); }

  private:
    T* ptr_ = nullptr;
    size_t n_ = 0;
};

}  // namespace lmoe
