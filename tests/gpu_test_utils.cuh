// Shared pieces of the GPU tests: skipping without a GPU, fresh random inputs, conversions between
// floatX and double, and the error measure every kernel is judged by (SPEC §8.3):
// ‖got − ref‖ / ‖ref‖ against the CPU reference in double, with NaN never passing.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "util/cuda_utils.cuh"
#include "util/rng.h"
#include "tests/check.h"

namespace gpu_test {

// fp32 build: tight; bf16 build: loose (bf16 keeps 8 bits of mantissa). kGateTolerance: the routed
// layers' gates (plan.gate, fp32 in both builds).
#ifdef LMOE_FP32
constexpr double kTolerance = 1e-5;
constexpr double kGateTolerance = 1e-5;
constexpr const char* kPrecision = "fp32";
#else
constexpr double kTolerance = 2e-2;
constexpr double kGateTolerance = 1e-2;
constexpr const char* kPrecision = "bf16";
#endif

// Exits with CTest's skip code when there is no GPU; otherwise prints which one the test runs on.
inline void skip_without_gpu() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        std::printf("skipped: no GPU found\n");
        std::exit(77);
    }
    if (const std::string why = lmoe::gpu_architecture_mismatch(); !why.empty()) {
        std::printf("FAILED: %s\n", why.c_str());
        std::exit(1);
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("GPU: %s (%s build)\n", prop.name, kPrecision);
}

inline std::vector<double> random_normal(lmoe::Rng& rng, size_t n, double scale = 1.0) {
    std::vector<double> v(n);
    for (double& x : v) x = scale * rng.normal();
    return v;
}

// Rounds through T (e.g. floatX) so the reference sees exactly the values the GPU sees.
template <class T>
std::vector<T> to_device_type(const std::vector<double>& v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = from_float<T>(float(v[i]));
    return out;
}
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = to_float(v[i]);
    return out;
}
// The values a device buffer of T will hold for these doubles, as doubles (for the reference's inputs).
template <class T>
std::vector<double> rounded(const std::vector<double>& v) { return to_double(to_device_type<T>(v)); }

template <class T>
lmoe::DeviceBuffer<T> upload(const std::vector<double>& v) {
    lmoe::DeviceBuffer<T> b(v.size());
    b.upload(to_device_type<T>(v));
    return b;
}

// n elements at a device address, on the host.
template <class T>
std::vector<T> download(const T* device, size_t n) {
    std::vector<T> host(n);
    CUDA_CHECK(cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
}

// ‖got − ref‖ / ‖ref‖; infinity if anything is NaN or infinite (an unwritten, poisoned element).
inline double rel_error(const std::vector<double>& got, const std::vector<double>& ref) {
    if (got.size() != ref.size()) return INFINITY;
    double diff = 0, norm = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return INFINITY;
        diff += (got[i] - ref[i]) * (got[i] - ref[i]);
        norm += ref[i] * ref[i];
    }
    return norm == 0 ? (diff == 0 ? 0 : INFINITY) : std::sqrt(diff / norm);
}

// Records and prints one comparison against the reference.
inline void expect_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                         double tolerance = kTolerance) {
    double err = rel_error(got, ref);
    std::printf("  %-44s rel err %.2e (tolerance %.0e)\n", what.c_str(), err, tolerance);
    CHECK_MSG(err <= tolerance, what + ": relative error " + std::to_string(err));
}

template <class T>
void expect_close(const std::string& what, const lmoe::DeviceBuffer<T>& got, const std::vector<double>& ref,
                  double tolerance = kTolerance) {
    expect_close(what, to_double(got.download()), ref, tolerance);
}

// Random starting values of a gradient the kernels must add to (N(0, 1) in fp32).
inline std::vector<float> random_gradient_start(lmoe::Rng& rng, size_t n) {
    std::vector<float> v(n);
    for (float& g : v) g = float(rng.normal());
    return v;
}
// A weight gradient before a run: `start` where the run adds to it, poisoned where it writes it (then
// every element it fails to write reads NaN).
inline void prepare_gradient(lmoe::DeviceBuffer<float>& g, const std::vector<float>& start, bool accumulate) {
    if (accumulate) g.upload(start);
    else g.poison();
}
// got − start, element by element: what a kernel added to an accumulated gradient.
inline std::vector<double> increment(const lmoe::DeviceBuffer<float>& got, const std::vector<float>& start) {
    const std::vector<float> g = got.download();
    std::vector<double> out(g.size());
    for (size_t i = 0; i < g.size(); i++) out[i] = (double)g[i] - (double)start[i];
    return out;
}

// The same bytes: for "a second run is bitwise identical".
template <class A, class B>
bool same_bytes(const A& a, const B& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
}

// Bitwise reproducible: after rerun(), every one of the device buffers must hold the same bytes as
// before it; `what` is the failure message.
template <class Rerun, class... Buffers>
void expect_rerun_identical(const std::string& what, Rerun&& rerun, const Buffers&... buffers) {
    const auto before = std::make_tuple(buffers.download()...);
    rerun();
    const bool same = std::apply([&](const auto&... b) { return (same_bytes(b, buffers.download()) && ...); }, before);
    CHECK_MSG(same, what);
}

// ---------------------------------------------------------------------------------------------
// Benchmark timing: medians over `reps` runs after three warm-up runs, on the default stream. Each
// run starts behind a short busy wait on the GPU, so that the host has queued the whole run before
// the GPU reaches its first event: the time measured is the GPU's, as in a training step (where the
// host runs ahead), not the host's launch latency, which would otherwise add some microseconds to
// every short kernel.

__global__ void busy_wait_kernel(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
inline void queue_behind_busy_wait() {
    busy_wait_kernel<<<1, 1>>>(200000);  // some 0.1 ms: longer than queuing a run of launches takes
    CUDA_CHECK_LAUNCH();
}

inline float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Median milliseconds of launch().
template <class Launch>
float time_ms(int reps, Launch&& launch) {
    cudaEvent_t ev[2];
    for (auto& e : ev) CUDA_CHECK(cudaEventCreate(&e));
    std::vector<float> t;
    for (int rep = -3; rep < reps; rep++) {
        queue_behind_busy_wait();
        CUDA_CHECK(cudaEventRecord(ev[0], 0));
        launch();
        CUDA_CHECK(cudaEventRecord(ev[1], 0));
        CUDA_CHECK(cudaEventSynchronize(ev[1]));
        float x;
        CUDA_CHECK(cudaEventElapsedTime(&x, ev[0], ev[1]));
        if (rep >= 0) t.push_back(x);
    }
    for (auto& e : ev) CUDA_CHECK(cudaEventDestroy(e));
    return median(t);
}

// Median milliseconds of each of `stages` stages of run(events), which records events[0] first and
// events[i + 1] at the end of stage i; the last entry is the whole run.
template <class Run>
std::vector<float> time_stages(int stages, int reps, Run&& run) {
    std::vector<cudaEvent_t> ev(stages + 1);
    for (auto& e : ev) CUDA_CHECK(cudaEventCreate(&e));
    std::vector<std::vector<float>> ms(stages + 1);
    for (int rep = -3; rep < reps; rep++) {
        queue_behind_busy_wait();
        run(ev.data());
        CUDA_CHECK(cudaEventSynchronize(ev[stages]));
        if (rep < 0) continue;
        for (int i = 0; i < stages; i++) {
            float t;
            CUDA_CHECK(cudaEventElapsedTime(&t, ev[i], ev[i + 1]));
            ms[i].push_back(t);
        }
        float total;
        CUDA_CHECK(cudaEventElapsedTime(&total, ev[0], ev[stages]));
        ms[stages].push_back(total);
    }
    for (auto& e : ev) CUDA_CHECK(cudaEventDestroy(e));
    std::vector<float> medians;
    for (const auto& m : ms) medians.push_back(median(m));
    return medians;
}

// One line per stage from time_stages' medians: its time and, where flops[i] > 0, its rate.
inline void print_stages(int stages, const char* const* names, const std::vector<float>& ms, const double* flops) {
    for (int i = 0; i < stages; i++) {
        const double t = ms[i];
        std::printf("  %-30s %8.3f ms", names[i], t);
        if (flops[i] > 0) std::printf("  %6.1f TFLOP/s", flops[i] / (t * 1e-3) / 1e12);
        std::printf("\n");
    }
}

// Median milliseconds of launch() alone, printed as one kernel line with its rate at `flops` FLOPs.
template <class Launch>
void time_kernel(const char* name, int reps, double flops, Launch&& launch) {
    const double t = time_ms(reps, launch);
    std::printf("  kernel %-23s %8.3f ms  %6.1f TFLOP/s\n", name, t, flops / (t * 1e-3) / 1e12);
}

}  // namespace gpu_test
