// LocMoE's router kernels (moe/locmoe_router.cuh) against the CPU reference (cpu/locmoe.h, SPEC §2.6),
// on fresh random inputs with every output poisoned first: the GrAP gate and its top-k (a near-tie
// that rounds the other way between fp32 and double is counted, not failed; the GPU's choices are then
// held), the gates, the losses and their gradient per row, the capacity drop and the plan grouped
// again, and the backward into dx and dε, both accumulated into random starting values. A second
// run must give the same bytes. The whole model with this router is in test_gpu_model.
#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "cpu/reference.h"
#include "model/locmoe.h"
#include "moe/locmoe_router.cuh"
#include "moe/routing_plan.cuh"
#include "tests/gpu_test_utils.cuh"

using gpu_test::expect_close;
using lmoe::DeviceBuffer;

struct LocShape {
    const char* name;
    int M, d, E, k;
    float capacity_factor;
};

void run_shape(const LocShape& s, lmoe::Rng& rng) {
    lmoe::Config c;
    c.ffn = lmoe::FfnKind::MoE;
    c.router = "locmoe";
    c.d = s.d; c.dh = s.d; c.E = s.E; c.k = s.k;
    c.capacity_factor = s.capacity_factor;
    c.aux_loss_weight = 0.3f;
    c.loc_loss_weight = 0.5f;
    const int M = s.M, d = s.d, E = s.E, k = s.k;
    const int64_t copies = (int64_t)M * k;
    const lmoe::LocMoeSetup setup = lmoe::locmoe_setup(c, M, 1, 4, 2);  // rank 1 of 4, nodes of 2: D_l not uniform
    std::printf("%s: M %d, d %d, E %d, k %d, capacity %d\n", s.name, M, d, E, k, setup.capacity);
    const float loss_scale = 0.5f;

    const std::vector<double> x = gpu_test::rounded<floatX>(gpu_test::random_normal(rng, (size_t)M * d));
    const std::vector<double> eps = gpu_test::rounded<floatX>(gpu_test::random_normal(rng, E, 0.5));
    std::vector<float> ds_host(copies), deps0(E);
    for (float& v : ds_host) v = float(rng.normal());
    for (float& v : deps0) v = float(rng.normal());
    DeviceBuffer<floatX> X = gpu_test::upload<floatX>(x), EPS = gpu_test::upload<floatX>(eps), dx((size_t)M * d);
    DeviceBuffer<float> target(E), parts(lmoe::grap_parts_size(M, E)), scratch(parts.size()), coef(E), loss(2),
        ds_copy(copies), deps(E);
    DeviceBuffer<int> dropped(1);
    target.upload(std::vector<float>(setup.D.begin(), setup.D.end()));
    ds_copy.upload(ds_host);
    lmoe::RoutingPlans plans = lmoe::RoutingPlans::routed(1, M, 1, E, k);
    const lmoe::RoutingPlan plan = plans[0];
    const lmoe::LocMoeLayerStats stats{coef.get(), loss.get(), dropped.get()};

    // The reference's probabilities, from the values the GPU holds.
    std::vector<double> p((size_t)M * E), z((size_t)M * E);
    for (int t = 0; t < M; t++) ref::grap_probs(p.data() + (size_t)t * E, z.data() + (size_t)t * E, x.data() + (size_t)t * d, eps.data(), d, E);

    std::vector<floatX> dx0_device((size_t)M * d);
    auto run = [&] {
        plans.poison();
        for (auto* b : {&parts, &scratch, &coef, &loss}) b->poison();
        dropped.poison();
        dx.upload(dx0_device);
        deps.upload(deps0);
        lmoe::locmoe_router_forward(plan, parts.get(), X.get(), EPS.get(), d, 0);
        lmoe::group_copies(plan, 0);
        lmoe::locmoe_losses(stats, parts.get(), plan, target.get(), c.aux_loss_weight, c.loc_loss_weight, setup.capacity, 0);
        if (setup.capacity > 0) lmoe::capacity_drop(plan, setup.capacity, 0);
        lmoe::locmoe_router_backward(dx.get(), deps.get(), scratch.get(), X.get(), EPS.get(), coef.get(), loss_scale,
                                     plan, ds_copy.get(), d, 0);
        CUDA_CHECK(cudaDeviceSynchronize());
    };
    run();

    // top-k of p: the GPU's choice must be the reference's, or a near-tie of it
    const std::vector<int> sel_marked = gpu_test::download(plan.sel, copies);
    std::vector<int> sel(copies);
    for (int64_t i = 0; i < copies; i++) sel[i] = sel_marked[i] < 0 ? ~sel_marked[i] : sel_marked[i];
    const std::vector<float> no_bias(E, 0.f);
    int near_ties = 0, wrong = 0;
    for (int t = 0; t < M; t++) {
        std::vector<int> want(k);
        const double* pt = p.data() + (size_t)t * E;
        ref::select_topk(want.data(), pt, no_bias.data(), E, k);
        for (int j = 0; j < k; j++) {
            const int got = sel[(size_t)t * k + j];
            if (got == want[j]) continue;
            const bool valid = got >= 0 && got < E;
            if (valid && std::fabs(pt[got] - pt[want[j]]) <= 1e-5 * pt[want[j]]) near_ties++;
            else wrong++;
        }
    }
    std::printf("  top-k: %d near-ties, %d wrong choices\n", near_ties, wrong);
    CHECK_MSG(wrong == 0, std::string(s.name) + ": the GPU chose experts the reference does not");

    // gates: p at the chosen experts
    std::vector<double> ref_gate(copies);
    for (int64_t i = 0; i < copies; i++) ref_gate[i] = p[(size_t)(i / k) * E + sel[i]];
    auto gate = gpu_test::download(plan.gate, copies);
    expect_close("gates = p[S]", std::vector<double>(gate.begin(), gate.end()), ref_gate, gpu_test::kGateTolerance);

    // the capacity drop in the reference's order, and the plan of the kept copies
    std::vector<char> kept(copies);
    const int64_t ref_dropped = ref::capacity_keep(kept.data(), sel.data(), M, E, k, setup.capacity);
    const int got_dropped = dropped.download()[0];
    std::printf("  dropped: GPU %d, reference %lld\n", got_dropped, (long long)ref_dropped);
    CHECK_MSG(got_dropped == ref_dropped, std::string(s.name) + ": dropped count");
    // every shape with a capacity is chosen so that its routing overflows it: the drop path runs
    CHECK_MSG(setup.capacity == 0 || ref_dropped > 0, std::string(s.name) + ": a capacity that drops nothing");
    const std::vector<int> pos = gpu_test::download(plan.copy_pos, copies);
    const std::vector<int> offset = gpu_test::download(plan.group_offset, E + 1);
    std::vector<int> kept_per_expert(E, 0);
    bool marks = true;
    for (int64_t i = 0; i < copies; i++) {
        marks &= (sel_marked[i] >= 0) == (kept[i] != 0) && (pos[i] >= 0) == (kept[i] != 0);
        if (kept[i]) kept_per_expert[sel[i]]++;
    }
    CHECK_MSG(marks, std::string(s.name) + ": the dropped copies are not the reference's (sel ~e, copy_pos -1)");
    bool groups = offset[0] == 0;
    for (int e = 0; e < E; e++) groups &= offset[e + 1] - offset[e] == kept_per_expert[e];
    CHECK_MSG(groups, std::string(s.name) + ": the plan's groups are not the kept copies");

    // losses and dL/dp, from the routed choices
    const ref::RouterLosses<double> L = ref::locmoe_losses(p.data(), sel.data(), M, E, k, setup);
    const std::vector<float> got_loss = loss.download();
    expect_close("L_aux", {got_loss[0]}, {L.aux}, gpu_test::kGateTolerance);
    expect_close("L_loc", {got_loss[1]}, {L.loc}, gpu_test::kGateTolerance);
    expect_close("dL/dp (coef)", coef, L.dp, gpu_test::kGateTolerance);

    // backward: dp = scale · dL/dp + each kept copy's dw (ds_copy at its position)
    std::vector<double> dx_inc((size_t)M * d, 0.0), deps_inc(E, 0.0), dp(E);
    for (int t = 0; t < M; t++) {
        for (int e = 0; e < E; e++) dp[e] = loss_scale * L.dp[e];
        for (int j = 0; j < k; j++) {
            const int64_t i = (int64_t)t * k + j;
            if (kept[i]) dp[sel[i]] += ds_host[pos[i]];
        }
        ref::grap_backward(dx_inc.data() + (size_t)t * d, deps_inc.data(), dp.data(), p.data() + (size_t)t * E,
                           z.data() + (size_t)t * E, d, E);
    }
    std::vector<double> deps_got(E);
    const std::vector<float> deps_after = deps.download();
    for (int e = 0; e < E; e++) deps_got[e] = (double)deps_after[e] - deps0[e];
    expect_close("deps += sum of dz (increment)", deps_got, deps_inc);
    // dx starts from random values of the increment's size, not zero, so that adding is checked too
    double rms = 0;
    for (double v : dx_inc) rms += v * v;
    rms = std::sqrt(rms / dx_inc.size());
    const std::vector<double> dx0 = gpu_test::rounded<floatX>(gpu_test::random_normal(rng, dx_inc.size(), rms));
    dx0_device = gpu_test::to_device_type<floatX>(dx0);
    run();
    std::vector<double> ref_dx(dx0);
    for (size_t i = 0; i < ref_dx.size(); i++) ref_dx[i] += dx_inc[i];
    expect_close("dx += (E/d) dz[group]", dx, ref_dx);

    auto plan_now = [&] {
        return std::make_tuple(gpu_test::download(plan.sel, copies), gpu_test::download(plan.gate, copies),
                               gpu_test::download(plan.copy_pos, copies), gpu_test::download(plan.group_offset, E + 1));
    };
    const auto plan_before = plan_now();
    gpu_test::expect_rerun_identical(std::string(s.name) + ": a second run is not bitwise identical", run, coef, loss,
                                     dropped, dx, deps);
    CHECK_MSG(plan_now() == plan_before, std::string(s.name) + ": a second run gives another plan");
}

int main() {
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(2031);
    const LocShape shapes[] = {
        {"tiny", 64, 64, 8, 2, 1.0f},
        {"top-1, groups of 25", 300, 200, 8, 1, 1.0f},
        {"dropless", 128, 64, 8, 2, 0.0f},
        {"p1 shape", 512, 1024, 64, 8, 1.0f},
        {"256 experts", 256, 512, 256, 4, 1.0f},
    };
    for (const LocShape& s : shapes) run_shape(s, rng);
    return check::summary();
}
