// GELU of the expert hidden layers (SPEC §2), on the device, for both MoE families:
//     gelu(x) = x Φ(x)        gelu'(x) = Φ(x) + x φ(x)
// with Φ the standard normal distribution and φ its density. Two kinds of form:
//   gelu, gelu_grad      exact (erff, expf): the fp32 builds, checked tightly against the CPU
//                        reference (cpu/reference.h has the same two lines);
//   gelu_fast, gelu_grad_fast, gelu_and_grad_fast
//                        for the tensor-core kernels, whose results are rounded to bf16 next.
// gelu_fast rests on the normal tail q(a) = Φ(−a) at a = |x|: Φ(x) is 1 − q or q by the sign of x,
// and since x Φ(x) − max(x, 0) = −|x| q,
//     gelu(x) = max(x, 0) − a q(a)
// log2 q is smooth on [0, ∞) (−1 at 0, −a²/(2 ln 2) − log2(a √(2π)) far out), so one polynomial of
// degree 5 in a gives it on [0, 5.5] and one ex2 the tail: one MUFU operation and eight others (erff
// alone is ~25). The forward kernels spend over half of their issue slots here, so the degree is the
// lowest whose error stays well under bf16's rounding: each degree less bought 2% of the LatentMoE
// forward (docs/perf/expert_kernels.md, "What limits the row kernels"). Past a = 5.5 the tail is
// held at q(5.5) = 1.9e-8, so a q stays under 1.1e-7 for every x. The coefficients are a weighted
// minimax fit of Φ's absolute error (scripts/fit_normal_tail.py derives them and checks the float
// arithmetic below against exact erf): |Φ error| ≤ 2.9e-7, gelu within 1.2e-6 of exact for |x| ≤ 7
// (the rounding of its fp32 result included) and within 1e-3 relative where |gelu| > 1e-3, against
// bf16's rounding at 4e-3 relative. NaN goes through (min.NaN); gelu_fast(−∞) is −1.1e-7.
// The forms with gelu' need φ(x) = exp(−x²/2) / √(2π) anyway, and Abramowitz & Stegun 7.1.26 gives
// the tail from that same exponential and one reciprocal (|erf error| < 1.5e-7): two MUFU operations,
// and in the backward kernels faster than the polynomial with a second exponential
// (docs/perf/expert_kernels.md, "GELU on one exponential"); gelu' within 2.6e-7 of exact with exact
// ex2 and rcp (the same script), 3.5e-7 with the GPU's (test_gpu_moe). Kernels that need both values
// at one x (the LatentMoE weight gradient recomputing A = gelu(S)) take gelu_and_grad_fast; its gelu
// (within 4.3e-7 of exact) and gelu_fast's differ by at most 1.6e-6.
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
__device__ inline float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// min(a, b), NaN when either is (fminf returns the other operand).
__device__ inline float min_nan(float a, float b) {
    float y;
    asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
    return y;
}

constexpr float kNormalTailEnd = 5.5f;  // where the fitted range of the tail ends

// max(x, 0) − a q(a), a = min(|x|, 5.5), q = Φ(−a) = 2^p(a).
__device__ inline float gelu_fast(float x) {
    const float a = min_nan(fabsf(x), kNormalTailEnd);
    float p = -0.000518861692f;  // log2 Φ(−a), Horner from a⁵
    p = fmaf(p, a, 0.0073872176f);
    p = fmaf(p, a, -0.0525380485f);
    p = fmaf(p, a, -0.459276676f);
    p = fmaf(p, a, -1.15108311f);
    p = fmaf(p, a, -1.00000083f);
    return fmaf(-a, ex2_approx(p), fmaxf(x, 0.f));
}

// Φ(x) by Abramowitz & Stegun 7.1.26, with e = exp(−x²/2) returned for the density.
__device__ inline float normal_cdf(float x, float& e) {
    e = ex2_approx(x * x * -0.72134752044448170f);  // −log2(e) / 2
    const float t = rcp_approx(fmaf(0.23164190f, fabsf(x), 1.f));  // 1 / (1 + p |x| / √2)
    const float tail = e * t * fmaf(fmaf(fmaf(fmaf(0.5307027145f, t, -0.7265760135f), t, 0.7107068705f), t,
                                         -0.142248368f), t, 0.127414796f);  // (1 − erf(|x|/√2)) / 2
    return x >= 0.f ? 1.f - tail : tail;
}
struct GeluAndGrad {
    float value, grad;
};
// gelu(x) = x Φ(x), gelu'(x) = Φ(x) + x φ(x), from one normal_cdf (0.39894… = 1/√(2π)).
__device__ inline GeluAndGrad gelu_and_grad_fast(float x) {
    float e;
    const float cdf = normal_cdf(x, e);
    return {x * cdf, fmaf(x * 0.3989422804014327f, e, cdf)};
}
__device__ inline float gelu_grad_fast(float x) { return gelu_and_grad_fast(x).grad; }

}  // namespace lmoe
