// The routed part of one Multi-Head LatentMoE layer as its GPU test (tests/test_gpu_latentmoe.cu)
// and its stage benchmark (bench/bench_latentmoe.cu) both build it: the shape, the device buffers of
// the layer and its plan, random inputs, and forward and backward stage by stage (SPEC §4).
#pragma once
#include <cmath>
#include <vector>

#include "moe/combine.cuh"
#include "moe/latent/io_experts.cuh"
#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "tests/gpu_test_utils.cuh"

struct Shape {
    const char* name;
    int M, H, dh, E, fe, k;
    bool crowded = false;      // a bias sends every row of a head to the same k experts (the most skewed routing)
    bool starve_last = false;  // a large negative bias keeps every copy away from each head's last expert
};

// Device buffers of one routed layer (one head group per latent head) and its plan.
struct RoutedLayer {
    Shape s;
    int64_t copies, max_tiles;
    lmoe::DeviceBuffer<float> ds_copy, router_grad_scratch;
    lmoe::DeviceBuffer<floatX> o, d_o, dx_copy, router_t;
    lmoe::RoutingPlans plans;
    lmoe::RoutingPlan plan;
    lmoe::WeightGradScratch weight_parts;
    explicit RoutedLayer(const Shape& shape)
        : s(shape), plans(lmoe::RoutingPlans::routed(1, shape.M, shape.H, shape.E, shape.k)), plan(plans[0]),
          weight_parts(shape.M, shape.H, shape.E, shape.k, shape.fe, shape.dh) {
        copies = (int64_t)s.H * s.M * s.k;
        max_tiles = plan.max_tiles;
        router_grad_scratch.resize(lmoe::router_grad_scratch_size(s.H * s.E, s.dh));
        router_t.resize((size_t)s.H * s.E * s.dh);
        ds_copy.resize(copies); o.resize(copies * s.dh); d_o.resize(copies * s.dh); dx_copy.resize(copies * s.dh);
    }
    void poison_all() {
        plans.poison();
        weight_parts.poison();
        ds_copy.poison(); o.poison(); d_o.poison(); dx_copy.poison();
    }
};

// The layer's tensors: inputs u, dy and weights R, K, V, bias; outputs y, du and gradients dR, dK, dV.
struct LayerTensors {
    lmoe::DeviceBuffer<floatX> u, R, K, V, dy, y, du;
    lmoe::DeviceBuffer<float> bias, dR, dK, dV;
};

// Stage boundaries recorded by routed_layer when timing: route+group | experts | weight |
// weight backward | expert backward | router backward + gather.
constexpr int kStages = 6;
inline const char* const kStageNames[kStages] = {"route + group", "expert forward", "weight + merge",
                                                 "weight backward", "expert backward (dX, dK, dV)",
                                                 "router backward + gather"};

// Forward and backward of the routed part, stage by stage, the expert weight gradients added to
// (accumulate) or written; with events, events[0] marks the start and events[i + 1] the end of stage i.
inline void routed_layer(RoutedLayer& L, LayerTensors& T, bool accumulate, cudaEvent_t* events = nullptr) {
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
    lmoe::expert_backward(L.dx_copy.get(), T.dK.get(), T.dV.get(), accumulate, L.d_o.get(), T.u.get(), HD, T.K.get(),
                          T.V.get(), L.plan, L.weight_parts.view(), s.dh, s.fe, st);
    mark(4);
    lmoe::router_weight_backward(T.dR.get(), L.router_grad_scratch.get(), T.u.get(), HD, L.ds_copy.get(), L.plan, s.dh,
                                 st);
    lmoe::gather_input_grad(T.du.get(), HD, L.dx_copy.get(), L.ds_copy.get(), T.R.get(), L.router_t.get(), L.plan, s.dh,
                            st);
    mark(5);
}

// The routing bias (H, E): N(0, scale²), +100 on each head's first k experts when crowded, −100 on
// its last expert when starve_last (an empty group).
inline std::vector<float> routing_bias(const Shape& s, lmoe::Rng& rng, double scale) {
    std::vector<float> bias(s.H * s.E);
    for (float& b : bias) b = float(scale * rng.normal());
    if (s.crowded)
        for (int h = 0; h < s.H; h++)
            for (int e = 0; e < s.k; e++) bias[h * s.E + e] += 100.f;
    if (s.starve_last)
        for (int h = 0; h < s.H; h++) bias[h * s.E + s.E - 1] -= 100.f;
    return bias;
}

// Random inputs of one layer, rounded to what the GPU holds, drawn in this order: u ~ N(0, 1),
// R ~ N(0, 0.3²), K ~ N(0, 1/dh), V ~ N(0, 1/fe), dy ~ N(0, 1), then routing_bias(bias_scale).
struct LayerInputs {
    std::vector<double> u, R, K, V, dy;
    std::vector<float> bias;
};
inline LayerInputs random_inputs(const Shape& s, lmoe::Rng& rng, double bias_scale) {
    using gpu_test::random_normal;
    using gpu_test::rounded;
    const int HD = s.H * s.dh;
    LayerInputs in;
    in.u = rounded<floatX>(random_normal(rng, (size_t)s.M * HD));
    in.R = rounded<floatX>(random_normal(rng, (size_t)s.H * s.dh * s.E, 0.3));
    in.K = rounded<floatX>(random_normal(rng, (size_t)s.H * s.E * s.fe * s.dh, 1.0 / std::sqrt(s.dh)));
    in.V = rounded<floatX>(random_normal(rng, (size_t)s.H * s.E * s.fe * s.dh, 1.0 / std::sqrt(s.fe)));
    in.dy = rounded<floatX>(random_normal(rng, (size_t)s.M * HD));
    in.bias = routing_bias(s, rng, bias_scale);
    return in;
}

// Device tensors holding the inputs, with room for y, du and the gradients (not initialised).
inline LayerTensors upload_layer(const Shape& s, const LayerInputs& in) {
    using gpu_test::upload;
    using lmoe::DeviceBuffer;
    LayerTensors T{upload<floatX>(in.u), upload<floatX>(in.R), upload<floatX>(in.K), upload<floatX>(in.V),
                   upload<floatX>(in.dy), DeviceBuffer<floatX>((size_t)s.M * s.H * s.dh),
                   DeviceBuffer<floatX>((size_t)s.M * s.H * s.dh), DeviceBuffer<float>(in.bias.size()),
                   DeviceBuffer<float>(in.R.size()), DeviceBuffer<float>(in.K.size()), DeviceBuffer<float>(in.V.size())};
    T.bias.upload(in.bias);
    return T;
}
