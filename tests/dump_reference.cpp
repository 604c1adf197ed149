// Dumps one forward + backward of the CPU reference (ref::Model<double>, tiny preset, B = 2) for each FFN
// kind, with the vocabulary cut to V = 200 so 56 padded rows exist, so tests/torch_oracle.py can recompute
// it with PyTorch autograd (SPEC §8.3):
//
//   dump_reference OUT_DIR        writes OUT_DIR/latentmoe/ and OUT_DIR/moe/ (see tests/model_dump.h)
//
// The weights are not the training initialisation: at N(0, 0.02²) attention is nearly uniform, GELU is
// nearly linear and the residual branches are tiny, so a wrong rotary angle or GELU would hardly move the
// gradients. Here every matrix is ~ N(0, 1/fan_in) (fan_in = its input width), so each layer's output is
// O(1): attention scores, router logits and expert pre-activations all land in their non-linear range.
// The embedding is ~ N(0, 1) so the residual stream and the branches are of similar size; RMSNorm gains
// are 1 + 0.1·N(0, 1) and the routing bias 0.1·N(0, 1), large enough to change some selections. The
// padded vocabulary rows of wte and lm_head are random too: padded logits must not count anyway.
#include <cmath>
#include <cstdio>
#include <exception>
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

lmoe::ModelDump run_reference(lmoe::FfnKind ffn, uint64_t seed) {
    lmoe::Config c;
    c.ffn = ffn;
    lmoe::apply_preset(c, "tiny");
    c.B = 2;
    c.V = 200;  // padded to Vp = 256, so the LM head's padded rows are exercised (tiny's V = 256 has none)
    c.seed = seed;
    lmoe::validate(c, 1);

    ref::Model<double> model(c);
    lmoe::Rng rng(seed);
    std::vector<float> params(model.params.size());
    for (const lmoe::TensorSpec& t : model.layout.tensors) {
        const bool gain = t.shape.size() == 1;
        const double scale = t.name == "wte" ? 1.0 : 1.0 / std::sqrt(fan_in(t, c));
        for (int64_t i = 0; i < t.numel; i++)
            params[t.offset + i] = float(gain ? 1.0 + 0.1 * rng.normal() : scale * rng.normal());
    }
    for (size_t i = 0; i < params.size(); i++) model.params[i] = params[i];  // exactly the dumped floats
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
    return d;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s OUT_DIR   (writes OUT_DIR/latentmoe and OUT_DIR/moe)\n", argv[0]);
        return 2;
    }
    const std::string out = argv[1];
    try {
        const struct { lmoe::FfnKind ffn; const char* dir; } kinds[] = {
            {lmoe::FfnKind::LatentMoE, "latentmoe"}, {lmoe::FfnKind::MoE, "moe"}};
        for (const auto& k : kinds) {
            const std::string dir = out + "/" + k.dir;
            lmoe::ModelDump d = run_reference(k.ffn, 20260101);
            lmoe::write_model_dump(dir, d);
            std::printf("wrote %s: %s, loss %.12f, %zu parameters\n", dir.c_str(), lmoe::ffn_name(k.ffn), d.loss,
                        d.params.size());
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dump_reference: %s\n", e.what());
        return 1;
    }
    return 0;
}
