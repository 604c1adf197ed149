// The FLOP count behind the trainers' MFU figure and the layer benchmark's TFLOP/s: the model's own
// arithmetic, so the two binaries are compared on the work their models define rather than on what
// their kernels happen to redo. Host-only.
#pragma once
#include "model/config.h"

namespace lmoe {

// FLOPs per token, counted the usual way (2 per multiply-add, backward twice the forward: 6 per MAC
// per token). The expert recomputation of the IO-aware kernels is not counted. Attention counts the
// full T×T products, as llm.c does.
template <class Ffn>
double flops_per_token(const Config& c) {
    const double C = c.n_head * c.d_attn();
    const double dense = c.L * (3.0 * c.d * C + C * c.d + 2.0 * c.T * C) + (double)c.d * c.V;
    return 6.0 * (dense + c.L * Ffn::forward_macs_per_token(c));
}
constexpr double kPeakBf16Flops = 989.4e12;  // H100 SXM dense bf16, the MFU denominator

}  // namespace lmoe
