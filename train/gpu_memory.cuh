// The device memory the GPU path needs (SPEC §8.6), from the configuration alone: every buffer the
// constructors of GpuModel (train/gpu_model.cuh), LatentMoeFfn (train_latentmoe.cu), MoeFfn
// (moe_ep_baseline.cu), RoutingPlans (moe/routing_plan.cuh) and ExpertExchange
// (parallel/expert_dispatch.cuh) allocate, term by term in their order and under their names, so a
// new buffer there needs its line here. run_trainer compares it with cudaMemGetInfo's free memory
// before the model is built; after the first step GpuModel::print_memory_use prints it next to what
// the model and that step took.
//
// How close: the buffers are counted exactly; what is not counted is cudaMalloc's rounding (up to
// 2 MiB per buffer, ~60 buffers), cuBLAS's workspace and NCCL's buffers, for which a fixed 256 MiB is
// added, so the estimate errs high.
#pragma once
#include <cstdint>

#include "dense/attention.cuh"
#include "dense/embedding.cuh"
#include "dense/global_norm.cuh"
#include "dense/rmsnorm.cuh"
#include "model/config.h"
#include "moe/routing_plan.cuh"
#include "moe/router.cuh"
#include "moe/latent/expert_weight_backward.cuh"
#include "moe/locmoe_router.cuh"
#include "train/memory_estimate.h"
#include "util/cuda_utils.cuh"

namespace lmoe {

// cudaMemGetInfo's free bytes on the current device.
inline int64_t device_free_bytes() {
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return (int64_t)free_bytes;
}

// RoutingPlans(layers, M, H, E, k, routed): sel, gate, copy_pos (routed only), chunk_counts (routed
// only), copy_row, group_offset, tile_group, tile_start, num_tiles.
inline int64_t routing_plans_bytes(int64_t layers, int64_t M, int64_t H, int64_t E, int64_t k, bool routed) {
    const int64_t n = H * M * k, tiles = routing_max_tiles((int)M, (int)H, (int)E, (int)k), i = 4;
    int64_t b = 0;
    if (routed) b += 3 * layers * n * i + H * routing_chunks((int)M) * E * i;
    b += layers * n * i + layers * (H * E + 1) * i + 2 * layers * tiles * i + layers * i;
    return b;
}

// The FFN layer's buffers for N tokens per rank on `world` ranks.
inline int64_t ffn_device_bytes(const Config& c, int64_t N, int world) {
    const int64_t X = sizeof(floatX), L = c.L, k = c.k, R = world;
    if (c.ffn == FfnKind::LatentMoE) {  // LatentMoeFfn's constructor
        const int64_t HD = (int64_t)c.H * c.dh, Hl = c.H / world, copies = (int64_t)c.H * N * k;
        return routing_plans_bytes(L, R * N, Hl, c.E, k, true)             // plans_
               + 2 * L * N * HD * X + L * copies * c.dh * X                // U_, y_, o_
               + 4 * N * HD * X                                            // rows_, heads_, heads2_, exchange_
               + 2 * copies * c.dh * X + copies * 4                        // d_o_, dx_copy_, ds_copy_
               + (int64_t)router_grad_scratch_size((int)(Hl * c.E), c.dh) * 4  // router_grad_scratch_
               + Hl * c.E * c.dh * X                                       // router_t_
               + WeightGradScratch::bytes((int)(R * N), (int)Hl, c.E, c.k, c.fe, c.dh);  // weight_parts_
    }
    // MoeFfn's constructor (and its ExpertExchange on several ranks)
    const int64_t d = c.d, copies = N * k, rows = world > 1 ? R * N * k : copies;
    int64_t b = routing_plans_bytes(L, N, 1, c.E, k, true);  // plans_
    if (world > 1)  // ExpertExchange: owner_plans_, counts_, send_base_, remote_rows_, rows_out_, received_, staging_
        b += routing_plans_bytes(L, rows, 1, c.E / world, 1, false) + (L * world * c.E + L * world + 2 * L) * 4 + 8 +
             L * rows * d * X + rows * d * X;
    b += L * copies * d * X + 2 * L * rows * c.fe * X;               // o_, pre_, h_
    b += 2 * copies * d * X + copies * 4 + rows * c.fe * X;          // d_o_, dx_copy_, ds_copy_, dpre_
    if (!c.locmoe())  // router_grad_scratch_, router_t_
        b += (int64_t)router_grad_scratch_size(c.E, c.d) * 4 + c.E * d * X;
    else  // target_, coef_, layer_loss_, layer_dropped_, step_loss_, step_dropped_, grap_parts_
        b += (c.E + L * c.E + 2 * L + L + 2 + L + (int64_t)grap_parts_size((int)N, c.E)) * 4;
    if (world > 1) b += rows * d * X;                                // expert_rows_
    return b;
}

// GpuModel's own buffers on one rank of `world` (its constructor), then the FFN's.
inline MemoryEstimate gpu_memory_estimate(const Config& c, int world) {
    const ParamLayout layout = checked_param_layout(c, world);
    const int64_t P = layout.total, tensors = (int64_t)layout.tensors.size(), X = sizeof(floatX), f = 4;
    const int64_t B = c.B, T = c.T, N = B * T, d = c.d, L = c.L, C = (int64_t)c.n_head * c.d_attn(), Vp = c.Vp();
    const int64_t heads = c.ffn == FfnKind::LatentMoE ? c.H / world : 1;
    const int64_t activations =
        2 * N * 4                                             // tokens_, targets_
        + (L + 1) * N * d * X + 3 * L * N * d * X            // resid_, resid_mid_, xn1_, xn2_
        + 2 * L * N * f                                       // rstd1_, rstd2_
        + L * N * 3 * C * X + L * B * c.n_head * T * f        // qkv_, lse_
        + L * N * C * X                                       // atty_
        + N * d * X + N * f                                   // xf_, rstdf_
        + N * Vp * X + N * f + f                              // logits_, losses_, mean_loss_
        + 3 * N * d * X + 3 * N * C * X + N * C * X          // branch_, dresid_, dxn_, dqkv_, datty_
        + (int64_t)attention_scratch_bytes(c.B, c.T, c.n_head)
        + (int64_t)std::max(rmsnorm_backward_scratch_floats((int)N, c.d), global_norm_scratch_size()) * f
        + (int64_t)embedding_backward_scratch_bytes((int)N, c.Vp()) + 3 * f  // ... embedding_scratch_, clip_
        + 2 * f;                                              // loss_norm_
    MemoryEstimate e;
    e.parts = {
        {"weights, gradients and AdamW moments", 4 * P * f + P * X + tensors * 12},  // master grads m v, params, decay
        {"routing balance", L * heads * c.E * (4 + 4)},                // balance: bias, counts
        {"activations", activations},
        {"FFN buffers", ffn_device_bytes(c, N, world)},
        {"allocation rounding, cuBLAS, NCCL", 256ll << 20},
    };
    return e;
}

}  // namespace lmoe
