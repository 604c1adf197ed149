// Aux-loss-free load balancing (SPEC §2.3), shared by both FFN kinds: the routed copies each
// (layer, head) group of E experts received since the last optimizer step, and the bias update that
// steers the next steps' selection towards the under-loaded experts. The bias only shifts which
// experts are chosen; the gates are computed without it (moe/router.cuh).
#pragma once
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

}  // namespace lmoe
