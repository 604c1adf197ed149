// The routed MoE layer of moe_ep_baseline as its GPU test (tests/test_gpu_moe.cu) and its stage
// benchmark (bench/bench_moe.cu) both build it: the shape, the device buffers of the layer and its
// plan, random inputs, and forward and backward stage by stage, the stages of MoeFfn (SPEC §2.2).
#pragma once
#include <cmath>
#include <vector>

#include "moe/combine.cuh"
#include "moe/grouped/grouped_gemm.cuh"
#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "tests/gpu_test_utils.cuh"

struct Shape {
    const char* name;
    int M, d, E, f, k;
    bool starve_last = false;  // a large negative bias keeps every copy away from the last expert
    bool crowded = false;      // a large positive bias sends every token to the first k experts
};

// Device buffers of one routed MoE layer: the plan and the per-copy activations.
struct MoeLayer {
    Shape s;
    int64_t copies, max_tiles;
    lmoe::DeviceBuffer<float> ds_copy, router_grad_scratch;
    lmoe::DeviceBuffer<floatX> pre, h, o, d_o, dpre, dx_copy, router_t;
    lmoe::RoutingPlans plans;
    lmoe::RoutingPlan plan;
    explicit MoeLayer(const Shape& shape)
        : s(shape), plans(lmoe::RoutingPlans::routed(1, shape.M, 1, shape.E, shape.k)), plan(plans[0]) {
        copies = (int64_t)s.M * s.k;
        max_tiles = plan.max_tiles;
        ds_copy.resize(copies);
        router_grad_scratch.resize(lmoe::router_grad_scratch_size(s.E, s.d));
        router_t.resize((size_t)s.E * s.d);
        pre.resize(copies * s.f); h.resize(copies * s.f); dpre.resize(copies * s.f);
        o.resize(copies * s.d); d_o.resize(copies * s.d); dx_copy.resize(copies * s.d);
    }
    void poison_all() {
        plans.poison();
        ds_copy.poison();
        for (auto* b : {&pre, &h, &o, &d_o, &dpre, &dx_copy}) b->poison();
    }
};

// The layer's tensors: inputs x (the normed tokens), dy and weights R, W1, W2, bias; outputs y, dx
// and gradients dR, dW1, dW2.
struct LayerTensors {
    lmoe::DeviceBuffer<floatX> x, R, W1, W2, dy, y, dx;
    lmoe::DeviceBuffer<float> bias, dR, dW1, dW2;
};

constexpr int kStages = 10;
inline const char* const kStageNames[kStages] = {
    "route",           "group",           "up forward (W1, GELU)", "down forward (W2)", "weight + merge",
    "weight backward", "down backward (dpre, dW2)", "up backward (dX, dW1)", "router backward", "gather input grad"};

// Forward and backward of the routed layer, the stages of MoeFfn, the expert weight gradients added to
// (accumulate) or written; with events, events[0] marks the start and events[i + 1] the end of stage i.
inline void routed_layer(MoeLayer& L, LayerTensors& T, bool accumulate, cudaEvent_t* events = nullptr) {
    const Shape& s = L.s;
    cudaStream_t st = 0;
    auto mark = [&](int i) { if (events) CUDA_CHECK(cudaEventRecord(events[i + 1], st)); };
    if (events) CUDA_CHECK(cudaEventRecord(events[0], st));
    lmoe::router_forward(L.plan, T.x.get(), s.d, T.R.get(), T.bias.get(), s.d, st);
    mark(0);
    lmoe::group_copies(L.plan, st);
    mark(1);
    lmoe::expert_up_forward(L.pre.get(), L.h.get(), T.x.get(), s.d, T.W1.get(), L.plan, s.d, s.f, st);
    mark(2);
    lmoe::expert_down_forward(L.o.get(), L.h.get(), T.W2.get(), L.plan, s.d, s.f, st);
    mark(3);
    lmoe::combine_forward(T.y.get(), s.d, L.o.get(), L.plan, s.d, st);
    mark(4);
    lmoe::combine_backward(L.d_o.get(), L.ds_copy.get(), T.dy.get(), s.d, L.o.get(), L.plan, s.d, st);
    mark(5);
    lmoe::expert_down_backward(L.dpre.get(), T.dW2.get(), accumulate, L.d_o.get(), L.h.get(), L.pre.get(), T.W2.get(),
                               L.plan, s.d, s.f, st);
    mark(6);
    lmoe::expert_up_backward(L.dx_copy.get(), T.dW1.get(), accumulate, L.dpre.get(), T.x.get(), s.d, T.W1.get(), L.plan,
                             s.d, s.f, st);
    mark(7);
    lmoe::router_weight_backward(T.dR.get(), L.router_grad_scratch.get(), T.x.get(), s.d, L.ds_copy.get(), L.plan, s.d,
                                 st);
    mark(8);
    lmoe::gather_input_grad(T.dx.get(), s.d, L.dx_copy.get(), L.ds_copy.get(), T.R.get(), L.router_t.get(), L.plan, s.d,
                            st);
    mark(9);
}

// The routing bias (E): N(0, scale²), then the shape's starved or crowded experts.
inline std::vector<float> routing_bias(const Shape& s, lmoe::Rng& rng, double scale) {
    std::vector<float> bias(s.E);
    for (float& b : bias) b = float(scale * rng.normal());
    if (s.starve_last) bias[s.E - 1] = -1e4f;
    if (s.crowded)
        for (int e = 0; e < s.k; e++) bias[e] += 100.f;
    return bias;
}

// Standard deviations of the random weights and of the routing bias: the checks draw the weights
// at 1/sqrt(fan-in) with a bias of scale 0.2, the benchmark draws them at 0.02 with no bias.
struct InputScales {
    double R, W1, W2, bias;
};
inline InputScales check_scales(const Shape& s) {
    return {1.0 / std::sqrt(s.d), 1.0 / std::sqrt(s.d), 1.0 / std::sqrt(s.f), 0.2};
}
constexpr InputScales kBenchScales{0.02, 0.02, 0.02, 0.0};

// Random inputs of one layer, rounded to what the GPU holds, drawn in this order: x ~ N(0, 1), R,
// W1, W2 at the given scales, dy ~ N(0, 1), then routing_bias(scales.bias).
struct LayerInputs {
    std::vector<double> x, R, W1, W2, dy;
    std::vector<float> bias;
};
inline LayerInputs random_inputs(const Shape& s, lmoe::Rng& rng, const InputScales& scales) {
    using gpu_test::random_normal;
    using gpu_test::rounded;
    LayerInputs in;
    in.x = rounded<floatX>(random_normal(rng, (size_t)s.M * s.d));
    in.R = rounded<floatX>(random_normal(rng, (size_t)s.d * s.E, scales.R));
    in.W1 = rounded<floatX>(random_normal(rng, (size_t)s.E * s.f * s.d, scales.W1));
    in.W2 = rounded<floatX>(random_normal(rng, (size_t)s.E * s.d * s.f, scales.W2));
    in.dy = rounded<floatX>(random_normal(rng, (size_t)s.M * s.d));
    in.bias = routing_bias(s, rng, scales.bias);
    return in;
}

// Device tensors holding the inputs, with room for y, dx and the gradients (not initialised).
inline LayerTensors upload_layer(const Shape& s, const LayerInputs& in) {
    using gpu_test::upload;
    using lmoe::DeviceBuffer;
    LayerTensors T{upload<floatX>(in.x), upload<floatX>(in.R), upload<floatX>(in.W1), upload<floatX>(in.W2),
                   upload<floatX>(in.dy), DeviceBuffer<floatX>((size_t)s.M * s.d), DeviceBuffer<floatX>((size_t)s.M * s.d),
                   DeviceBuffer<float>(in.bias.size()), DeviceBuffer<float>(in.R.size()),
                   DeviceBuffer<float>(in.W1.size()), DeviceBuffer<float>(in.W2.size())};
    T.bias.upload(in.bias);
    return T;
}
