// Each routing-glue kernel of a routed layer alone (both benchmarks): the router's forward and
// backward, the grouping, the weighting and its backward, the input-gradient gather — everything
// of the layer but its expert products. Run on the plan and buffers of the stage benchmark's last
// run; their sum is the layer's routing cost outside the expert products.
#pragma once
#include <cstdio>

#include "moe/combine.cuh"
#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "tests/gpu_test_utils.cuh"

struct RoutingGlue {
    const lmoe::RoutingPlan& plan;
    const floatX *x, *R;  // routed rows (M, ld) with D columns per head; router (H, D, E)
    const float* bias;
    int64_t ld;
    int D;
    floatX *o, *y, *dy, *d_o, *dx_copy, *dx, *router_t;  // (copies, D) or (M, ld)
    float *ds_copy, *dR, *router_grad_scratch;
};

inline void time_routing_glue(const RoutingGlue& g, int reps) {
    const lmoe::RoutingPlan& p = g.plan;
    struct Kernel {
        const char* name;
        double ms;
    } kernels[] = {
        {"router forward", gpu_test::time_ms(reps, [&] { lmoe::router_forward(p, g.x, g.ld, g.R, g.bias, g.D, 0); })},
        {"group copies", gpu_test::time_ms(reps, [&] { lmoe::group_copies(p, 0); })},
        {"weight + merge", gpu_test::time_ms(reps, [&] { lmoe::combine_forward(g.y, g.ld, g.o, p, g.D, 0); })},
        {"weight backward",
         gpu_test::time_ms(reps, [&] { lmoe::combine_backward(g.d_o, g.ds_copy, g.dy, g.ld, g.o, p, g.D, 0); })},
        {"router weight backward", gpu_test::time_ms(reps, [&] {
             lmoe::router_weight_backward(g.dR, g.router_grad_scratch, g.x, g.ld, g.ds_copy, p, g.D, 0);
         })},
        {"gather input grad", gpu_test::time_ms(reps, [&] {
             lmoe::gather_input_grad(g.dx, g.ld, g.dx_copy, g.ds_copy, g.R, g.router_t, p, g.D, 0);
         })},
    };
    double total = 0;
    for (const Kernel& k : kernels) {
        std::printf("  glue %-25s %8.3f ms\n", k.name, k.ms);
        total += k.ms;
    }
    std::printf("  glue %-25s %8.3f ms\n", "total", total);
}
