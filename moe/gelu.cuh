// GELU of the expert hidden layers (SPEC §2), on the device, for both MoE families:
//     gelu(x) = x Φ(x)        gelu'(x) = Φ(x) + x φ(x)
// with Φ the standard normal distribution and φ its density. Two forms:
//   gelu, gelu_grad            exact (erff, expf): the fp32 builds, checked tightly against the CPU
//                              reference (cpu/reference.h has the same two lines);
//   gelu_fast, gelu_grad_fast, for the tensor-core kernels, whose results are rounded to bf16 next.
//   gelu_and_grad_fast
// The fast forms rest on the normal tail q(a) = Φ(−a) at a = |x|: Φ(x) is 1 − q or q by the sign of x,
// and since x Φ(x) − max(x, 0) = −|x| q,
//     gelu(x) = max(x, 0) − a q(a)
// log2 q is smooth on [0, ∞) (−1 at 0, −a²/(2 ln 2) − log2(a √(2π)) far out), so one polynomial of
// degree 7 in a gives it on [0, 5.5] and one ex2 the tail: gelu_fast costs one MUFU operation and ten
// FMA-pipe instructions (erff alone is ~25). Past a = 5.5 the tail is held at q(5.5) = 1.9e-8, so a q
// stays under 1.1e-7 for every x. The coefficients are a weighted minimax fit of Φ's absolute error
// (scripts/fit_normal_tail.py derives them and checks the float arithmetic below against exact
// erf): |Φ error| ≤ 3.6e-8; gelu within 3.9e-7 of exact (the rounding of its fp32 result included)
// and gelu' within 1.4e-7 for |x| ≤ 7; bf16 rounds at 4e-3 relative.
// NaN goes through (min.NaN); gelu(−∞) is −1.1e-7.
#pragma once

namespace lmoe {

__device__ inline float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ inline float gelu_grad(float x) {
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

__device__ inline float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// min(a, b), NaN when either is (fminf returns the other operand).
__device__ inline float min_nan(float a, float b) {
    float y;
    asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
    return y;
}

constexpr float kNormalTailEnd = 5.5f;  // where the fitted range of the tail ends

// a = min(|x|, 5.5) and q = Φ(−a).
struct NormalTail {
    float a, q;
};
__device__ inline NormalTail normal_tail(float x) {
    const float a = min_nan(fabsf(x), kNormalTailEnd);
    float p = 8.47005413e-06f;  // log2 Φ(−a), Horner from a⁷
    p = fmaf(p, a, -5.39026987e-05f);
    p = fmaf(p, a, -0.000421239558f);
    p = fmaf(p, a, 0.00738927862f);
    p = fmaf(p, a, -0.0526911169f);
    p = fmaf(p, a, -0.459153146f);
    p = fmaf(p, a, -1.15111089f);
    p = fmaf(p, a, -0.999999881f);
    return {a, ex2_approx(p)};
}
// gelu(x) = max(x, 0) − a q;  gelu'(x) = Φ(x) + x φ(x), φ(x) = exp(−x²/2) / √(2π).
__device__ inline float gelu_from_tail(float x, NormalTail t) { return fmaf(-t.a, t.q, fmaxf(x, 0.f)); }
__device__ inline float gelu_grad_from_tail(float x, NormalTail t) {
    const float cdf = x >= 0.f ? 1.f - t.q : t.q;
    return fmaf(x * 0.3989422804014327f, ex2_approx(x * x * -0.72134752044448170f), cdf);  // −log2(e) / 2
}

__device__ inline float gelu_fast(float x) { return gelu_from_tail(x, normal_tail(x)); }
__device__ inline float gelu_grad_fast(float x) { return gelu_grad_from_tail(x, normal_tail(x)); }
// Both at one x (the LatentMoE weight gradient recomputes A = gelu(S) and needs gelu'(S) beside it).
struct GeluAndGrad {
    float value, grad;
};
__device__ inline GeluAndGrad gelu_and_grad_fast(float x) {
    const NormalTail t = normal_tail(x);
    return {gelu_from_tail(x, t), gelu_grad_from_tail(x, t)};
}

}  // namespace lmoe
