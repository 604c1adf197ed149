// The IO-aware expert kernels of Multi-Head LatentMoE (SPEC §4): FlashAttention's structure without
// the softmax. A tile of copies of one expert (rows X, gathered straight from the sub-token matrix)
// loops over the expert's hidden size in chunks:
//     A = GELU(X K_c^T)        O += A V_c
// and the (rows × fe) hidden activations never reach global memory. The backward recomputes them
// per tile. Expert weights K, V are (H, E, fe, dh) floatX; gradients fp32, added to or written.
//
// Two implementations of the same tiles: in the default bf16 build the tile products run on tensor
// cores, the hidden activations passed between products in registers (wgmma where the build targets
// sm_90a and the GPU is a Hopper, mma.sync m16n8k16 elsewhere); the fp32 build (LMOE_FP32) does them
// with fp32 FMAs on CUDA cores, so the math can be checked tightly. All are deterministic: every output
// element has one owner and a fixed summation order. Both tensor-core forms are bound by issue and
// latency, not by the tensor pipe: the wgmma forward issues more instructions a chunk than its
// products take cycles, over half of them the GELU's; with 185–255 registers the kernels hold two
// warps per scheduler, and the mma.sync ones end every chunk or 64-row step in a block barrier
// (docs/perf/expert_kernels.md has the measurements).
//
// This is the header a trainer includes. The kernels are cut by stage, not by implementation: each
// stage's file has its math, the fp32 kernel that spells it out, the tensor-core kernel and the
// launcher that picks one, so a reader looking for a stage finds all of it in one place:
//   moe/latent/expert_forward.cuh          expert_forward          o = V^T GELU(K x)
//   moe/latent/expert_input_backward.cuh   expert_input_backward   dx per copy
//   moe/latent/expert_weight_backward.cuh  expert_weight_backward  dK, dV (mma.sync, wgmma on sm_90a)
//   moe/latent/expert_rows_wgmma.cuh       the forward and input gradient on wgmma (sm_90a)
//   moe/latent/expert_tiles.cuh            tile shapes, SIMT tile helpers, head-size / chunk dispatch
// on the generic tensor-core blocks of tc/ (mma.cuh, warp_tile.cuh, wgmma.cuh) and moe/gelu.cuh.
#pragma once
#include "moe/latent/expert_tiles.cuh"
#include "moe/latent/expert_forward.cuh"
#include "moe/latent/expert_input_backward.cuh"
#include "moe/latent/expert_weight_backward.cuh"

namespace lmoe {

// The shapes the kernels take: dh 16, 32, 64 or 128 (one instance each), fe a multiple of the SIMT
// chunk (the tensor-core kernels take chunks of 128, 64 or 32, the widest that divides fe).
inline bool expert_shape_supported(int dh, int fe) {
    return (dh == 16 || dh == 32 || dh == 64 || dh == 128) && fe > 0 && fe % kExpertChunk == 0;
}

// Both gradients: dx_copy (copies, dh), and dK, dV (H, E, fe, dh) fp32, added to (accumulate) or
// written, from d_o (copies, dh).
inline void expert_backward(floatX* dx_copy, float* dK, float* dV, bool accumulate, const floatX* d_o, const floatX* x,
                            int64_t ld, const floatX* K, const floatX* V, const RoutingPlan& plan,
                            const WeightGradParts& parts, int dh, int F, cudaStream_t stream) {
    expert_input_backward(dx_copy, d_o, x, ld, K, V, plan, dh, F, stream);
    expert_weight_backward(dK, dV, accumulate, d_o, x, ld, K, V, plan, parts, dh, F, stream);
}

}  // namespace lmoe
