// Dumps one forward + backward of the CPU reference (ref::Model<double>, tiny preset, B = 2) for each FFN
// kind and router, with the vocabulary cut to V = 200 so 56 padded rows exist, so tests/torch_oracle.py
// can recompute it with PyTorch autograd (SPEC §8.3):
//
//   dump_reference OUT_DIR        writes OUT_DIR/{latentmoe,moe,locmoe,locmoe_capacity}/ (tests/model_dump.h)
//
// The weights are not the training initialisation: at N(0, 0.02²) attention is nearly uniform, GELU is
// nearly linear and the residual branches are tiny, so a wrong rotary angle or GELU would hardly move the
// gradients. Here every matrix is ~ N(0, 1/fan_in) (fan_in = its input width), so each layer's output is
// O(1): attention scores, router logits and expert pre-activations all land in their non-linear range.
// The embedding is ~ N(0, 1) so the residual stream and the branches are of similar size; RMSNorm gains
// are 1 + 0.1·N(0, 1) and the routing bias 0.1·N(0, 1), large enough to change some selections. The
// padded vocabulary rows of wte and lm_head are random too: padded logits must not count anyway.
//
// LocMoE (SPEC §2.6) twice. "locmoe": dropless (c_f = 0), the default δ, α and μ, one rank. And
// "locmoe_capacity": rank 1 of 4 in nodes of 2, so D_l is not uniform (experts 0-3 are its node's);
// α = 0.3 and μ = 0.5, so the two losses weigh in every gradient of ε; δ = 0.3, so ec_min =
// ⌈1/(E·p_δ)⌉ = 9 is more than 1; c_f = 1, so C = max(9, ⌈1·64·2/8⌉) = 16 rows per expert, the
// average load: the uneven loads drop copies (the dump is refused if none is dropped). ε is
// ~ 0.3·N(0, 1), the spread of the pooled inputs (means of d/E = 8 features of about unit size), so the
// ReLU cuts about half of x Ω^T + ε and rows with tied zero gates meet the lower-index rule. No routing
// bias: LocMoE has none.
#include <cmath>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/config.h"
#include "cpu/reference.h"
#include "util/rng.h"
#include "tests/model_dump.h"

namespace {

// Input width of a matrix in the flat layout: how many numbers each output is a sum over.
double fan_in(const lmoe::TensorSpec& t, const lmoe::Config& c) {
    const std::string& n = t.name;
    auto ends_with = [&](const char* s) {
        std::string suffix(s);
        return n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    const bool hp = c.ffn == lmoe::FfnKind::LatentMoE;
    if (ends_with("router")) return hp ? c.dh : c.d;     // (H, dh, E) or (d, E): logits sum over dh or d
    if (ends_with("expert_in")) return hp ? c.dh : c.d;  // K_{h,e}: (fe, dh) or W1_e: (f, d)
    if (ends_with("expert_out")) return c.fe;            // V^T or W2_e: sums over the hidden fe / f
    return double(t.shape.back());                       // (O, I) matrices: y = x W^T sums over I
}

// One dump: an FFN kind, and for LocMoE its flags and the rank the step stands for.
struct Case {
    const char* dir;
    lmoe::FfnKind ffn;
    const char* router;
    float capacity_factor, capacity_delta, aux_loss_weight, loc_loss_weight;
    ref::RankPlace place;
};

lmoe::ModelDump run_reference(const Case& k, uint64_t seed) {
    lmoe::Config c;
    c.ffn = k.ffn;
    lmoe::apply_preset(c, "tiny");
    c.B = 2;
    c.V = 200;  // padded to Vp = 256, so the LM head's padded rows are exercised (tiny's V = 256 has none)
    c.seed = seed;
    c.router = k.router;
    if (c.locmoe()) {
        c.bias_rate = 0;
        c.capacity_factor = k.capacity_factor;
        c.capacity_delta = k.capacity_delta;
        c.aux_loss_weight = k.aux_loss_weight;
        c.loc_loss_weight = k.loc_loss_weight;
        c.node_size = k.place.node_size;
    }
    lmoe::validate(c, k.place.world);

    ref::Model<double> model(c);
    model.place = k.place;
    lmoe::Rng rng(seed);
    std::vector<float> params(model.params.size());
    for (const lmoe::TensorSpec& t : model.layout.tensors) {
        const bool eps = t.name.find("router_eps") != std::string::npos;
        const bool gain = t.shape.size() == 1 && !eps;
        const double scale = t.name == "wte" ? 1.0 : eps ? 0.3 : 1.0 / std::sqrt(fan_in(t, c));
        for (int64_t i = 0; i < t.numel; i++)
            params[t.offset + i] = float(gain ? 1.0 + 0.1 * rng.normal() : scale * rng.normal());
    }
    for (size_t i = 0; i < params.size(); i++) model.params[i] = params[i];  // exactly the dumped floats
    if (!c.locmoe())
        for (float& b : model.routing_bias) b = float(0.1 * rng.normal());

    const int N = c.B * c.T;
    std::vector<int32_t> tokens(N), targets(N);
    for (int i = 0; i < N; i++) {
        tokens[i] = rng.below(c.V);
        targets[i] = rng.below(c.V);
    }

    model.zero_grad();
    const double loss = model.forward(tokens.data(), targets.data(), c.B);
    model.backward();

    lmoe::ModelDump d;
    d.cfg = c;
    d.tensors = model.layout.tensors;
    d.params = params;
    d.grads = model.grads;
    d.tokens = tokens;
    d.targets = targets;
    for (int l = 0; l < c.L; l++) d.sel.insert(d.sel.end(), model.ffn[l].sel.begin(), model.ffn[l].sel.end());
    d.routing_bias = model.routing_bias;
    d.loss = loss;
    d.producer = "dump_reference: ref::Model<double>, tiny preset, B = 2, seed " + std::to_string(seed);
    if (c.locmoe()) {
        lmoe::LocMoeDump& loc = d.locmoe;
        loc.rank = k.place.rank;
        loc.world = k.place.world;
        loc.node_size = k.place.node_size;
        const lmoe::ExpertCapacity cap = lmoe::expert_capacity(c, N);
        loc.p_delta = cap.p_delta;
        loc.ec_min = cap.ec_min;
        loc.capacity = model.ffn[0].locmoe.capacity;
        loc.cross_entropy = model.cross_entropy;
        loc.aux_loss = model.aux_loss;
        loc.loc_loss = model.loc_loss;
        for (int l = 0; l < c.L; l++) {
            loc.kept.insert(loc.kept.end(), model.ffn[l].kept.begin(), model.ffn[l].kept.end());
            loc.dropped.push_back(model.ffn[l].dropped);
        }
        int64_t dropped = 0;
        for (int64_t n : loc.dropped) dropped += n;
        if (c.capacity_factor > 0 && dropped == 0)
            throw std::runtime_error(std::string(k.dir) + ": the capacity drops no copy, so the oracle "
                                     "could not check the drop");
    }
    return d;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s OUT_DIR   (writes OUT_DIR/latentmoe, moe, locmoe, locmoe_capacity)\n",
                     argv[0]);
        return 2;
    }
    const std::string out = argv[1];
    try {
        const Case cases[] = {
            {"latentmoe", lmoe::FfnKind::LatentMoE, "topk", 0, 0, 0, 0, {}},
            {"moe", lmoe::FfnKind::MoE, "topk", 0, 0, 0, 0, {}},
            {"locmoe", lmoe::FfnKind::MoE, "locmoe", 0, 0.03f, 0.01f, 0.01f, {0, 1, 1}},
            {"locmoe_capacity", lmoe::FfnKind::MoE, "locmoe", 1.0f, 0.3f, 0.3f, 0.5f, {1, 4, 2}},
        };
        for (const Case& k : cases) {
            const std::string dir = out + "/" + k.dir;
            lmoe::ModelDump d = run_reference(k, 20260101);
            lmoe::write_model_dump(dir, d);
            std::printf("wrote %s: %s, %s router, loss %.12f, %zu parameters", dir.c_str(),
                        lmoe::ffn_name(k.ffn), k.router, d.loss, d.params.size());
            if (d.cfg.locmoe()) {
                int64_t dropped = 0;
                for (int64_t n : d.locmoe.dropped) dropped += n;
                std::printf(", C %d, %lld of %zu copies dropped", d.locmoe.capacity, (long long)dropped,
                            d.locmoe.kept.size());
            }
            std::printf("\n");
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dump_reference: %s\n", e.what());
        return 1;
    }
    return 0;
}
