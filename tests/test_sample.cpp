// Text generation (SPEC §2.7) on the CPU: the sampler's distribution (temperature, top-k, greedy),
// seeded generation is reproducible, greedy generation takes the argmax of the CPU reference's logits
// computed independently (over exactly the context, no padding, the sliding window past T, routing
// biases set), and the printed form of tokens. Generation from a checkpoint against the end of the run
// that wrote it is test_cli's.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/check.h"
#include "train/cpu_model.h"
#include "train/sample.h"

using namespace lmoe;

// The share of `draws` evenly spaced uniforms in (0, 1) that sample_token maps to each token.
static std::vector<double> frequencies(const std::vector<float>& logits, float temperature, int top_k, int draws) {
    std::vector<double> f(logits.size(), 0.0);
    for (int i = 0; i < draws; i++) f[sample_token(logits, temperature, top_k, (i + 0.5) / draws)] += 1.0 / draws;
    return f;
}

static void test_sample_token() {
    const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, -3.0f};
    // greedy: temperature 0 or top-k 1, whatever the draw; the tie between 1 and 3 goes to 1
    for (double u : {0.001, 0.5, 0.999}) {
        CHECK(sample_token(logits, 0.f, 0, u) == 1);
        CHECK(sample_token(logits, 1.f, 1, u) == 1);
        CHECK(sample_token(logits, 0.f, 3, u) == 1);
    }
    // the softmax of logits / t over the top k: exact up to the spacing of the draws
    for (float t : {1.0f, 0.5f, 2.0f}) {
        for (int k : {0, 3, 6}) {
            const int kept = k == 0 ? 6 : k;
            const std::vector<int> top = {1, 3, 4, 0, 2, 5};  // by logit, ties to the lower id
            double total = 0;
            for (int i = 0; i < kept; i++) total += std::exp(logits[top[i]] / t);
            const std::vector<double> f = frequencies(logits, t, k, 100000);
            for (int i = 0; i < 6; i++) {
                const double want = i < kept ? std::exp(logits[top[i]] / t) / total : 0.0;
                CHECK_MSG(std::fabs(f[top[i]] - want) < 1e-4, "t " + std::to_string(t) + " k " + std::to_string(k) +
                                                                  " token " + std::to_string(top[i]) + ": " +
                                                                  std::to_string(f[top[i]]) + " vs " + std::to_string(want));
            }
        }
    }
    // huge logits do not overflow
    CHECK(sample_token({1e30f, 1e30f, -1e30f}, 1.f, 0, 0.75) == 1);
    // a diverged model: refused with a message, never an arbitrary token
    for (float bad : {NAN, INFINITY}) {
        bool refused = false;
        try {
            sample_token({0.f, bad, 1.f}, 1.f, 0, 0.5);
        } catch (const std::runtime_error&) {
            refused = true;
        }
        CHECK_MSG(refused, "non-finite logits are refused");
    }
}

static void test_format_tokens() {
    Config c;
    CHECK(format_tokens({'H', 'i', '\n', '\\', 0, 200, '~'}, c) == "Hi\n\\\\\\x00\\xc8~");
    c.V = 50257;
    CHECK(format_tokens({50256, 3, 0}, c) == "50256 3 0");
    c.V = 256;
    c.prompt = "Ab";
    CHECK((prompt_tokens(c) == std::vector<int32_t>{'A', 'b'}));
    c.V = 300;
    c.prompt = " 7 299  12 ";
    CHECK((prompt_tokens(c) == std::vector<int32_t>{7, 299, 12}));
}

// The next token greedy generation must pick after `context`: the argmax of the last position's
// logits from a reference model of exactly the context's length (at most T), with `state`'s weights.
static int independent_argmax(const Config& c, const TrainingState& state, const std::vector<int32_t>& context) {
    Config shorter = c;
    const int n = std::min<int>((int)context.size(), c.T);
    shorter.T = n;
    ref::Model<float> m(shorter);
    m.params = state.params;
    m.routing_bias = state.routing_bias;
    const std::vector<int32_t> tokens(context.end() - n, context.end()), targets(n, 0);
    m.forward(tokens.data(), targets.data(), 1);
    const float* last = m.logits.data() + (size_t)(n - 1) * c.Vp();
    return sample_token(std::vector<float>(last, last + c.V), 0.f, 0, 0.5);
}

static void test_generate(FfnKind ffn) {
    Config c;
    c.ffn = ffn;
    apply_preset(c, "tiny");
    c.sample = c.T + 8;  // past the context: the window slides
    c.prompt = "In the";
    CpuModel model(c);
    // routing biases of a trained model: generation must route with them
    TrainingState s = model.state(0);
    Rng rng(7);
    for (float& b : s.routing_bias) b = (float)rng.uniform(-0.5, 0.5);
    model.load_state(s);

    const std::vector<int32_t> a = generate(model, c), b = generate(model, c);
    CHECK_MSG(a == b, "the same seed gives the same tokens");
    CHECK((int)a.size() == c.sample);
    Config other = c;
    other.sample_seed = c.sample_seed + 1;
    CHECK_MSG(generate(model, other) != a, "another seed gives other tokens");

    Config greedy = c;
    greedy.temperature = 0;
    const std::vector<int32_t> g = generate(model, greedy);
    std::vector<int32_t> context = prompt_tokens(c);
    int agree = 0;
    for (int32_t token : g) {
        agree += token == independent_argmax(c, s, context);
        context.push_back(token);
    }
    CHECK_MSG(agree == (int)g.size(), std::string(ffn_name(ffn)) + ": " + std::to_string(agree) + " of " +
                                          std::to_string(g.size()) + " greedy tokens are the reference's argmax");
    Config top1 = c;
    top1.top_k = 1;
    CHECK_MSG(generate(model, top1) == g, "top-k 1 is greedy");
}

int main() {
    test_sample_token();
    test_format_tokens();
    test_generate(FfnKind::LatentMoE);
    test_generate(FfnKind::MoE);
    return check::summary();
}
