// GELU of the expert hidden layers (SPEC §2), on the device, for both MoE families:
//     gelu(x) = x Φ(x)        gelu'(x) = Φ(x) + x φ(x)
// with Φ the standard normal distribution and φ its density. Two forms:
//   gelu, gelu_grad            exact (erff, expf): the fp32 builds, checked tightly against the CPU
//                              reference (cpu/reference.h has the same two lines);
//   gelu_fast, gelu_grad_fast  for the tensor-core kernels, whose results are rounded to bf16 next.
// The fast forms compute Φ(x) = (1 + erf(x/√2)) / 2 through Abramowitz & Stegun 7.1.26 (|error| <
// 1.5e-7, far under bf16's 4e-3), which shares its exp(−x²/2) with the density φ: two MUFU
// operations and a dozen FMAs, where erff alone costs ~25 instructions and gelu would leave the
// latent forward kernel bound by its ALU work. Kernels that need both GELU(s) and GELU'(s) of the
// same s form them from one normal_cdf (gelu_from_cdf, gelu_grad_from_cdf).
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
// Φ(x), with e = exp(−x²/2) returned for the density.
__device__ inline float normal_cdf(float x, float& e) {
    e = ex2_approx(x * x * -0.72134752044448170f);  // −log2(e) / 2
    const float t = rcp_approx(fmaf(0.23164190f, fabsf(x), 1.f));  // 1 / (1 + p |x| / √2)
    const float tail = e * t * fmaf(fmaf(fmaf(fmaf(0.5307027145f, t, -0.7265760135f), t, 0.7107068705f), t,
                                         -0.142248368f), t, 0.127414796f);  // (1 − erf(|x|/√2)) / 2
    return x >= 0.f ? 1.f - tail : tail;
}
// GELU(x) = x Φ(x) and GELU'(x) = Φ(x) + x φ(x), from cdf = Φ(x) and e = exp(−x²/2) as normal_cdf
// gives them: a kernel that needs both calls normal_cdf once.
__device__ inline float gelu_from_cdf(float x, float cdf) { return x * cdf; }
__device__ inline float gelu_grad_from_cdf(float x, float cdf, float e) {
    return fmaf(x * 0.3989422804014327f, e, cdf);  // 0.39894… = 1/√(2π)
}
__device__ inline float gelu_fast(float x) {
    float e;
    return gelu_from_cdf(x, normal_cdf(x, e));
}
__device__ inline float gelu_grad_fast(float x) {
    float e;
    const float cdf = normal_cdf(x, e);
    return gelu_grad_from_cdf(x, cdf, e);
}

}  // namespace lmoe
