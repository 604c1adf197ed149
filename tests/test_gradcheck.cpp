// Finite-difference checks of the CPU reference in double (SPEC §8.1): every layer's backward against
// central differences for every parameter tensor and its input, then the whole model with either FFN.
// The error of a tensor is ‖fd − analytic‖ / max(‖fd‖, ‖analytic‖) over the checked elements; routing
// selections are frozen while differencing, so no top-k choice flips under a perturbation.
#include <cstdio>
#include <functional>
#include <map>
#include <string>

#include "cpu/reference.h"
#include "util/rng.h"
#include "tests/check.h"

using Fn = std::function<double()>;
constexpr double kStep = 1e-5;
constexpr double kTolerance = 1e-7;  // "well under 1e-6"; double central differences land near 1e-9

std::map<std::string, double> worst_by_group;

std::vector<double> random_vector(lmoe::Rng& rng, size_t n, double scale = 1.0) {
    std::vector<double> v(n);
    for (double& x : v) x = scale * rng.normal();
    return v;
}

// Compares analytic[idx] with central differences of f in x[idx]; records the error under `name`.
void fd_check(const std::string& group, const std::string& name, const Fn& f, double* x, const double* analytic,
              const std::vector<int64_t>& idx) {
    double diff2 = 0, fd2 = 0, an2 = 0;
    for (int64_t i : idx) {
        double keep = x[i];
        x[i] = keep + kStep;
        double up = f();
        x[i] = keep - kStep;
        double down = f();
        x[i] = keep;
        double fd = (up - down) / (2 * kStep);
        diff2 += (fd - analytic[i]) * (fd - analytic[i]);
        fd2 += fd * fd;
        an2 += analytic[i] * analytic[i];
    }
    double err = std::sqrt(diff2) / std::max(std::sqrt(std::max(fd2, an2)), 1e-300);
    CHECK_MSG(an2 > 0, name + ": the analytic gradient is all zero, so the check would prove nothing");
    CHECK_MSG(err < kTolerance, name + ": relative error " + std::to_string(err));
    worst_by_group[group] = std::max(worst_by_group[group], err);
    std::printf("  %-34s %6zu elements  rel err %.2e\n", name.c_str(), idx.size(), err);
}

std::vector<int64_t> all_indices(size_t n) {
    std::vector<int64_t> v(n);
    for (size_t i = 0; i < n; i++) v[i] = (int64_t)i;
    return v;
}

// A random linear functional of a layer's output, so d loss / d out = r.
double dot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}

void check_dense_layers(lmoe::Rng& rng) {
    std::printf("dense layers\n");
    {   // matmul
        const int N = 5, I = 7, O = 6;
        auto x = random_vector(rng, N * I), W = random_vector(rng, O * I), r = random_vector(rng, N * O);
        std::vector<double> out(N * O), dx(N * I, 0), dW(O * I, 0);
        Fn f = [&] { ref::matmul_forward(out.data(), x.data(), W.data(), N, I, O); return dot(out, r); };
        ref::matmul_backward(dx.data(), dW.data(), r.data(), x.data(), W.data(), N, I, O);
        fd_check("matmul", "matmul dW", f, W.data(), dW.data(), all_indices(W.size()));
        fd_check("matmul", "matmul dx", f, x.data(), dx.data(), all_indices(x.size()));
    }
    {   // RMSNorm
        const int N = 4, d = 9;
        auto x = random_vector(rng, N * d), g = random_vector(rng, d), r = random_vector(rng, N * d);
        std::vector<double> y(N * d), rstd(N), dx(N * d, 0), dg(d, 0);
        Fn f = [&] { ref::rmsnorm_forward(y.data(), rstd.data(), x.data(), g.data(), N, d); return dot(y, r); };
        f();
        ref::rmsnorm_backward(dx.data(), dg.data(), r.data(), x.data(), g.data(), rstd.data(), N, d);
        fd_check("rmsnorm", "rmsnorm dg", f, g.data(), dg.data(), all_indices(d));
        fd_check("rmsnorm", "rmsnorm dx", f, x.data(), dx.data(), all_indices(x.size()));
    }
    {   // rotary embedding + causal attention, input qkv
        const int B = 2, T = 5, nh = 2, da = 6, C = nh * da;
        auto qkv = random_vector(rng, B * T * 3 * C), r = random_vector(rng, B * T * C);
        std::vector<double> roped, out(B * T * C), probs(B * nh * T * T), dqkv(qkv.size(), 0);
        Fn f = [&] {
            roped = qkv;
            ref::rope_forward(roped.data(), B, T, nh, da);
            ref::attention_forward(out.data(), probs.data(), roped.data(), B, T, nh, da);
            return dot(out, r);
        };
        f();
        ref::attention_backward(dqkv.data(), r.data(), roped.data(), probs.data(), B, T, nh, da);
        ref::rope_backward(dqkv.data(), B, T, nh, da);
        fd_check("attention", "rope+attention dqkv", f, qkv.data(), dqkv.data(), all_indices(qkv.size()));
    }
    {   // LM head cross-entropy, input logits (padded columns must get zero gradient)
        const int N = 4, V = 7, Vp = 10;
        auto z = random_vector(rng, N * Vp);
        std::vector<int> tgt = {0, 6, 3, 3};
        std::vector<double> p(N * Vp), dz(N * Vp);
        Fn f = [&] { return ref::cross_entropy_forward(p.data(), z.data(), tgt.data(), N, V, Vp); };
        f();
        ref::cross_entropy_backward(dz.data(), p.data(), tgt.data(), N, Vp, 1.0);
        fd_check("cross_entropy", "cross-entropy dlogits", f, z.data(), dz.data(), all_indices(z.size()));
        bool pad_zero = true;
        for (int t = 0; t < N; t++)
            for (int v = V; v < Vp; v++) pad_zero &= dz[t * Vp + v] == 0;
        CHECK_MSG(pad_zero, "padded logits must never receive gradient");
    }
}

// One FFN of either kind on its own, every parameter element and every input element.
void check_ffn(lmoe::Rng& rng, lmoe::FfnKind kind) {
    lmoe::Config c;
    c.ffn = kind;
    c.d = 12; c.E = 6; c.fe = 10; c.k = 3; c.L = 1;
    if (kind == lmoe::FfnKind::LatentMoE) { c.H = 3; c.dh = 5; }
    else { c.H = 1; c.dh = c.d; }
    const int N = 7;
    lmoe::ParamLayout layout = lmoe::build_param_layout(c);
    std::vector<double> params(layout.total), grads(layout.total, 0);
    for (double& p : params) p = 0.5 * rng.normal();
    auto w = lmoe::bind_tensors(layout, params.data(), 1, kind);
    auto g = lmoe::bind_tensors(layout, grads.data(), 1, kind);
    std::vector<float> bias(c.H * c.E);
    for (float& b : bias) b = float(0.3 * rng.normal());
    auto x = random_vector(rng, N * c.d), r = random_vector(rng, N * c.d);
    std::vector<double> out(N * c.d), dx(N * c.d, 0);
    ref::FfnCache<double> cache;
    ref::ffn_forward(out.data(), x.data(), N, c, w.layers[0], bias.data(), cache, false);
    Fn f = [&] {
        ref::ffn_forward(out.data(), x.data(), N, c, w.layers[0], bias.data(), cache, true);
        return dot(out, r);
    };
    ref::ffn_backward(dx.data(), g.layers[0], r.data(), x.data(), N, c, w.layers[0], bias.data(), cache);
    std::string kname = kind == lmoe::FfnKind::LatentMoE ? "latentmoe" : "moe";
    std::printf("%s FFN layer\n", kname.c_str());
    for (const lmoe::TensorSpec& t : layout.tensors) {
        bool ffn_tensor = t.name.find("router") != std::string::npos || t.name.find("expert") != std::string::npos ||
                          t.name.find("ffn_") != std::string::npos;
        if (!ffn_tensor) continue;
        fd_check(kname + " ffn", kname + " " + t.name, f, params.data() + t.offset, grads.data() + t.offset,
                 all_indices(t.numel));
    }
    fd_check(kname + " ffn", kname + " dx", f, x.data(), dx.data(), all_indices(x.size()));
}

// LocMoE's FFN layer (SPEC §2.6) with copies over capacity, routing frozen: f = r·out + s·(L_aux + L_loc)
// with the losses' gradient scaled by s (as a micro-step of gradient accumulation scales it); then
// through the two losses alone (r = 0), where only ε and x have a gradient. Larger α and μ than the
// defaults, so the losses' share of each gradient is far above the check's tolerance.
void check_locmoe_ffn(lmoe::Rng& rng) {
    lmoe::Config c;
    c.ffn = lmoe::FfnKind::MoE;
    c.router = "locmoe";
    c.d = 12; c.E = 6; c.fe = 10; c.k = 3; c.L = 1; c.H = 1; c.dh = c.d;
    c.capacity_factor = 0.5f;  // C = ⌈0.5 · 7·3 / 6⌉ = 2 rows per expert
    c.aux_loss_weight = 0.3f;
    c.loc_loss_weight = 0.5f;
    const int N = 7;
    const double scale = 0.5;
    lmoe::ParamLayout layout = lmoe::build_param_layout(c);
    std::vector<double> params(layout.total), grads(layout.total, 0);
    for (double& p : params) p = 0.5 * rng.normal();
    auto w = lmoe::bind_tensors(layout, params.data(), 1, c.ffn);
    auto g = lmoe::bind_tensors(layout, grads.data(), 1, c.ffn);
    const std::vector<float> no_bias(c.E, 0.f);
    auto x = random_vector(rng, N * c.d), r = random_vector(rng, N * c.d);
    std::vector<double> out(N * c.d), dx(N * c.d, 0);
    ref::FfnCache<double> cache;
    ref::ffn_forward(out.data(), x.data(), N, c, w.layers[0], no_bias.data(), cache, false);
    CHECK_MSG(cache.dropped > 0, "the capacity must drop copies for the check to cover the drop");
    for (int t = 0; t < N; t++) {  // a token with every copy dropped: FFN output zero
        bool any_kept = false;
        for (int j = 0; j < c.k; j++) any_kept |= cache.kept[t * c.k + j] != 0;
        if (!any_kept)
            for (int i = 0; i < c.d; i++) CHECK_MSG(out[t * c.d + i] == 0, "a token with every copy dropped");
    }
    std::printf("locmoe FFN layer (%lld of %d copies dropped)\n", (long long)cache.dropped, N * c.k);
    for (double r_scale : {1.0, 0.0}) {
        std::vector<double> dout(r.size());
        for (size_t i = 0; i < r.size(); i++) dout[i] = r_scale * r[i];
        Fn f = [&] {
            ref::ffn_forward(out.data(), x.data(), N, c, w.layers[0], no_bias.data(), cache, true);
            return dot(out, dout) + scale * (cache.aux_loss + cache.loc_loss);
        };
        f();
        std::fill(grads.begin(), grads.end(), 0.0);
        std::fill(dx.begin(), dx.end(), 0.0);
        ref::ffn_backward(dx.data(), g.layers[0], dout.data(), x.data(), N, c, w.layers[0], no_bias.data(), cache, scale);
        const std::string what = r_scale ? "locmoe" : "locmoe losses only,";
        for (const lmoe::TensorSpec& t : layout.tensors) {
            const bool through_losses = t.name.find("router_eps") != std::string::npos;
            if (!through_losses && (r_scale == 0 || t.name.find("expert") == std::string::npos)) continue;
            fd_check("locmoe ffn", what + " " + t.name, f, params.data() + t.offset, grads.data() + t.offset,
                     all_indices(t.numel));
        }
        fd_check("locmoe ffn", what + " dx", f, x.data(), dx.data(), all_indices(x.size()));
    }
}

// Which group a model tensor's error is reported under.
std::string group_of(const std::string& name) {
    for (const char* key : {"router_eps", "router", "expert_in", "expert_out", "ffn_in", "ffn_out", "qkv", "attn_out", "wte",
                            "lm_head"})
        if (name.find(key) != std::string::npos) return key;
    return "norm gains";
}

// Whole model, tiny preset: up to `per_tensor` random elements of every tensor, plus the element with
// the largest analytic gradient (so each check sees a gradient that matters).
void check_model(lmoe::Rng& rng, lmoe::FfnKind kind, int per_tensor, const std::string& router = "topk") {
    lmoe::Config c;
    c.ffn = kind;
    lmoe::apply_preset(c, "tiny");
    c.router = router;
    if (c.locmoe()) c.capacity_factor = 1;  // with these weights some copies are over capacity
    const int B = 2, N = B * c.T;
    ref::Model<double> model(c);
    // Weights far larger than the N(0, 0.02²) initialisation: with tiny weights some gradients (the
    // LatentMoE router's) are ~1e-6, and the loss's rounding noise over 2h would swamp them.
    for (const lmoe::TensorSpec& t : model.layout.tensors)
        for (int64_t i = 0; i < t.numel; i++)
            model.params[t.offset + i] = t.init_std == 0 ? 1 + 0.1 * rng.normal() : 0.3 * rng.normal();
    for (float& b : model.routing_bias) b = float(0.1 * rng.normal());
    std::vector<int> tok(N), tgt(N);
    for (int i = 0; i < N; i++) { tok[i] = rng.below(c.V); tgt[i] = rng.below(c.V); }
    model.forward(tok.data(), tgt.data(), B);
    model.backward();
    Fn f = [&] { return model.forward(tok.data(), tgt.data(), B, true); };
    std::string kname = kind == lmoe::FfnKind::LatentMoE ? "model(latentmoe)" : c.locmoe() ? "model(locmoe)" : "model(moe)";
    std::printf("%s, tiny preset, B=%d: %lld parameters\n", kname.c_str(), B, (long long)model.layout.total);
    for (const lmoe::TensorSpec& t : model.layout.tensors) {
        std::vector<int64_t> idx;
        int64_t largest = 0;
        for (int64_t i = 0; i < t.numel; i++)
            if (std::abs(model.grads[t.offset + i]) > std::abs(model.grads[t.offset + largest])) largest = i;
        idx.push_back(largest);
        for (int s = 0; s < per_tensor && (int64_t)idx.size() < t.numel; s++) idx.push_back(rng.below((int)t.numel));
        fd_check(kname + " " + group_of(t.name), kname + " " + t.name, f, model.params.data() + t.offset,
                 model.grads.data() + t.offset, idx);
    }
}

int main() {
    lmoe::Rng rng(20260522);
    check_dense_layers(rng);
    check_ffn(rng, lmoe::FfnKind::LatentMoE);
    check_ffn(rng, lmoe::FfnKind::MoE);
    check_model(rng, lmoe::FfnKind::LatentMoE, 24);
    check_model(rng, lmoe::FfnKind::MoE, 24);
    check_locmoe_ffn(rng);
    check_model(rng, lmoe::FfnKind::MoE, 24, "locmoe");
    std::printf("\nworst relative error per tensor group (tolerance %.0e):\n", kTolerance);
    for (const auto& [group, err] : worst_by_group) std::printf("  %-36s %.2e\n", group.c_str(), err);
    return check::summary();
}
