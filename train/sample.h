// Text generation (SPEC §2.7), written once for the GPU model and the CPU reference like the training
// loop (train/loop.h): from the --prompt, each new token is drawn from the softmax of the model's
// logits at the last position, divided by --temperature, among the --top-k most likely tokens, with
// the trained model's routing (its biases included). Host-only: the model computes the logits.
//
// A Model provides, beyond the training loop's interface:
//
//   std::vector<float> logits_at(const std::vector<int32_t>& row, int pos);  // row: T tokens, one
//                         // sequence; its V logits at `pos`. Under mpirun every rank passes the same row.
//   int from_lead(int value);                     // rank 0's value on every rank
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/config.h"
#include "util/rng.h"

namespace lmoe {

// The next token from `logits` (V of them) and a uniform draw u in (0, 1). Temperature 0 or top-k 1
// is greedy: the most likely token, ties going to the lower id. Otherwise the top_k largest logits
// (0: all; ties to the lower id) are kept and token i is drawn with probability ∝ exp(logit_i / t).
inline int sample_token(const std::vector<float>& logits, float temperature, int top_k, double u) {
    const int V = (int)logits.size();
    for (float x : logits)
        if (!std::isfinite(x)) throw std::runtime_error("sampling: the model's logits are not finite (diverged weights)");
    std::vector<int> order(V);
    std::iota(order.begin(), order.end(), 0);
    auto more_likely = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    if (temperature == 0 || top_k == 1) return *std::min_element(order.begin(), order.end(), more_likely);
    const int kept = top_k == 0 ? V : top_k;
    std::partial_sort(order.begin(), order.begin() + kept, order.end(), more_likely);
    std::vector<double> p(kept);
    double total = 0;
    for (int i = 0; i < kept; i++)  // shifted by the largest logit, so exp cannot overflow
        total += p[i] = std::exp(((double)logits[order[i]] - logits[order[0]]) / temperature);
    double below = u * total;
    for (int i = 0; i < kept; i++)
        if ((below -= p[i]) < 0) return order[i];
    return order[kept - 1];  // u · total rounded past the last share
}

// Fills `row` (the model's T tokens) with the last T tokens of `context`, padded with token 0, which
// the causal attention keeps from reaching the positions before it; returns the position of the last
// context token, whose logits predict the next.
inline int window_row(const std::vector<int32_t>& context, std::vector<int32_t>& row) {
    const int n = (int)std::min(context.size(), row.size());
    std::fill(std::copy(context.end() - n, context.end(), row.begin()), row.end(), 0);
    return n - 1;
}

// Generates c.sample tokens after the prompt; returns them (the prompt not included). Every call
// starts from --sample-seed, so samples during a run differ only as the model does. The context is
// the last T tokens; each token costs a whole forward pass over it (no key-value cache: generation is
// for looking at the model, not a serving path).
template <class Model>
std::vector<int32_t> generate(Model& model, const Config& c) {
    std::vector<int32_t> context = prompt_tokens(c), generated;
    Rng rng(c.sample_seed);
    std::vector<int32_t> row(c.T);
    for (int i = 0; i < c.sample; i++) {
        const std::vector<float> logits = model.logits_at(row, window_row(context, row));
        const int token = model.from_lead(sample_token(logits, c.temperature, c.top_k, rng.uniform()));
        context.push_back(token);
        generated.push_back(token);
    }
    return generated;
}

// Tokens as the user reads them: for the byte-level vocabulary the bytes as text, newlines kept, a
// backslash doubled and every other byte outside printable ASCII as \xNN; else the ids, space-separated.
inline std::string format_tokens(const std::vector<int32_t>& tokens, const Config& c) {
    std::string text;
    for (int32_t t : tokens) {
        if (!byte_level(c)) {
            text += (text.empty() ? "" : " ") + std::to_string(t);
        } else if (t == '\\') {
            text += "\\\\";
        } else if (t == '\n' || (t >= 0x20 && t < 0x7f)) {
            text += (char)t;
        } else {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\x%02x", (unsigned)t);
            text += escaped;
        }
    }
    return text;
}

// Generates and, on rank 0, prints the prompt and its continuation between two marker lines.
template <class Model>
void print_sample(Model& model, const Config& c, int step, bool lead) {
    const std::vector<int32_t> generated = generate(model, c);
    if (!lead) return;
    const std::string top_k = c.top_k == 0 ? "all" : std::to_string(c.top_k);
    std::printf("--- sample at step %d (%d tokens, temperature %g, top-k %s, seed %llu) ---\n%s%s%s\n---\n", step,
                c.sample, c.temperature, top_k.c_str(), (unsigned long long)c.sample_seed,
                format_tokens(prompt_tokens(c), c).c_str(), byte_level(c) ? "" : " | ",
                format_tokens(generated, c).c_str());
    std::fflush(stdout);
}

}  // namespace lmoe
