// Stage benchmark of the routed part of the Multi-Head LatentMoE layer (SPEC §4) at SPEC §6's layer
// sizes, N = 8192 tokens: the median time of each stage of forward + backward (as a step's first
// micro-batch: the expert weight gradients written) with the expert kernels' achieved rate, then each
// expert kernel alone, the weight gradient both adding and writing. Arguments name shapes to run
// alone (all without); without a GPU it exits 77.
#include <cstdint>

#include "bench/bench_shapes.h"
#include "bench/routing_glue.cuh"
#include "tests/latentmoe_fixture.cuh"

// Inputs are seeded random normals: the timings depend on their sizes and on the routing they
// produce, not on the values.
constexpr uint64_t kSeed = 2026;

// Median time of each stage at a benchmark size, with the expert kernels' achieved rate: forward 2
// matmuls per copy, input backward 3, weight backward 4; then each expert kernel and each glue kernel alone.
void bench_shape(const Shape& s, lmoe::Rng& rng) {
    const int HD = s.H * s.dh;
    LayerTensors T = upload_layer(s, random_inputs(s, rng, 0.0));
    for (auto* g : {&T.dR, &T.dK, &T.dV}) CUDA_CHECK(cudaMemset(g->get(), 0, g->size() * sizeof(float)));
    RoutedLayer L(s);
    const int reps = 20;
    const std::vector<float> ms = gpu_test::time_stages(kStages, reps, [&](cudaEvent_t* ev) { routed_layer(L, T, false, ev); });
    const double unit = 2.0 * s.H * s.M * s.k * s.dh * s.fe;  // FLOPs of one (copies × dh × fe) matmul
    const double flops[kStages] = {0, 2 * unit, 0, 0, 7 * unit, 0};
    std::printf("bench %s (M %d tokens, H %d, dh %d, E %d, fe %d, k %d%s), median of %d:\n", s.name, s.M, s.H, s.dh,
                s.E, s.fe, s.k, s.crowded ? ", every row on the same k experts" : "", reps);
    gpu_test::print_stages(kStages, kStageNames, ms, flops);
    std::printf("  %-30s %8.3f ms (routed part, without W_mh / W_mg)\n", "total", ms[kStages]);

    // Each expert kernel alone, on the plan of the last run.
    const int dh = s.dh, F = s.fe;
    gpu_test::time_kernel("expert forward", reps, 2 * unit, [&] {
        lmoe::expert_forward(L.o.get(), T.u.get(), HD, T.K.get(), T.V.get(), L.plan, dh, F, 0);
    });
    gpu_test::time_kernel("expert input backward", reps, 3 * unit, [&] {
        lmoe::expert_input_backward(L.dx_copy.get(), L.d_o.get(), T.u.get(), HD, T.K.get(), T.V.get(), L.plan, dh, F, 0);
    });
    for (const bool accumulate : {true, false})
        gpu_test::time_kernel(accumulate ? "expert weight backward" : "expert weight backward, =", reps, 4 * unit, [&] {
            lmoe::expert_weight_backward(T.dK.get(), T.dV.get(), accumulate, L.d_o.get(), T.u.get(), HD, T.K.get(),
                                         T.V.get(), L.plan, L.weight_parts.view(), dh, F, 0);
        });
    time_routing_glue({L.plan, T.u.get(), T.R.get(), T.bias.get(), HD, dh, L.o.get(), T.y.get(), T.dy.get(), L.d_o.get(),
                       L.dx_copy.get(), T.du.get(), L.router_t.get(), L.ds_copy.get(), T.dR.get(),
                       L.router_grad_scratch.get()},
                      reps);
}

int main(int argc, char** argv) {
    const std::vector<Shape> shapes = {
        {"p1", 8192, 8, 128, 64, 512, 8},
        {"p2", 8192, 8, 128, 128, 256, 16},
        {"p1 crowded", 8192, 8, 128, 64, 512, 8, true},  // the most skewed routing
        // What one rank of Head Parallel on 8 GPUs computes: H/R = 1 head for the 8 ranks' tokens.
        {"p1 rank of 8", 65536, 1, 128, 64, 512, 8},
        {"p1 rank of 8 crowded", 65536, 1, 128, 64, 512, 8, true},
    };
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(kSeed);
    return run_bench_shapes(argc, argv, shapes, [&](const Shape& s) { bench_shape(s, rng); });
}
