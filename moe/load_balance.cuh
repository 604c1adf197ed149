// Aux-loss-free load balancing (SPEC §2.3), shared by both FFN kinds: the routed copies each
// (layer, head) group of E experts received since the last optimizer step, and the bias update that
// steers the next steps' selection towards the under-loaded experts. The bias only shifts which
// experts are chosen; the gates are computed without it (moe/router.cuh).
#pragma once
#include <vector>

#include "moe/routing_plan.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// counts (H·E) += the sizes of the plan's (head, expert) groups.
__global__ void add_group_sizes_kernel(int* counts, const int* group_offset, int G) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g < G) counts[g] += group_offset[g + 1] - group_offset[g];
}

inline void add_group_sizes(int* counts, const RoutingPlan& plan, cudaStream_t stream) {
    const int G = plan.groups();
    add_group_sizes_kernel<<<(unsigned)ceil_div(G, 256), 256, 0, stream>>>(counts, plan.group_offset, G);
    CUDA_CHECK_LAUNCH();
}

// One (layer, head) group of E experts per block:
//   load_e = count_e / Σ count;   b_e += γ · (sign(1/E − load_e) − mean_e sign(1/E − load_e))
// The sign is taken exactly, in integers; the mean is summed in a fixed order.
__global__ void update_routing_bias_kernel(float* bias, const int* counts, int groups, int E, float gamma) {
    const int group = blockIdx.x;
    if (group >= groups || threadIdx.x != 0) return;
    const int* c = counts + (int64_t)group * E;
    float* b = bias + (int64_t)group * E;
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += c[e];
    if (total == 0) return;
    float mean_sign = 0.f;
    for (int e = 0; e < E; e++) {
        const int64_t gap = total - (int64_t)E * c[e];
        mean_sign += (float)((gap > 0) - (gap < 0));
    }
    mean_sign /= E;
    for (int e = 0; e < E; e++) {
        const int64_t gap = total - (int64_t)E * c[e];
        b[e] += gamma * ((float)((gap > 0) - (gap < 0)) - mean_sign);
    }
}

inline void update_routing_bias(float* bias, const int* counts, int groups, int E, float gamma, cudaStream_t stream) {
    if (gamma == 0.f) return;
    update_routing_bias_kernel<<<groups, 32, 0, stream>>>(bias, counts, groups, E, gamma);
    CUDA_CHECK_LAUNCH();
}

// The balancing state of a model's routed layers: a bias per (layer, routing group, expert) that
// steers selection, and the copies each expert received since the last optimizer step. The bias is
// part of the training state (checkpoints carry it); the counts are also what the log prints.
class LoadBalance {
  public:
    LoadBalance(int layers, int groups, int E)
        : groups_(groups), E_(E), bias_((size_t)layers * groups * E), counts_(bias_.size()) {
        CUDA_CHECK(cudaMemset(bias_.get(), 0, bias_.size() * sizeof(float)));
        CUDA_CHECK(cudaMemset(counts_.get(), 0, counts_.size() * sizeof(int)));
    }
    // (groups, E): layer l's biases, as router_forward reads them.
    const float* bias(int l) const { return bias_.get() + (size_t)l * groups_ * E_; }
    // Adds the group sizes of layer l's plan (its last forward) to the layer's counts.
    void count(int l, const RoutingPlan& plan, cudaStream_t stream) {
        add_group_sizes(counts_.get() + (size_t)l * groups_ * E_, plan, stream);
    }
    // Every layer's counts, for a sum over the ranks where each rank saw only its own tokens.
    int* counts() { return counts_.get(); }
    size_t size() const { return counts_.size(); }
    // The step's bias update, from the counts since the last one.
    void update(float gamma, cudaStream_t stream) {
        update_routing_bias(bias_.get(), counts_.get(), (int)(counts_.size() / E_), E_, gamma, stream);
    }
    // The counts since the last call, (layers, groups, E), on the host; they start again from zero.
    std::vector<int64_t> take_counts(cudaStream_t stream) {
        std::vector<int> c = counts_.download(stream);
        CUDA_CHECK(cudaMemsetAsync(counts_.get(), 0, counts_.size() * sizeof(int), stream));
        return std::vector<int64_t>(c.begin(), c.end());
    }
    std::vector<float> download_bias() const { return bias_.download(); }
    void upload_bias(const std::vector<float>& b) { bias_.upload(b); }

  private:
    int groups_, E_;
    DeviceBuffer<float> bias_;  // (layers, groups, E)
    DeviceBuffer<int> counts_;  // (layers, groups, E)
};

}  // namespace lmoe
