// AdamW on fp32 master weights (SPEC §2.4), writing the floatX working copy the kernels read as it goes.
// One launch updates any range of the flat parameter buffer, every tensor in it with its own weight
// decay, four elements a thread; the few elements outside the range's groups of four take a launch
// of their own at each end, one a thread.
// Purely elementwise, so it is deterministic whatever the grid; it is bound by memory traffic
// (in bf16: 16 bytes read and 14 written per parameter).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "util/cuda_utils.cuh"

namespace lmoe {

namespace adamw_detail {

// W consecutive values, loaded or stored as one access (16 bytes for W = 4 fp32).
template <class T, int W>
struct alignas(sizeof(T) * W) Vec {
    T v[W];
};

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `work` items: enough to fill every SM, no more than the work needs.
inline int grid_stride_blocks(int64_t work) {
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t full = (int64_t)sms * (2048 / kThreads);
    return (int)std::max<int64_t>(1, std::min<int64_t>(full, ceil_div(work, kThreads)));
}

template <int W>
bool aligned_for(const void* p, size_t element_size) {
    return reinterpret_cast<uintptr_t>(p) % (element_size * W) == 0;
}

}  // namespace adamw_detail

// One AdamW step on element i, with g = grad · grad_scale (the clip factor):
//   m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;  θ −= lr · ( m̂ / (√v̂ + ε) + wd·θ ),
//   m̂ = m / (1−β1^t), v̂ = v / (1−β2^t);  param = floatX(θ).   As ref::adamw_update, in fp32, with the
// bias corrections folded into two per-step constants, lr / (1−β1^t) and 1 / √(1−β2^t): one division
// per element instead of three, which the kernel's memory-bound loop notices (docs/perf/single_gpu.md).
struct AdamWStep {
    float lr, beta1, beta2, eps;
    float step_size, inv_sqrt_bias_correction2;  // lr / (1−β1^t), 1 / √(1−β2^t)

    AdamWStep(float lr_, float beta1_, float beta2_, float eps_, float bias_correction1, float bias_correction2)
        : lr(lr_), beta1(beta1_), beta2(beta2_), eps(eps_), step_size(float((double)lr_ / bias_correction1)),
          inv_sqrt_bias_correction2(float(1 / std::sqrt((double)bias_correction2))) {}

    __device__ void operator()(float& theta, float& m, float& v, float g, float weight_decay) const {
        m = beta1 * m + (1.f - beta1) * g;
        v = beta2 * v + (1.f - beta2) * g * g;
        theta -= step_size * m / (sqrtf(v) * inv_sqrt_bias_correction2 + eps) + lr * weight_decay * theta;
    }
};

// The weight decay of each element of a flat buffer that holds many tensors: elements
// [end[j−1], end[j]) take weight_decay[j] (end[−1] = 0). One segment per tensor lets one launch
// update any run of adjacent tensors, however many there are.
struct DecaySegments {
    const int64_t* end;         // (count,) device, increasing; the last is the buffer's length
    const float* weight_decay;  // (count,) device
    int count;
};

// The device copy of a decay table, built once.
class DecayTable {
  public:
    DecayTable(const std::vector<int64_t>& end, const std::vector<float>& weight_decay) {
        end_.upload(end);
        weight_decay_.upload(weight_decay);
    }
    DecaySegments segments() const { return {end_.get(), weight_decay_.get(), (int)end_.size()}; }

  private:
    DeviceBuffer<int64_t> end_;
    DeviceBuffer<float> weight_decay_;
};

namespace adamw_detail {

// The segment of element e: the first j with end[j] > e (binary search; the table is tiny and stays
// in cache).
__device__ inline int segment_of(const DecaySegments& s, int64_t e) {
    int lo = 0, hi = s.count - 1;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (__ldg(s.end + mid) > e) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

}  // namespace adamw_detail

// Thread t owns elements [first + W·t, first + W·t + W) of the buffers, t < (end − first) / W
// (W = 4: one 16-byte load each of master, m, v, grad). One group per thread over a grid that covers
// the elements once, not a grid-stride loop over a grid sized to fill the SMs: the registers leave room
// for three quarters of an SM's threads, which would leave such a grid a last wave partly empty, and
// many short blocks keep more loads in flight (docs/perf/single_gpu.md has the rates of the block
// sizes and forms tried). A group may straddle two segments, so each element looks up its own decay,
// walking on from its first element's.
template <int W>
__global__ void __launch_bounds__(adamw_detail::kThreads)
    adamw_kernel(float* master, floatX* param, float* m, float* v, const float* grad, int64_t first, int64_t end,
                 AdamWStep step, DecaySegments decay, const float* grad_scale) {
    using adamw_detail::Vec;
    const int64_t e = first + ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (e + W > end) return;
    Vec<float, W> th = *reinterpret_cast<Vec<float, W>*>(master + e), mm = *reinterpret_cast<Vec<float, W>*>(m + e),
                  vv = *reinterpret_cast<Vec<float, W>*>(v + e), g = *reinterpret_cast<const Vec<float, W>*>(grad + e);
    const float scale = *grad_scale;
    Vec<floatX, W> p;
    int j = adamw_detail::segment_of(decay, e);
    for (int k = 0; k < W; k++) {
        while (e + k >= __ldg(decay.end + j)) j++;
        step(th.v[k], mm.v[k], vv.v[k], g.v[k] * scale, __ldg(decay.weight_decay + j));
        p.v[k] = from_float<floatX>(th.v[k]);
    }
    *reinterpret_cast<Vec<float, W>*>(master + e) = th;
    *reinterpret_cast<Vec<float, W>*>(m + e) = mm;
    *reinterpret_cast<Vec<float, W>*>(v + e) = vv;
    *reinterpret_cast<Vec<floatX, W>*>(param + e) = p;
}

// Elements [begin, end) of the flat buffers master, m, v, grad (fp32) and param (floatX, written from
// the new master): a range, so that a model can update its tensors in the order its next forward
// reads them, each range on its own (train/gpu_model.cuh); the result does not depend on how the
// buffers are cut into ranges. bias_correction1/2 = 1 − β1^t, 1 − β2^t for the 1-based step t;
// decay: the weight decay of every element of the buffers (indexed as the buffers are); grad_scale:
// device pointer to the factor every gradient is multiplied by (the clip scale). Any alignment works;
// where the buffers are 16-byte aligned the groups of four elements at multiples of 4 get vectorised
// accesses, the few elements before and after them one a thread.
inline void adamw_update(float* master, floatX* param, float* m, float* v, const float* grad, int64_t begin,
                         int64_t end, float lr, float beta1, float beta2, float eps, DecaySegments decay,
                         float bias_correction1, float bias_correction2, const float* grad_scale,
                         cudaStream_t stream) {
    using namespace adamw_detail;
    if (begin >= end) return;
    const AdamWStep step{lr, beta1, beta2, eps, bias_correction1, bias_correction2};
    const bool vectorised = aligned_for<4>(master, 4) && aligned_for<4>(m, 4) && aligned_for<4>(v, 4) &&
                            aligned_for<4>(grad, 4) && aligned_for<4>(param, sizeof(floatX));
    // [begin, first4) and [last4, end) one at a time, the groups of four in [first4, last4) between.
    const int64_t first4 = vectorised ? std::min(end, ceil_div(begin, 4) * 4) : end;
    const int64_t last4 = vectorised ? std::max(first4, end / 4 * 4) : end;
    auto scalar = [&](int64_t from, int64_t to) {
        if (from >= to) return;
        adamw_kernel<1><<<ceil_div(to - from, kThreads), kThreads, 0, stream>>>(master, param, m, v, grad, from, to,
                                                                               step, decay, grad_scale);
        CUDA_CHECK_LAUNCH();
    };
    scalar(begin, first4);
    if (first4 < last4) {
        adamw_kernel<4><<<ceil_div((last4 - first4) / 4, kThreads), kThreads, 0, stream>>>(
            master, param, m, v, grad, first4, last4, step, decay, grad_scale);
        CUDA_CHECK_LAUNCH();
    }
    scalar(last4, end);
}

// param = floatX(master), elementwise (after loading or initialising the fp32 master weights).
__global__ void copy_master_to_param_kernel(floatX* param, const float* master, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        param[i] = from_float<floatX>(master[i]);
}

// param: (n,) floatX; master: (n,) fp32. Not on the hot path: runs once per load, so not vectorised.
inline void copy_master_to_param(floatX* param, const float* master, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    copy_master_to_param_kernel<<<adamw_detail::grid_stride_blocks(n), adamw_detail::kThreads, 0, stream>>>(
        param, master, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
