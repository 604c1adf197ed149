// The routed part of the Multi-Head LatentMoE layer on the GPU against the CPU reference (SPEC §4,
// §8.3): the IO-aware router, the grouping of copies by (head, expert), the IO-aware expert kernels
// forward and backward, the weighting and the router backward; then bitwise reproducibility.
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

using lmoe::DeviceBuffer;
using gpu_test::expect_close;
using gpu_test::rounded;
using gpu_test::upload;

struct Shape {
    const char* name;
    int M, H, dh, E, fe, k;
    bool crowded = false;  // a bias sends every row of a head to the same k experts (the most skewed routing)
};

// Device buffers of one routed layer (one head group per latent head) and its plan.
struct RoutedLayer {
    Shape s;
    int64_t copies, max_tiles;
    DeviceBuffer<float> ds_copy, router_grad_scratch;
    DeviceBuffer<floatX> o, d_o, dx_copy;
    lmoe::RoutingPlans plans;
    lmoe::RoutingPlan plan;
    explicit RoutedLayer(const Shape& shape)
        : s(shape), plans(lmoe::RoutingPlans::routed(1, shape.M, shape.H, shape.E, shape.k)), plan(plans[0]) {
        copies = (int64_t)s.H * s.M * s.k;
        max_tiles = plan.max_tiles;
        router_grad_scratch.resize(lmoe::router_grad_scratch_size(s.H * s.E, s.dh));
        ds_copy.resize(copies); o.resize(copies * s.dh); d_o.resize(copies * s.dh); dx_copy.resize(copies * s.dh);
    }
    void poison_all() {
        plans.poison();
        ds_copy.poison(); o.poison(); d_o.poison(); dx_copy.poison();
    }
};

// The layer's tensors: inputs u, dy and weights R, K, V, bias; outputs y, du and gradients dR, dK, dV.
struct LayerTensors {
    DeviceBuffer<floatX> u, R, K, V, dy, y, du;
    DeviceBuffer<float> bias, dR, dK, dV;
};

// Stage boundaries recorded by routed_layer when timing: route+group | experts | weight |
// weight backward | expert backward | router backward + gather.
constexpr int kStages = 6;
const char* kStageNames[kStages] = {"route + group", "expert forward", "weight + merge", "weight backward",
                                    "expert backward (dX, dK, dV)", "router backward + gather"};

// Forward and backward of the routed part, stage by stage; events[i] marks the end of stage i.
void routed_layer(RoutedLayer& L, LayerTensors& T, cudaEvent_t* events = nullptr) {
    const Shape& s = L.s;
    const int HD = s.H * s.dh;
    cudaStream_t st = 0;
    auto mark = [&](int i) { if (events) CUDA_CHECK(cudaEventRecord(events[i + 1], st)); };
    if (events) CUDA_CHECK(cudaEventRecord(events[0], st));
    lmoe::router_forward(L.plan, T.u.get(), HD, T.R.get(), T.bias.get(), s.dh, st);
    lmoe::group_copies(L.plan, st);
    mark(0);
    lmoe::expert_forward(L.o.get(), T.u.get(), HD, T.K.get(), T.V.get(), L.plan, s.dh, s.fe, st);
    mark(1);
    lmoe::combine_forward(T.y.get(), HD, L.o.get(), L.plan, s.dh, st);
    mark(2);
    lmoe::combine_backward(L.d_o.get(), L.ds_copy.get(), T.dy.get(), HD, L.o.get(), L.plan, s.dh, st);
    mark(3);
    lmoe::expert_backward(L.dx_copy.get(), T.dK.get(), T.dV.get(), L.d_o.get(), T.u.get(), HD, T.K.get(), T.V.get(),
                          L.plan, s.dh, s.fe, st);
    mark(4);
    lmoe::router_weight_backward(T.dR.get(), L.router_grad_scratch.get(), T.u.get(), HD, L.ds_copy.get(), L.plan, s.dh,
                                 st);
    lmoe::gather_input_grad(T.du.get(), HD, L.dx_copy.get(), L.ds_copy.get(), T.R.get(), L.plan, s.dh, st);
    mark(5);
}

// The plan must be a stable grouping: every copy once, in its (head, expert) group, rows increasing.
void check_plan(const RoutedLayer& L, const std::vector<int>& sel) {
    const Shape& s = L.s;
    auto offset = gpu_test::download(L.plan.group_offset, L.plan.groups() + 1), row = gpu_test::download(L.plan.copy_row, L.copies), pos = gpu_test::download(L.plan.copy_pos, L.copies);
    auto tg = gpu_test::download(L.plan.tile_group, L.max_tiles), ts = gpu_test::download(L.plan.tile_start, L.max_tiles);
    bool ok = offset[0] == 0 && offset[s.H * s.E] == L.copies;
    std::vector<int> seen(L.copies, 0);
    for (int h = 0; h < s.H; h++)
        for (int t = 0; t < s.M; t++)
            for (int j = 0; j < s.k; j++) {
                int64_t slot = ((int64_t)h * s.M + t) * s.k + j;
                int p = pos[slot], g = h * s.E + sel[slot];
                if (p < 0 || p >= L.copies) { ok = false; continue; }
                seen[p]++;
                ok &= row[p] == t && offset[g] <= p && p < offset[g + 1];
            }
    for (int64_t p = 0; p < L.copies; p++) ok &= seen[p] == 1;
    for (int g = 0; g < s.H * s.E; g++)
        for (int p = offset[g] + 1; p < offset[g + 1]; p++) ok &= row[p - 1] < row[p];
    CHECK_MSG(ok, std::string(s.name) + ": the grouping is not a stable partition of the copies by (head, expert)");
    int tiles = gpu_test::download(L.plan.num_tiles, 1)[0], expected = 0;
    for (int g = 0; g < s.H * s.E; g++) expected += (int)ceil_div(offset[g + 1] - offset[g], lmoe::kExpertTileRows);
    bool tiles_ok = tiles == expected && tiles <= L.max_tiles;
    for (int i = 0; tiles_ok && i < tiles; i++)
        tiles_ok &= ts[i] >= offset[tg[i]] && ts[i] < offset[tg[i] + 1] && (ts[i] - offset[tg[i]]) % lmoe::kExpertTileRows == 0;
    CHECK_MSG(tiles_ok, std::string(s.name) + ": the tile list does not cover the groups");
}

// The routing bias (H, E): N(0, scale²), and +100 on each head's first k experts when crowded.
std::vector<float> routing_bias(const Shape& s, lmoe::Rng& rng, double scale) {
    std::vector<float> bias(s.H * s.E);
    for (float& b : bias) b = float(scale * rng.normal());
    if (s.crowded)
        for (int h = 0; h < s.H; h++)
            for (int e = 0; e < s.k; e++) bias[h * s.E + e] += 100.f;
    return bias;
}

void run_shape(const Shape& s, lmoe::Rng& rng) {
    std::printf("%s: M %d, H %d, dh %d, E %d, fe %d, k %d\n", s.name, s.M, s.H, s.dh, s.E, s.fe, s.k);
    const int HD = s.H * s.dh;
    // inputs, rounded to what the GPU holds
    auto u = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.M * HD));
    auto R = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.H * s.dh * s.E, 0.3));
    auto K = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.H * s.E * s.fe * s.dh, 1.0 / std::sqrt(s.dh)));
    auto V = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.H * s.E * s.fe * s.dh, 1.0 / std::sqrt(s.fe)));
    auto dy = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.M * HD));
    const std::vector<float> bias = routing_bias(s, rng, 0.2);
    LayerTensors T{upload<floatX>(u), upload<floatX>(R), upload<floatX>(K), upload<floatX>(V), upload<floatX>(dy),
                   DeviceBuffer<floatX>((size_t)s.M * HD), DeviceBuffer<floatX>((size_t)s.M * HD),
                   DeviceBuffer<float>(bias.size()), DeviceBuffer<float>(R.size()), DeviceBuffer<float>(K.size()),
                   DeviceBuffer<float>(V.size())};
    T.bias.upload(bias);
    RoutedLayer L(s);
    auto run_layer = [&] {
        L.poison_all();
        T.y.poison();
        T.du.poison();
        for (auto* g : {&T.dR, &T.dK, &T.dV}) CUDA_CHECK(cudaMemset(g->get(), 0, g->size() * sizeof(float)));
        routed_layer(L, T);
        CUDA_CHECK(cudaDeviceSynchronize());
    };
    run_layer();

    // Router: the choices must be the reference's top-k, except where the k-th and (k+1)-th biased
    // scores are within rounding of each other.
    auto sel = gpu_test::download(L.plan.sel, L.copies);
    int mismatched = 0, near_ties = 0;
    std::vector<double> logits(s.E);
    std::vector<int> ref_sel(s.k);
    for (int h = 0; h < s.H; h++)
        for (int t = 0; t < s.M; t++) {
            ref::router_logits(logits.data(), u.data() + (int64_t)t * HD + h * s.dh, R.data() + (int64_t)h * s.dh * s.E,
                               s.dh, s.E);
            ref::select_topk(ref_sel.data(), logits.data(), bias.data() + h * s.E, s.E, s.k);
            const int* got = sel.data() + ((int64_t)h * s.M + t) * s.k;
            if (std::equal(ref_sel.begin(), ref_sel.end(), got)) continue;
            std::vector<double> scores(s.E);
            for (int e = 0; e < s.E; e++) scores[e] = logits[e] + bias[h * s.E + e];
            std::sort(scores.rbegin(), scores.rend());
            bool tie = false;
            for (int j = 0; j < s.k && j + 1 < s.E; j++) tie |= scores[j] - scores[j + 1] < 1e-4 * (1 + std::abs(scores[j]));
            (tie ? near_ties : mismatched)++;
        }
    std::printf("  router: %d of %d choices differ from the reference (%d at near-ties)\n", mismatched + near_ties,
                s.H * s.M, near_ties);
    CHECK_MSG(mismatched == 0, std::string(s.name) + ": router top-k differs from the reference away from ties");
    check_plan(L, sel);

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
    expect_close("gates", gate_got, gates, gpu_test::kPrecision[0] == 'f' ? 1e-5 : 1e-2);
    expect_close("y = sum_j w_j expert_j(u)", T.y, ref_y);
    expect_close("du (experts + router)", T.du, ref_du);
    expect_close("dR (router)", T.dR, dR);
    expect_close("dK (expert_in)", T.dK, dK);
    expect_close("dV (expert_out)", T.dV, dV);

    // Bitwise reproducible: a second run gives the same bytes everywhere.
    auto y1 = T.y.download(), du1 = T.du.download();
    auto dR1 = T.dR.download(), dK1 = T.dK.download(), dV1 = T.dV.download();
    run_layer();
    auto same = [](const auto& a, const auto& b) {
        return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
    };
    CHECK_MSG(same(y1, T.y.download()) && same(du1, T.du.download()) && same(dR1, T.dR.download()) &&
                  same(dK1, T.dK.download()) && same(dV1, T.dV.download()),
              std::string(s.name) + ": a second run is not bitwise identical");
}

// Median time of each stage at a benchmark size (N = 8192 tokens, SPEC §6), with the expert
// kernels' achieved rate: forward 2 matmuls per copy, input backward 3, weight backward 4.
void bench_shape(const Shape& s, lmoe::Rng& rng) {
    const int HD = s.H * s.dh;
    LayerTensors T{upload<floatX>(gpu_test::random_normal(rng, (size_t)s.M * HD)),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.H * s.dh * s.E, 0.3)),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.H * s.E * s.fe * s.dh, 1.0 / std::sqrt(s.dh))),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.H * s.E * s.fe * s.dh, 1.0 / std::sqrt(s.fe))),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.M * HD)),
                   DeviceBuffer<floatX>((size_t)s.M * HD), DeviceBuffer<floatX>((size_t)s.M * HD),
                   DeviceBuffer<float>((size_t)s.H * s.E), DeviceBuffer<float>((size_t)s.H * s.dh * s.E),
                   DeviceBuffer<float>((size_t)s.H * s.E * s.fe * s.dh), DeviceBuffer<float>((size_t)s.H * s.E * s.fe * s.dh)};
    T.bias.upload(routing_bias(s, rng, 0.0));
    for (auto* g : {&T.dR, &T.dK, &T.dV}) CUDA_CHECK(cudaMemset(g->get(), 0, g->size() * sizeof(float)));
    RoutedLayer L(s);
    const int reps = 20;
    const std::vector<float> ms = gpu_test::time_stages(kStages, reps, [&](cudaEvent_t* ev) { routed_layer(L, T, ev); });
    const double unit = 2.0 * s.H * s.M * s.k * s.dh * s.fe;  // FLOPs of one (copies × dh × fe) matmul
    const double flops[kStages] = {0, 2 * unit, 0, 0, 7 * unit, 0};
    std::printf("bench %s (M %d tokens, H %d, dh %d, E %d, fe %d, k %d%s), median of %d:\n", s.name, s.M, s.H, s.dh,
                s.E, s.fe, s.k, s.crowded ? ", every row on the same k experts" : "", reps);
    for (int i = 0; i < kStages; i++) {
        const double t = ms[i];
        std::printf("  %-30s %8.3f ms", kStageNames[i], t);
        if (flops[i] > 0) std::printf("  %6.1f TFLOP/s", flops[i] / (t * 1e-3) / 1e12);
        std::printf("\n");
    }
    std::printf("  %-30s %8.3f ms (routed part, without W_mh / W_mg)\n", "total", ms[kStages]);

    // Each expert kernel alone, on the plan of the last run.
    const int dh = s.dh, F = s.fe;
    auto time_kernel = [&](const char* name, double units, auto&& launch) {
        const double m = gpu_test::time_ms(reps, launch);
        std::printf("  kernel %-23s %8.3f ms  %6.1f TFLOP/s\n", name, m, units * unit / (m * 1e-3) / 1e12);
    };
    time_kernel("expert forward", 2, [&] {
        lmoe::expert_forward(L.o.get(), T.u.get(), HD, T.K.get(), T.V.get(), L.plan, dh, F, 0);
    });
    time_kernel("expert input backward", 3, [&] {
        lmoe::expert_input_backward(L.dx_copy.get(), L.d_o.get(), T.u.get(), HD, T.K.get(), T.V.get(), L.plan, dh, F, 0);
    });
    time_kernel("expert weight backward", 4, [&] {
        lmoe::expert_weight_backward(T.dK.get(), T.dV.get(), L.d_o.get(), T.u.get(), HD, T.K.get(), T.V.get(), L.plan,
                                     dh, F, 0);
    });
}

int main(int argc, char** argv) {
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(2026);
    const Shape shapes[] = {
        {"tiny", 64, 4, 16, 8, 32, 2},
        {"odd rows", 300, 2, 32, 6, 64, 3},
        {"small", 512, 8, 64, 32, 256, 4},
        {"p1 shape", 192, 8, 128, 64, 512, 8},
        {"crowded", 1024, 4, 128, 32, 512, 8, true},
    };
    for (const Shape& s : shapes) run_shape(s, rng);
    if (argc > 1 && std::string(argv[1]) == "--bench") {  // SPEC §6 layer benchmark sizes, N = 8192
        bench_shape({"p1", 8192, 8, 128, 64, 512, 8}, rng);
        bench_shape({"p2", 8192, 8, 128, 128, 256, 16}, rng);
        bench_shape({"p1 crowded", 8192, 8, 128, 64, 512, 8, true}, rng);  // the most skewed routing
        // What one rank of Head Parallel on 8 GPUs computes: H/R = 1 head for the 8 ranks' tokens.
        bench_shape({"p1 rank of 8", 65536, 1, 128, 64, 512, 8}, rng);
        bench_shape({"p1 rank of 8 crowded", 65536, 1, 128, 64, 512, 8, true}, rng);
    }
    return check::summary();
}
