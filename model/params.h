// The model's parameters as one flat buffer: which tensors exist, their shapes, where each lives,
// how each is initialised and whether it decays. Host-only; the buffer itself may live anywhere
// (CPU reference, GPU), since ModelTensors only does pointer arithmetic on it.
//
// Expert tensors are stored head-major (LatentMoE: [H, ...]) or expert-major (MoE: [E, ...]), so the
// shard a rank owns under Head Parallel or Expert Parallel is one contiguous slice of each of them.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "util/rng.h"

namespace lmoe {

struct TensorSpec {
    std::string name;             // e.g. "layer1.expert_in"
    std::vector<int64_t> shape;   // this rank's shape (the leading dim of an expert tensor is sharded)
    int64_t numel = 0;            // elements on this rank
    int64_t offset = 0;           // position in the flat buffer
    int64_t global_first = 0;     // global index of this rank's first element (0 unless sharded)
    int64_t live = 0;             // leading global elements drawn at random; the rest are zero (vocab padding)
    double init_std = 0;          // 0: constant 1 (RMSNorm gains)
    bool decay = false;           // AdamW weight decay applies (matrices only)
    bool expert = false;          // sharded over ranks; every other tensor is replicated
    bool gradient_written = false;  // the expert weights: a step's first backward writes the whole gradient
};

struct ParamLayout {
    std::vector<TensorSpec> tensors;
    int64_t total = 0;           // elements on this rank
    int64_t replicated = 0;      // of which replicated (their gradients are all-reduced)

    bool has(const std::string& name) const {
        for (const TensorSpec& t : tensors)
            if (t.name == name) return true;
        return false;
    }
    const TensorSpec& find(const std::string& name) const {
        for (const TensorSpec& t : tensors)
            if (t.name == name) return t;
        throw std::runtime_error("no parameter tensor named " + name);
    }
};

// Tensor list of SPEC §2 for rank `rank` of `world`. Replicated tensors come first, so their
// gradients form one contiguous block for the data-parallel all-reduce.
inline ParamLayout build_param_layout(const Config& c, int rank = 0, int world = 1) {
    const bool hp = c.ffn == FfnKind::LatentMoE;
    const int64_t d = c.d, Vp = c.Vp(), qkv = 3LL * c.n_head * c.d_attn(), latent = int64_t(c.H) * c.dh;
    const double std_base = 0.02, std_resid = 0.02 / std::sqrt(2.0 * c.L);
    const int64_t shards = hp ? c.H : c.E;  // the leading dim of expert tensors
    ParamLayout p;
    auto add = [&](std::string name, std::vector<int64_t> shape, double init_std, bool expert) {
        TensorSpec t;
        t.name = std::move(name);
        t.init_std = init_std;
        t.decay = shape.size() >= 2;
        t.expert = expert;
        int64_t per_lead = 1;
        for (size_t i = 1; i < shape.size(); i++) per_lead *= shape[i];
        t.live = shape[0] * per_lead;
        if (expert) {
            shape[0] = shards / world;
            t.global_first = rank * shape[0] * per_lead;
        }
        t.shape = shape;
        t.numel = shape[0] * per_lead;
        p.tensors.push_back(t);
    };
    add("wte", {Vp, d}, std_base, false);
    for (int l = 0; l < c.L; l++) {
        std::string pre = "layer" + std::to_string(l) + ".";
        add(pre + "ln1", {d}, 0, false);
        add(pre + "qkv", {qkv, d}, std_base, false);
        add(pre + "attn_out", {d, qkv / 3}, std_resid, false);
        add(pre + "ln2", {d}, 0, false);
        if (hp) {
            add(pre + "ffn_in", {latent, d}, std_base * c.latent_init_scale, false);    // W_mh
            add(pre + "ffn_out", {d, latent}, std_resid * c.latent_init_scale, false);  // W_mg
        } else if (c.locmoe()) {
            add(pre + "router_eps", {c.E}, std_base, false);      // LocMoE's ε (SPEC §2.6)
            p.tensors.back().live = 0;                            // starts at zero: nothing drawn
        } else {
            add(pre + "router", {d, c.E}, std_base, false);       // R
        }
    }
    add("lnf", {d}, 0, false);
    add("lm_head", {Vp, d}, std_base, false);
    for (int l = 0; l < c.L; l++) {
        std::string pre = "layer" + std::to_string(l) + ".";
        if (hp) {
            add(pre + "router", {c.H, c.dh, c.E}, std_base, true);           // R_h
            add(pre + "expert_in", {c.H, c.E, c.fe, c.dh}, std_base, true);  // K_{h,e}
            add(pre + "expert_out", {c.H, c.E, c.fe, c.dh}, std_base, true); // V_{h,e}
        } else {
            add(pre + "expert_in", {c.E, c.fe, d}, std_base, true);          // W1_e
            add(pre + "expert_out", {c.E, d, c.fe}, std_resid, true);        // W2_e
        }
        // the two just added, expert_in and expert_out: a step's first backward writes their gradients
        for (size_t i = p.tensors.size() - 2; i < p.tensors.size(); i++) p.tensors[i].gradient_written = true;
    }
    // Only the first V rows of the embedding and LM head are real; padded rows stay zero.
    for (TensorSpec& t : p.tensors)
        if (t.name == "wte" || t.name == "lm_head") t.live = int64_t(c.V) * d;
    for (TensorSpec& t : p.tensors) {
        t.offset = p.total;
        p.total += t.numel;
        if (!t.expert) p.replicated = p.total;
    }
    return p;
}

// Fills this rank's parameters: N(0, std^2) from the counter-based generator (stream = tensor index,
// counter = global element index), gains 1, vocab padding 0.
template <class T>
void init_params(T* params, const ParamLayout& p, uint64_t seed) {
    for (size_t s = 0; s < p.tensors.size(); s++) {
        const TensorSpec& t = p.tensors[s];
        for (int64_t i = 0; i < t.numel; i++) {
            int64_t g = t.global_first + i;
            double v = t.init_std == 0 ? 1.0 : (g < t.live ? t.init_std * normal_at(seed, s, g) : 0.0);
            params[t.offset + i] = static_cast<T>(v);
        }
    }
}

// Named pointers into a flat buffer laid out by build_param_layout (parameters or their gradients).
template <class T>
struct ModelTensors {
    struct Layer {
        T *ln1, *qkv, *attn_out, *ln2;
        T *ffn_in, *ffn_out;           // W_mh, W_mg (LatentMoE only; null for the MoE)
        T *router, *expert_in, *expert_out;
        T* router_eps;                 // LocMoE's ε (E); null for the other routers, whose R is `router`
    };
    T *wte, *lnf, *lm_head;
    std::vector<Layer> layers;
};

template <class T>
ModelTensors<T> bind_tensors(const ParamLayout& p, T* base, int L, FfnKind ffn) {
    auto at = [&](const std::string& name) { return base + p.find(name).offset; };
    ModelTensors<T> m;
    m.wte = at("wte");
    m.lnf = at("lnf");
    m.lm_head = at("lm_head");
    for (int l = 0; l < L; l++) {
        std::string pre = "layer" + std::to_string(l) + ".";
        typename ModelTensors<T>::Layer y;
        y.ln1 = at(pre + "ln1");
        y.qkv = at(pre + "qkv");
        y.attn_out = at(pre + "attn_out");
        y.ln2 = at(pre + "ln2");
        y.ffn_in = ffn == FfnKind::LatentMoE ? at(pre + "ffn_in") : nullptr;
        y.ffn_out = ffn == FfnKind::LatentMoE ? at(pre + "ffn_out") : nullptr;
        const bool grap = p.has(pre + "router_eps");
        y.router = grap ? nullptr : at(pre + "router");
        y.router_eps = grap ? at(pre + "router_eps") : nullptr;
        y.expert_in = at(pre + "expert_in");
        y.expert_out = at(pre + "expert_out");
        m.layers.push_back(y);
    }
    return m;
}

}  // namespace lmoe
