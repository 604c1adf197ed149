// The routed part of the Multi-Head LatentMoE layer on the GPU against the CPU reference (SPEC §4,
// §8.3): the IO-aware router, the grouping of copies by (head, expert), the IO-aware expert kernels
// forward and backward, the weighting and the router backward, the expert weight gradients both
// added to random starting values and written over poisoned ones (a step's first micro-batch: every
// element, zeros for an empty group); then bitwise reproducibility; and the router's top-k on exact
// ties and NaN inputs.
// The reference runs on exactly the rounded inputs the GPU sees, with the GPU's expert choices held
// fixed (a near-tie may legitimately flip between fp32 and double; those are counted, not failed).
#include <algorithm>
#include <cstring>

#include "moe/combine.cuh"
#include "moe/latent/io_experts.cuh"
#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "cpu/reference.h"
#include "tests/gpu_test_utils.cuh"
#include "tests/latentmoe_fixture.cuh"
#include "tests/routing_checks.cuh"

using gpu_test::expect_close;
using gpu_test::increment;

void run_shape(const Shape& s, lmoe::Rng& rng) {
    std::printf("%s: M %d, H %d, dh %d, E %d, fe %d, k %d\n", s.name, s.M, s.H, s.dh, s.E, s.fe, s.k);
    const int HD = s.H * s.dh;
    // inputs, rounded to what the GPU holds
    const LayerInputs in = random_inputs(s, rng, 0.2);
    const auto& [u, R, K, V, dy, bias] = in;
    LayerTensors T = upload_layer(s, in);
    RoutedLayer L(s);
    const std::vector<float> dK0 = gpu_test::random_gradient_start(rng, K.size()),
                             dV0 = gpu_test::random_gradient_start(rng, V.size());
    auto run_layer = [&](bool accumulate) {
        L.poison_all();
        T.y.poison();
        T.du.poison();
        CUDA_CHECK(cudaMemset(T.dR.get(), 0, T.dR.size() * sizeof(float)));
        gpu_test::prepare_gradient(T.dK, dK0, accumulate);
        gpu_test::prepare_gradient(T.dV, dV0, accumulate);
        routed_layer(L, T, accumulate);
        CUDA_CHECK(cudaDeviceSynchronize());
    };
    run_layer(true);

    // Router: the reference's top-k (near-ties counted, not failed); then a stable grouping.
    auto sel = gpu_test::download(L.plan.sel, L.copies);
    gpu_test::check_router(s.name, L.plan, sel, u.data(), HD, R.data(), s.dh, bias.data());
    gpu_test::check_plan(s.name, L.plan, sel, "(head, expert)");

    // The reference layer with the GPU's choices.
    std::vector<double> ref_y((size_t)s.M * HD), ref_du((size_t)s.M * HD, 0.0), dR(R.size(), 0.0), dK(K.size(), 0.0),
        dV(V.size(), 0.0), gates((size_t)s.H * s.M * s.k);
    std::vector<int> frozen(sel);
    for (int h = 0; h < s.H; h++) {
        ref::ExpertBank<double> bank{R.data() + (int64_t)h * s.dh * s.E, K.data() + (int64_t)h * s.E * s.fe * s.dh,
                                     V.data() + (int64_t)h * s.E * s.fe * s.dh, bias.data() + h * s.E, s.E, s.k,
                                     ref::ExpertLayout{s.dh, s.fe, true}};
        ref::ExpertBankGrad<double> grad{dR.data() + (int64_t)h * s.dh * s.E, dK.data() + (int64_t)h * s.E * s.fe * s.dh,
                                         dV.data() + (int64_t)h * s.E * s.fe * s.dh};
        int* sel_h = frozen.data() + (int64_t)h * s.M * s.k;
        double* gate_h = gates.data() + (int64_t)h * s.M * s.k;
        ref::routed_forward(ref_y.data() + h * s.dh, HD, u.data() + h * s.dh, HD, s.M, bank, sel_h, gate_h, true);
        ref::routed_backward(ref_du.data() + h * s.dh, HD, grad, dy.data() + h * s.dh, HD, u.data() + h * s.dh, HD, s.M,
                             bank, sel_h, gate_h);
    }
    std::vector<double> gate_got(gates.size());
    auto gate_f = gpu_test::download(L.plan.gate, L.copies);
    for (size_t i = 0; i < gate_f.size(); i++) gate_got[i] = gate_f[i];
    expect_close("gates", gate_got, gates, gpu_test::kGateTolerance);
    expect_close("y = sum_j w_j expert_j(u)", T.y, ref_y);
    expect_close("du (experts + router)", T.du, ref_du);
    expect_close("dR (router)", T.dR, dR);
    expect_close("dK (expert_in, increment)", increment(T.dK, dK0), dK);
    expect_close("dV (expert_out, increment)", increment(T.dV, dV0), dV);

    // The same layer as a step's first micro-batch: the expert weight gradients written.
    run_layer(false);
    expect_close("dK (expert_in, written)", T.dK, dK);
    expect_close("dV (expert_out, written)", T.dV, dV);

    // Bitwise reproducible: another run in either form gives the same bytes everywhere.
    for (const bool accumulate : {false, true}) {
        if (accumulate) run_layer(true);
        gpu_test::expect_rerun_identical(std::string(s.name) + ": a rerun is not bitwise identical",
                                         [&] { run_layer(accumulate); }, T.y, T.du, T.dR, T.dK, T.dV);
    }
}

// The router's top-k on exact ties and on NaN (SPEC's tie rule: equal scores go to the lower expert).
// With R = 0 every logit is exactly 0, so the scores are the bias, here full of repeated values, and
// the choices must be the reference's exactly, in order — for every list length of the tensor-core
// kernel (k up to 4, 8, 16, 32) and E that is not a whole number of its runs; the gates are all 1/k.
// Rows with a NaN input have NaN scores, which rank last: they must choose the first k experts.
void check_router_ties(lmoe::Rng& rng) {
    struct TieShape { int E, k; };
    const TieShape shapes[] = {{64, 8}, {128, 16}, {256, 32}, {200, 20}, {40, 3}, {24, 5}, {8, 8}, {16, 2}};
    const int M = 100, H = 2, dh = 64, HD = H * dh;
    const std::vector<int> nan_rows = {7, 64, 99};  // of head 1
    for (const TieShape& ts : shapes) {
        const int E = ts.E, k = ts.k;
        std::vector<double> x((size_t)M * HD);
        for (double& v : x) v = rng.normal();
        for (int t : nan_rows) x[(size_t)t * HD + dh + 3] = NAN;
        std::vector<float> bias((size_t)H * E);
        for (int h = 0; h < H; h++)
            for (int e = 0; e < E; e++) bias[h * E + e] = (float)((7 * e + 3 * h) % 5);
        auto xd = gpu_test::upload<floatX>(x);
        auto Rd = gpu_test::upload<floatX>(std::vector<double>((size_t)H * dh * E, 0.0));
        lmoe::DeviceBuffer<float> bd;
        bd.upload(bias);
        lmoe::RoutingPlans plans = lmoe::RoutingPlans::routed(1, M, H, E, k);
        plans.poison();
        const lmoe::RoutingPlan plan = plans[0];
        lmoe::router_forward(plan, xd.get(), HD, Rd.get(), bd.get(), dh, 0);
        const auto sel = gpu_test::download(plan.sel, plan.copies());
        const auto gate = gpu_test::download(plan.gate, plan.copies());
        int wrong = 0, wrong_gates = 0;
        std::vector<int> want(k);
        const std::vector<double> zero_logits(E, 0.0);
        for (int h = 0; h < H; h++)
            for (int t = 0; t < M; t++) {
                const bool nan_row = h == 1 && std::find(nan_rows.begin(), nan_rows.end(), t) != nan_rows.end();
                if (nan_row)
                    for (int j = 0; j < k; j++) want[j] = j;
                else
                    ref::select_topk(want.data(), zero_logits.data(), bias.data() + h * E, E, k);
                const int64_t slot0 = ((int64_t)h * M + t) * k;
                wrong += !std::equal(want.begin(), want.end(), sel.begin() + slot0);
                if (!nan_row)
                    for (int j = 0; j < k; j++) wrong_gates += std::fabs(gate[slot0 + j] - 1.0 / k) > 1e-6;
            }
        std::printf("router ties, E %d, k %d: %d of %d rows chose other experts, %d gates off 1/k\n", E, k, wrong, H * M,
                    wrong_gates);
        CHECK_MSG(wrong == 0 && wrong_gates == 0, "router ties (E " + std::to_string(E) + ", k " + std::to_string(k) +
                                                      "): the tie rule or the NaN ranking is not kept");
    }
}

int main() {
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(2026);
    check_router_ties(rng);
    const Shape shapes[] = {
        {"tiny", 64, 4, 16, 8, 32, 2},
        {"odd rows", 300, 2, 32, 6, 64, 3},
        {"small", 512, 8, 64, 32, 256, 4},
        {"p1 shape", 192, 8, 128, 64, 512, 8},
        {"crowded", 1024, 4, 128, 32, 512, 8, true},
        // crowded with one head: the weight gradient cuts each busy group into parts (expert_weight_backward.cuh)
        {"crowded, one head: busy groups cut in two", 1100, 1, 128, 32, 512, 8, true},
        {"crowded, one head: busy groups cut in four, dh 64", 2000, 1, 64, 64, 128, 8, true},
        {"starved expert, rows not whole tiles", 333, 2, 64, 16, 128, 4, false, true},
        {"p2 shape (the router's warp-per-row top-k at k 16)", 160, 8, 128, 128, 256, 16},
        // the wgmma row kernels' chunk counts (forward | input gradient): odd ones, and enough to reuse
        // every stage (four stages, three in the forward at dh 128)
        {"fe 192, dh 128: 3 | 3 chunks of 64", 300, 2, 128, 8, 192, 2},
        {"fe 384, dh 64: 3 of 128 | 6 of 64", 300, 2, 64, 8, 384, 2},
        {"fe 384, dh 128: 3 of 128 | 6 of 64", 200, 2, 128, 4, 384, 2},
        {"fe 896, dh 128: 7 of 128 | 14 of 64", 200, 2, 128, 4, 896, 2},
        {"fe 1152, dh 64: 9 of 128 | 18 of 64", 200, 2, 64, 4, 1152, 2},
    };
    for (const Shape& s : shapes) run_shape(s, rng);
    return check::summary();
}
