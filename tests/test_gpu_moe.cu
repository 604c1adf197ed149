// The routed MoE layer of moe_ep_baseline on the GPU against the CPU reference (SPEC §2.2, §8.3):
// the router (H = 1, D = d), the grouping of copies by expert, each grouped expert GEMM on its own
// (fed the GPU's own inputs, so errors do not compound), then the whole routed layer forward and
// backward against ref::routed_forward / routed_backward with the GPU's expert choices held fixed
// (a near-tie may legitimately flip between fp32 and double; those are counted, not failed).
// Outputs are poisoned before every run; weight gradients start from random values (they must be
// accumulated into, not overwritten), and in a second run the expert ones start poisoned (a step's
// first micro-batch writes them: every element, zeros for a starved expert); a rerun of either form
// must give the same bytes.
// First, the fast GELU forms of the tensor-core kernels (moe/gelu.cuh) on their own, against exact erf.
// The layer's stage benchmark is bench/bench_moe.cu.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "moe/combine.cuh"
#include "moe/gelu.cuh"
#include "moe/grouped/grouped_gemm.cuh"
#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "cpu/reference.h"
#include "tests/gpu_test_utils.cuh"
#include "tests/moe_fixture.cuh"
#include "tests/routing_checks.cuh"

using lmoe::DeviceBuffer;
using gpu_test::expect_close;
using gpu_test::increment;

__global__ void gelu_fast_kernel(float* out, const float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const lmoe::GeluAndGrad both = lmoe::gelu_and_grad_fast(x[i]);
    out[4 * i] = lmoe::gelu_fast(x[i]);
    out[4 * i + 1] = lmoe::gelu_grad_fast(x[i]);
    out[4 * i + 2] = both.value;
    out[4 * i + 3] = both.grad;
}

// gelu_fast, gelu_grad_fast and gelu_and_grad_fast on 2^21 + 1 points of [−7, 7] and at special
// values: within moe/gelu.cuh's bounds of exact erf (gelu_fast 1.2e-6, the joint form's gelu 4.3e-7,
// gelu' 2.6e-7 with exact ex2 and rcp; checked at 1.5e-6, 5e-7 and 4e-7, as the GPU's are
// approximations; gelu_fast's relative error at 1e-3 where |gelu| > 1e-3), the joint form's gelu'
// bitwise gelu_grad_fast's, NaN passed on, and within 1.2e-7 of the limits past the fitted range.
void check_gelu_fast() {
    std::printf("fast GELU forms\n");
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> x;
    for (int i = -(1 << 20); i <= (1 << 20); i++) x.push_back(7.f * i / (1 << 20));
    const std::vector<float> special = {0.f, -0.f, 1e-20f, -1e-20f, 5.5f, -5.5f, 8.f,   -8.f,
                                        100.f, -100.f, 1e30f, -1e30f, inf, -inf, nan};
    const int n_grid = (int)x.size();
    x.insert(x.end(), special.begin(), special.end());
    const int n = (int)x.size();
    DeviceBuffer<float> x_d(n), out_d(4 * (size_t)n);
    x_d.upload(x);
    out_d.poison();
    gelu_fast_kernel<<<(n + 255) / 256, 256>>>(out_d.get(), x_d.get(), n);
    CUDA_CHECK_LAUNCH();
    const std::vector<float> out = out_d.download();
    double gelu_abs = 0, gelu_rel = 0, grad_abs = 0, joint_abs = 0;
    bool joint_same = true, finite = true;  // poisoned outputs are NaN, which max() would pass over
    for (int i = 0; i < n; i++) joint_same &= std::memcmp(&out[4 * i + 1], &out[4 * i + 3], sizeof(float)) == 0;
    for (int i = 0; i < n_grid; i++) {
        const double X = x[i], cdf = 0.5 * std::erfc(-X / std::sqrt(2.0));
        const double gelu = X * cdf, grad = cdf + X * std::exp(-0.5 * X * X) / std::sqrt(2 * M_PI);
        finite &= std::isfinite(out[4 * i]) && std::isfinite(out[4 * i + 1]) && std::isfinite(out[4 * i + 2]);
        gelu_abs = std::max(gelu_abs, std::fabs(out[4 * i] - gelu));
        joint_abs = std::max(joint_abs, std::fabs(out[4 * i + 2] - gelu));
        grad_abs = std::max(grad_abs, std::fabs(out[4 * i + 1] - grad));
        if (std::fabs(gelu) > 1e-3) gelu_rel = std::max(gelu_rel, std::fabs(out[4 * i] - gelu) / std::fabs(gelu));
    }
    std::printf("  on [-7, 7]: gelu_fast abs %.3g, rel %.3g; gelu_grad_fast abs %.3g; gelu_and_grad_fast's gelu abs %.3g\n",
                gelu_abs, gelu_rel, grad_abs, joint_abs);
    CHECK(gelu_abs <= 1.5e-6);
    CHECK(gelu_rel <= 1e-3);
    CHECK(grad_abs <= 4e-7);
    CHECK(joint_abs <= 5e-7);
    CHECK(joint_same);
    CHECK(finite);
    for (int j = 0; j < (int)special.size(); j++) {  // specials: exact values within [-7, 7], limits past it
        const float v = special[j], gelu = out[4 * (n_grid + j)], grad = out[4 * (n_grid + j) + 1];
        const std::string at = "(" + std::to_string(v) + "): " + std::to_string(gelu) + ", " + std::to_string(grad);
        if (std::isnan(v)) {
            CHECK_MSG(std::isnan(gelu) && std::isnan(grad), "NaN in, NaN out" + at);
        } else if (std::isinf(v)) {  // gelu' is inf · 0 there, as in the exact form
            CHECK_MSG(v > 0 ? gelu == inf : std::fabs(gelu) <= 1.2e-7, "gelu_fast at infinity" + at);
        } else if (std::fabs(v) <= 7.f) {
            const double cdf = 0.5 * std::erfc(-(double)v / std::sqrt(2.0));
            const double exact_grad = cdf + v * std::exp(-0.5 * (double)v * v) / std::sqrt(2 * M_PI);
            CHECK_MSG(std::fabs(gelu - v * cdf) <= 1.5e-6 && std::fabs(grad - exact_grad) <= 4e-7, "near zero" + at);
        } else {
            const double limit = v > 0 ? v : 0.0;
            CHECK_MSG(std::fabs(gelu - limit) <= 1.2e-7 * std::max(1.0, limit) && std::fabs(grad - (v > 0)) <= 1.2e-7,
                      "far out" + at);
        }
    }
}

// Each grouped GEMM against the reference in double, on the GPU's own inputs to that GEMM.
void check_grouped_gemms(const MoeLayer& L, const LayerTensors& T, const std::vector<double>& x,
                         const std::vector<double>& W1, const std::vector<double>& W2, const std::vector<float>& dW1_start,
                         const std::vector<float>& dW2_start) {
    const Shape& s = L.s;
    const int d = s.d, f = s.f;
    const int64_t C = L.copies;
    auto offset = gpu_test::download(L.plan.group_offset, L.plan.groups() + 1), row = gpu_test::download(L.plan.copy_row, L.copies);
    auto pre = gpu_test::to_double(L.pre.download()), h = gpu_test::to_double(L.h.download());
    auto d_o = gpu_test::to_double(L.d_o.download()), dpre = gpu_test::to_double(L.dpre.download());
    std::vector<int> expert(C);
    for (int e = 0; e < s.E; e++)
        for (int p = offset[e]; p < offset[e + 1]; p++) expert[p] = e;
    std::vector<double> ref_pre(C * f), ref_h(C * f), ref_o(C * d), ref_dpre(C * f), ref_dx(C * d);
#pragma omp parallel for
    for (int64_t p = 0; p < C; p++) {
        const double* W1e = W1.data() + (int64_t)expert[p] * f * d;  // (f, d)
        const double* W2e = W2.data() + (int64_t)expert[p] * d * f;  // (d, f)
        const double* xt = x.data() + (int64_t)row[p] * d;
        for (int n = 0; n < f; n++) {
            double acc = 0, dh = 0;
            for (int i = 0; i < d; i++) {
                acc += W1e[(int64_t)n * d + i] * xt[i];
                dh += d_o[p * d + i] * W2e[(int64_t)i * f + n];
            }
            ref_pre[p * f + n] = acc;
            ref_h[p * f + n] = ref::gelu(acc);
            ref_dpre[p * f + n] = dh * ref::gelu_grad(pre[p * f + n]);
        }
        for (int j = 0; j < d; j++) {
            double o = 0, dx = 0;
            for (int n = 0; n < f; n++) {
                o += h[p * f + n] * W2e[(int64_t)j * f + n];
                dx += dpre[p * f + n] * W1e[(int64_t)n * d + j];
            }
            ref_o[p * d + j] = o;
            ref_dx[p * d + j] = dx;
        }
    }
    std::vector<double> ref_dW1((size_t)s.E * f * d, 0.0), ref_dW2((size_t)s.E * d * f, 0.0);
#pragma omp parallel for
    for (int e = 0; e < s.E; e++)
        for (int p = offset[e]; p < offset[e + 1]; p++) {
            const double* xt = x.data() + (int64_t)row[p] * d;
            for (int n = 0; n < f; n++)
                for (int i = 0; i < d; i++) {
                    ref_dW1[((int64_t)e * f + n) * d + i] += dpre[p * f + n] * xt[i];
                    ref_dW2[((int64_t)e * d + i) * f + n] += d_o[p * d + i] * h[p * f + n];
                }
        }
    expect_close("pre = X_e W1_e^T", pre, ref_pre);
    expect_close("h = GELU(pre)", h, ref_h);
    expect_close("o = h W2_e^T", L.o, ref_o);
    expect_close("dpre = (dO W2_e) * GELU'(pre)", dpre, ref_dpre);
    expect_close("dx_copy = dpre W1_e", L.dx_copy, ref_dx);
    expect_close("dW2_e += dO^T h (increment)", increment(T.dW2, dW2_start), ref_dW2);
    expect_close("dW1_e += dpre^T X_e (increment)", increment(T.dW1, dW1_start), ref_dW1);
}

void run_shape(const Shape& s, lmoe::Rng& rng) {
    std::printf("%s: M %d, d %d, E %d, f %d, k %d\n", s.name, s.M, s.d, s.E, s.f, s.k);
    // inputs, rounded to what the GPU holds
    const LayerInputs in = random_inputs(s, rng, check_scales(s));
    const auto& [x, R, W1, W2, dy, bias] = in;
    // gradients start from random values: the kernels must add to them
    using gpu_test::random_gradient_start;
    const std::vector<float> dR0 = random_gradient_start(rng, R.size()), dW10 = random_gradient_start(rng, W1.size()),
                             dW20 = random_gradient_start(rng, W2.size());
    LayerTensors T = upload_layer(s, in);
    MoeLayer L(s);
    auto run_layer = [&](bool accumulate) {
        L.poison_all();
        T.y.poison();
        T.dx.poison();
        T.dR.upload(dR0);
        gpu_test::prepare_gradient(T.dW1, dW10, accumulate);
        gpu_test::prepare_gradient(T.dW2, dW20, accumulate);
        routed_layer(L, T, accumulate);
        CUDA_CHECK(cudaDeviceSynchronize());
    };
    run_layer(true);

    // Router: the reference's top-k (near-ties counted, not failed); then a stable grouping.
    auto sel = gpu_test::download(L.plan.sel, L.copies);
    gpu_test::check_router(s.name, L.plan, sel, x.data(), s.d, R.data(), s.d, bias.data());
    const std::vector<int> offset = gpu_test::check_plan(s.name, L.plan, sel, "expert");
    if (s.starve_last)
        CHECK_MSG(offset[s.E] == offset[s.E - 1], std::string(s.name) + ": the starved expert received copies");

    check_grouped_gemms(L, T, x, W1, W2, dW10, dW20);

    // The whole routed layer against the reference, with the GPU's choices.
    std::vector<double> ref_y((size_t)s.M * s.d), ref_dx((size_t)s.M * s.d, 0.0), dR(R.size(), 0.0),
        dW1(W1.size(), 0.0), dW2(W2.size(), 0.0), gates((size_t)s.M * s.k);
    std::vector<int> frozen(sel);
    const ref::ExpertBank<double> bank{R.data(), W1.data(), W2.data(), bias.data(), s.E, s.k,
                                       ref::ExpertLayout{s.d, s.f, false}};
    const ref::ExpertBankGrad<double> grad{dR.data(), dW1.data(), dW2.data()};
    ref::routed_forward(ref_y.data(), s.d, x.data(), s.d, s.M, bank, frozen.data(), gates.data(), true);
    ref::routed_backward(ref_dx.data(), s.d, grad, dy.data(), s.d, x.data(), s.d, s.M, bank, frozen.data(), gates.data());
    auto gate_f = gpu_test::download(L.plan.gate, L.copies);
    expect_close("gates", std::vector<double>(gate_f.begin(), gate_f.end()), gates, gpu_test::kGateTolerance);
    expect_close("y = sum_j w_j expert_j(x)", T.y, ref_y);
    expect_close("dx (experts + router)", T.dx, ref_dx);
    expect_close("dR (router, increment)", increment(T.dR, dR0), dR);
    expect_close("dW1 (expert_in, increment)", increment(T.dW1, dW10), dW1);
    expect_close("dW2 (expert_out, increment)", increment(T.dW2, dW20), dW2);

    // The same layer as a step's first micro-batch: the expert weight gradients written.
    run_layer(false);
    expect_close("dW1 (expert_in, written)", T.dW1, dW1);
    expect_close("dW2 (expert_out, written)", T.dW2, dW2);

    // Bitwise reproducible: another run in either form gives the same bytes everywhere.
    for (const bool accumulate : {false, true}) {
        if (accumulate) run_layer(true);
        gpu_test::expect_rerun_identical(std::string(s.name) + ": a rerun is not bitwise identical",
                                         [&] { run_layer(accumulate); }, T.y, T.dx, L.pre, L.h, L.dpre, L.dx_copy, T.dR,
                                         T.dW1, T.dW2);
    }
}

int main() {
    gpu_test::skip_without_gpu();
    check_gelu_fast();
    lmoe::Rng rng(2027);
    const Shape shapes[] = {
        {"tiny", 64, 64, 8, 32, 2},
        {"odd sizes, starved expert", 300, 200, 6, 72, 3, true},
        {"small", 512, 512, 32, 256, 4},
        {"p1 shape", 128, 1024, 64, 512, 8},
        {"p2 shape", 128, 1024, 128, 256, 16},
        {"crowded", 1024, 512, 32, 256, 4, false, true},
        // the router's tensor-core tile at its edges: d past a whole 64-deep step, E padded to 128
        // columns, the widest E and k, row counts that are not multiples of its 64 rows
        {"d 136, E 72", 130, 136, 72, 64, 5},
        {"E 256, k 32", 200, 64, 256, 64, 32},
        // the grouped GEMMs' 128 × 256 wgmma tiles at their edges: a partial second column tile
        // (d 320 = 256 + 64: o, dx_copy, dW1), partial last row tiles (dW2's 320 = 2·128 + 64, dW1's
        // f 136 = 128 + 8) and a partial last 64-deep step (K = f = 136)
        {"d 320, f 136", 250, 320, 16, 136, 4},
    };
    for (const Shape& s : shapes) run_shape(s, rng);
    return check::summary();
}
