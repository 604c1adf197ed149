// Configuration: presets (SPEC §6), command-line flags and the validation of every constraint.
// Host-only. One flag table drives parsing and --help, so the help text cannot drift from the code.
#pragma once
#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace lmoe {

// Which FFN the binary trains; everything else in the model is shared.
enum class FfnKind { LatentMoE, MoE };

// Expert Parallel's device exchange keeps per-rank tables in shared memory (parallel/expert_dispatch.cuh).
constexpr int kMaxExpertRanks = 64;

// A bad flag or configuration: the trainers print it and exit with status 2.
struct ConfigError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Config {
    FfnKind ffn = FfnKind::LatentMoE;
    std::string preset = "tiny";
    // model (SPEC §2)
    int T = 32;        // sequence length
    int d = 64;        // width
    int L = 2;         // layers
    int n_head = 4;    // attention heads; d_attn = d / n_head
    int V = 256;       // vocabulary; the LM head pads it to Vp, a multiple of 128
    // FFN (SPEC §2.1 / §2.2); the MoE baseline uses E, f (= fe) and k only
    int H = 4;         // latent heads
    int dh = 16;       // latent head size
    int E = 8;         // experts (per latent head for LatentMoE)
    int fe = 32;       // expert hidden size (f for the MoE)
    int k = 2;         // active experts per (sub-)token
    float latent_init_scale = 1;  // multiplies the initial std of W_mh and W_mg (SPEC §2's 0.02, 0.02/sqrt(2L))
    int expert_shards = 1;  // LatentMoE on R ranks: Q ranks split each head's experts, P = R / Q head groups
    // LocMoE routing of the MoE baseline (SPEC §2.6); the other router is §2.2's top-k
    std::string router = "topk";  // topk | locmoe
    int node_size = 0;            // ranks per node for L_loc and the byte split; 0: the ranks on one host
    float capacity_factor = 0;    // c_f; 0: no capacity (dropless)
    float capacity_delta = 0.03f; // δ, the smallest cosine between a token and its expert's gating weight
    float aux_loss_weight = 0.01f;  // α of L_aux
    float loc_loss_weight = 0.01f;  // μ of L_loc
    // Expert Parallel's exchange of the MoE baseline (parallel/expert_dispatch.cuh)
    std::string ep_exchange = "auto";  // auto | device | host
    // training (SPEC §2.3, §2.4)
    int B = 16;               // micro-batch sequences per rank
    int grad_accum = 1;       // micro-steps per optimizer step
    int steps = 300;
    float lr = 3e-3f;
    int warmup = 30;
    float lr_floor = 0.1f;    // cosine decay ends at lr * lr_floor
    float weight_decay = 0.1f;
    float grad_clip = 1.0f;   // global gradient-norm clip; 0 disables
    float bias_rate = 1e-2f;  // gamma of the aux-free bias update; 0 disables
    uint64_t seed = 1337;
    int eval_every = 50;      // validation loss every this many steps; 0: only at the end
    int eval_batches = 8;
    int log_every = 10;
    std::string train_data = "data/kjv_train.bin";
    std::string val_data = "data/kjv_val.bin";
    std::string device = "auto";  // auto | cpu | gpu
    std::string checkpoint;       // where to save; empty: out/<model>.ckpt; "none": nowhere (keeps_checkpoint())
    int checkpoint_every = 0;     // 0: only at the end and when interrupted
    std::string resume;           // checkpoint to resume from; empty: start fresh
    std::string log_file;         // a CSV row per step (train/step_log.h); empty: none
    bool bench_layer = false;     // time one FFN layer instead of training
    // text generation (SPEC §2.7)
    int sample = 0;               // tokens to generate at the end of the run (0: none)
    int sample_every = 0;         // also every this many steps (0: only at the end)
    std::string prompt = "The";   // bytes for the byte-level vocabulary (V = 256), else token ids
    float temperature = 1.0f;     // 0: greedy (the most likely token)
    int top_k = 0;                // sample among the k most likely tokens (0: all of them)
    uint64_t sample_seed = 1337;

    int d_attn() const { return d / n_head; }
    bool locmoe() const { return ffn == FfnKind::MoE && router == "locmoe"; }
    // --checkpoint none: a run nobody resumes (a study's many short runs) writes no checkpoint at all
    bool keeps_checkpoint() const { return checkpoint != "none"; }
    int Vp() const { return (V + 127) / 128 * 128; }
};

inline const char* ffn_name(FfnKind ffn) { return ffn == FfnKind::LatentMoE ? "Multi-Head LatentMoE" : "MoE"; }

// SPEC §6. Each preset fixes the model; training fields keep their defaults unless flags set them.
inline void apply_preset(Config& c, const std::string& name) {
    struct Preset { const char* name; int T, d, L, n_head, H, dh, hp_E, hp_fe, hp_k, ep_E, ep_f, ep_k, B; float lr; };
    static const Preset presets[] = {  // lr: a peak learning rate that trains the preset well
        {"tiny", 32, 64, 2, 4, 4, 16, 8, 32, 2, 8, 32, 2, 16, 3e-3f},
        {"small", 256, 512, 6, 8, 8, 64, 32, 256, 4, 32, 256, 4, 16, 1e-3f},
        {"p1", 1024, 1024, 12, 8, 8, 128, 64, 512, 8, 64, 512, 8, 8, 6e-4f},
        {"p2", 1024, 1024, 12, 8, 8, 128, 128, 256, 16, 128, 256, 16, 8, 6e-4f},
    };
    for (const Preset& p : presets) {
        if (name != p.name) continue;
        bool hp = c.ffn == FfnKind::LatentMoE;
        c.preset = name;
        c.T = p.T; c.d = p.d; c.L = p.L; c.n_head = p.n_head; c.B = p.B; c.lr = p.lr;
        c.H = hp ? p.H : 1;
        c.dh = hp ? p.dh : p.d;
        c.E = hp ? p.hp_E : p.ep_E;
        c.fe = hp ? p.hp_fe : p.ep_f;
        c.k = hp ? p.hp_k : p.ep_k;
        return;
    }
    throw ConfigError("unknown preset '" + name + "' (choose tiny, small, p1 or p2)");
}

// ---------------------------------------------------------------------------------------------
// Size bounds (SPEC §8.5). Every size flag has an upper bound, and every product of sizes that indexes a
// buffer is checked in 64-bit before anything is allocated. The kernels and the CPU reference index
// one buffer with int in places (N = B·T, rows·width, copies = H·N·k in RoutingPlan's int offsets,
// ExpertExchange's int capacity R·N·k, B·n_head·T² attention scores), so the bound on each product is
// 2^31 − 1 elements of one layer's buffer; buffers that hold every layer are indexed per layer with
// size_t. The bound on each single flag is the largest value that can ever pass the products (or,
// where none binds, a value far beyond any model this trainer is for), so a huge value is refused by
// name before any product is formed. The memory a configuration needs is checked separately
// (train/memory_estimate.h), against the machine.

constexpr int64_t kMaxIndex = 2147483647;  // 2^31 − 1: the largest element count an int can index

// a·b, saturating at INT64_MAX: products of several bounded flags cannot wrap.
inline int64_t mul_sat(int64_t a, int64_t b) {
    int64_t r;
    return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}
inline int64_t mul_sat(std::initializer_list<int64_t> factors) {
    int64_t r = 1;
    for (int64_t f : factors) r = mul_sat(r, f);
    return r;
}

struct FlagBound {
    const char* flag;  // as the user types it
    int value, max;
    const char* why;
};

// The upper bound of every size flag (their lower bounds are checked in validate with the other
// constraints). Why each bound is what it is:
inline std::vector<FlagBound> size_bounds(const Config& c) {
    return {
        // one head's T×T attention scores (ref attention, the GPU scratch) must be int-indexable:
        // 46340² < 2^31 ≤ 46341²
        {"--seq-len", c.T, 46340, "one head's T x T attention scores must stay below 2^31 elements"},
        // the qkv weight is 3d x d: 3·16384² = 805M elements (GPT-3's d is 12288)
        {"--d-model", c.d, 16384, "the 3d x d attention weight must stay well below 2^31 elements"},
        // per-layer tensors, views and buffers are built layer by layer; 1024 is ten times the
        // deepest published dense model, and keeps the parameter table (12 tensors a layer) small
        {"--layers", c.L, 1024, "deeper than any model this trainer is for"},
        // d % n_head == 0 and an even head size already give n_head <= d/2 <= 8192
        {"--attn-heads", c.n_head, 8192, "the attention head size d/attn-heads must be at least 2"},
        // routing groups (L, H, E) and the per-head loops; the GPU router supports H·E <= 4096
        {"--latent-heads", c.H, 1024, "more latent heads than any configuration of the method"},
        {"--head-dim", c.dh, 16384, "a latent head is at most as wide as the widest model (--d-model)"},
        // counts (L, H, E) and the router's E columns; the GPU router supports E <= 256
        {"--experts", c.E, 4096, "more experts per routing group than the routers are written for"},
        // the MoE's f is ~4d: 4·16384
        {"--expert-dim", c.fe, 65536, "four times the widest model (--d-model)"},
        {"--topk", c.k, 4096, "at most the largest number of experts"},
        // N = B·T is an int everywhere; with T >= 1 and d >= 2, N·3d < 2^31 gives B < 2^30 anyway
        {"--batch", c.B, 1 << 20, "a micro-batch of over a million sequences cannot fit the int token index"},
        {"--grad-accum", c.grad_accum, 1 << 20, "tokens per step, B·T·grad-accum·R, are counted in int"},
        // step counters are int; step·grad_accum (the data position on --resume) is 64-bit
        {"--steps", c.steps, 1000000000, "a billion optimizer steps"},
        {"--warmup", c.warmup, 1000000000, "a billion steps, as --steps"},
        {"--eval-batches", c.eval_batches, 1 << 20, "validation micro-batches per evaluation"},
        // each generated token is a whole forward pass
        {"--sample", c.sample, 1000000, "a million generated tokens, each a forward pass"},
    };
}

// The products of sizes that index one buffer, each checked against 2^31 − 1 in 64-bit. `world`
// ranks: Expert Parallel keeps R·N·k rows at each expert owner.
struct SizeProduct {
    const char* what;     // the product, in the flags' letters
    int64_t value;        // saturated at INT64_MAX
    const char* flags;    // what to lower
};

inline std::vector<SizeProduct> size_products(const Config& c, int world) {
    const int64_t B = c.B, T = c.T, d = c.d, N = B * T, R = world < 1 ? 1 : world;
    std::vector<SizeProduct> p = {
        {"tokens per optimizer step B·T·grad-accum·R", mul_sat({B, T, c.grad_accum, R}),
         "--batch, --seq-len or --grad-accum"},
        {"one layer's qkv activations B·T·3d", mul_sat({N, 3, d}), "--batch, --seq-len or --d-model"},
        {"the logits B·T·Vp", mul_sat({N, c.Vp()}), "--batch, --seq-len or --vocab"},
        {"one layer's attention scores B·attn-heads·T·T", mul_sat({B, c.n_head, T, T}),
         "--batch, --seq-len or --attn-heads"},
        {"the embedding and LM head Vp·d", mul_sat({c.Vp(), d}), "--vocab or --d-model"},
    };
    if (c.ffn == FfnKind::LatentMoE) {
        // copies H·N·k (int offsets in the routing plan), each dh wide (the expert outputs per layer);
        // k >= 2 makes this bound N·H·dh (the sub-tokens) too
        p.push_back({"one layer's routed copies H·B·T·k·dh", mul_sat({c.H, N, c.k, c.dh}),
                     "--batch, --seq-len, --latent-heads, --topk or --head-dim"});
        p.push_back({"one layer's expert weights H·E·fe·dh", mul_sat({c.H, c.E, c.fe, c.dh}),
                     "--latent-heads, --experts, --expert-dim or --head-dim"});
    } else {
        // the rows an expert owner may receive: R·N·k (dropless), each d wide in and f wide hidden
        p.push_back({"one layer's expert rows R·B·T·k·max(d, f)", mul_sat({R, N, c.k, std::max(d, (int64_t)c.fe)}),
                     "--batch, --seq-len, --topk, --d-model or --expert-dim"});
        p.push_back({"one layer's expert weights E·f·d", mul_sat({c.E, c.fe, d}),
                     "--experts, --expert-dim or --d-model"});
    }
    return p;
}

// A byte-level vocabulary (data_prep's shards): token i is byte i, so text is printed as text.
inline bool byte_level(const Config& c) { return c.V == 256; }

// The --prompt as tokens: its bytes for the byte-level vocabulary, else token ids separated by
// spaces (there is no tokenizer here for other vocabularies). At most T tokens: the model's context.
inline std::vector<int32_t> prompt_tokens(const Config& c) {
    std::vector<int32_t> tokens;
    if (byte_level(c)) {
        for (unsigned char ch : c.prompt) tokens.push_back(ch);
    } else {
        const char* p = c.prompt.c_str();
        for (char* end = nullptr;; p = end) {
            while (*p == ' ') p++;
            if (!*p) break;
            errno = 0;
            const long id = std::strtol(p, &end, 10);
            if (end == p || (*end && *end != ' ') || errno || id < 0 || id >= c.V)
                throw ConfigError("--prompt '" + c.prompt + "': with --vocab " + std::to_string(c.V) +
                                  " (not byte-level) the prompt is token ids in [0, V) separated by spaces");
            tokens.push_back((int32_t)id);
        }
    }
    if (tokens.empty()) throw ConfigError("--prompt is empty: generation needs at least one token to start from");
    if ((int)tokens.size() > c.T)
        throw ConfigError("--prompt has " + std::to_string(tokens.size()) + " tokens, more than the context --seq-len " +
                          std::to_string(c.T));
    return tokens;
}

// Every constraint of SPEC §2–§3, each with a message that names it. `world` is the number of ranks.
inline void validate(const Config& c, int world) {
    auto require = [](bool ok, const std::string& what) {
        if (!ok) throw ConfigError(what);
    };
    require(c.T >= 1 && c.d >= 1 && c.L >= 1 && c.n_head >= 1 && c.B >= 1,
            "T, d, L, n_head and B must all be at least 1");
    require(c.H >= 1 && c.dh >= 1 && c.E >= 1 && c.fe >= 1, "H, dh, E and the expert size must be at least 1");
    require(c.grad_accum >= 1 && c.steps >= 0, "steps must be at least 0 and grad_accum at least 1");
    require(c.steps > 0 || c.sample > 0, "--steps 0 trains nothing and only generates text: give --sample N "
                                         "(and --resume CHECKPOINT for a trained model)");
    for (const FlagBound& b : size_bounds(c))
        require(b.value <= b.max, b.flag + std::string(" ") + std::to_string(b.value) + " is above its bound " +
                                      std::to_string(b.max) + " (" + b.why + ")");
    require(c.d % c.n_head == 0, "d (" + std::to_string(c.d) + ") must be divisible by n_head (" +
                                     std::to_string(c.n_head) + ")");
    require(c.d_attn() % 2 == 0, "attention head size d/n_head = " + std::to_string(c.d_attn()) +
                                     " must be even (rotary embedding rotates pairs)");
    require(c.V >= 2 && c.V <= 65536, "vocabulary size V = " + std::to_string(c.V) +
                                          " must be in [2, 65536] (shards store uint16 tokens)");
    if (c.locmoe())  // the gate is the full softmax's p, so the paper's top-1 is meaningful
        require(c.k >= 1, "k = " + std::to_string(c.k) + ": at least 1 active expert is needed (k >= 1)");
    else
        require(c.k >= 2, "k = " + std::to_string(c.k) + ": at least 2 active experts are needed (k >= 2)");
    require(c.k <= c.E, "k = " + std::to_string(c.k) + " exceeds the number of experts E = " + std::to_string(c.E));
    if (c.ffn == FfnKind::MoE)
        require(c.H == 1 && c.dh == c.d, "the MoE baseline has no latent heads (H = 1, dh = d)");
    require(world >= 1, "the number of ranks must be at least 1");
    if (c.ffn == FfnKind::LatentMoE) {
        // SPEC §3: R = P·Q ranks, P head groups of Q ranks; Q = 1 is Head Parallel alone
        const int Q = c.expert_shards;
        require(Q >= 1, "--expert-shards must be at least 1 (1: Head Parallel alone), not " + std::to_string(Q));
        require(world % Q == 0, "--expert-shards " + std::to_string(Q) + " does not divide the R = " +
                                    std::to_string(world) + " ranks (R = P·Q: P head groups of Q ranks)");
        require(c.E % Q == 0, "Head Parallel × Expert Parallel needs E % Q == 0: E = " + std::to_string(c.E) +
                                  " experts per head cannot be split over Q = " + std::to_string(Q) + " expert shards");
        const int P = world / Q;
        if (Q == 1)
            require(c.H % world == 0, "Head Parallel needs H % R == 0: H = " + std::to_string(c.H) +
                                          " heads cannot be split over R = " + std::to_string(world) + " ranks");
        else
            require(c.H % P == 0, "Head Parallel × Expert Parallel needs H % P == 0: H = " + std::to_string(c.H) +
                                      " heads cannot be split over P = R / Q = " + std::to_string(P) + " head groups");
    } else {
        require(c.E % world == 0, "Expert Parallel needs E % R == 0: E = " + std::to_string(c.E) +
                                      " experts cannot be split over R = " + std::to_string(world) + " ranks");
        require(world <= kMaxExpertRanks, "Expert Parallel runs on at most " + std::to_string(kMaxExpertRanks) +
                                              " ranks, not " + std::to_string(world));
    }
    for (const SizeProduct& p : size_products(c, world))
        require(p.value <= kMaxIndex,
                std::string(p.what) + " = " +
                    (p.value == INT64_MAX ? std::string("more than 2^63") : std::to_string(p.value)) +
                    " is above the bound 2^31 - 1 = " + std::to_string(kMaxIndex) +
                    " (one buffer is indexed with int); lower " + p.flags);
    require(std::isfinite(c.lr) && c.lr >= 0, "learning rate must be a finite number >= 0");
    require(std::isfinite(c.latent_init_scale) && c.latent_init_scale > 0,
            "--latent-init-scale must be a finite number > 0");
    require(c.warmup >= 0, "warmup must be >= 0");
    require(c.lr_floor >= 0 && c.lr_floor <= 1, "lr_floor must be in [0, 1]");
    require(c.weight_decay >= 0 && c.grad_clip >= 0 && c.bias_rate >= 0,
            "weight_decay, grad_clip and bias_rate must be >= 0");
    require(c.eval_every >= 0 && c.eval_batches >= 1 && c.log_every >= 1 && c.checkpoint_every >= 0,
            "eval_every and checkpoint_every must be >= 0, eval_batches and log_every >= 1");
    require(c.keeps_checkpoint() || c.checkpoint_every == 0,
            "--checkpoint-every " + std::to_string(c.checkpoint_every) + " asks for checkpoints, --checkpoint none for none");
    require(c.device == "auto" || c.device == "cpu" || c.device == "gpu",
            "device must be auto, cpu or gpu, not '" + c.device + "'");
    require(c.router == "topk" || c.router == "locmoe", "router must be topk or locmoe, not '" + c.router + "'");
    require(c.ep_exchange == "auto" || c.ep_exchange == "device" || c.ep_exchange == "host",
            "ep-exchange must be auto, device or host, not '" + c.ep_exchange + "'");
    require(c.sample >= 0 && c.sample_every >= 0, "--sample and --sample-every must be >= 0");
    require(c.sample_every == 0 || c.sample > 0, "--sample-every needs --sample N (the tokens to generate)");
    if (c.sample > 0) {
        require(std::isfinite(c.temperature) && c.temperature >= 0,
                "--temperature must be a finite number >= 0 (0: greedy)");
        require(c.top_k >= 0 && c.top_k <= c.V, "--top-k " + std::to_string(c.top_k) + " must be in [0, V = " +
                                                     std::to_string(c.V) + "] (0: the whole vocabulary)");
        prompt_tokens(c);  // throws on an empty, too long or out-of-vocabulary prompt
    }
    if (!c.locmoe()) return;
    require(c.d % c.E == 0, "LocMoE's grouped average pooling needs d % E == 0: d = " + std::to_string(c.d) +
                                " cannot be cut into E = " + std::to_string(c.E) + " equal groups");
    require(c.node_size >= 0, "node size must be >= 0 (0: the ranks on one host), not " + std::to_string(c.node_size));
    require(c.node_size == 0 || world % c.node_size == 0,
            "node size " + std::to_string(c.node_size) + " does not divide the R = " + std::to_string(world) + " ranks");
    require(c.capacity_factor >= 0, "capacity factor must be >= 0 (0: no capacity), not " +
                                        std::to_string(c.capacity_factor));
    require(c.capacity_delta > 0 && c.capacity_delta < 1,
            "capacity delta must be in (0, 1), not " + std::to_string(c.capacity_delta));
    require(c.aux_loss_weight >= 0 && c.loc_loss_weight >= 0, "aux-loss-weight and loc-loss-weight must be >= 0");
    require(c.bias_rate == 0, "LocMoE has no aux-free bias (SPEC §2.6): balance comes from L_aux, so --bias-rate "
                              "must be 0 (it is by default with --router locmoe)");
}

// What the multi-rank GPU path runs: Head Parallel alone. A valid --expert-shards Q > 1 is refused
// by name rather than run as something else.
inline void require_built_parallelism(const Config& c, int world) {
    if (c.ffn != FfnKind::LatentMoE || c.expert_shards == 1 || world == 1) return;
    throw ConfigError("--expert-shards " + std::to_string(c.expert_shards) + " (Head Parallel × Expert Parallel: P = " +
                      std::to_string(world / c.expert_shards) + " head groups × Q = " +
                      std::to_string(c.expert_shards) + " expert shards) is not built yet on the GPU path; run with "
                      "--expert-shards 1 (Head Parallel, H % R == 0)");
}

// ---------------------------------------------------------------------------------------------
// Flags. Each entry binds a name to a field; --help lists them with their current defaults.

struct Flag {
    const char* name;
    const char* help;
    enum Type { Int, Float, U64, Str, Bool } type;
    void* field;
    // latent-head flags mean nothing to the MoE baseline, its router's nothing to LatentMoE, and
    // LocMoE's nothing to the other router
    enum Scope { Both, HpOnly, MoeOnly, LocMoeOnly } scope;
    bool empty_ok = false;  // Str: '' is a meaningful value (--log-file '': no log); else '' is refused
    bool applies_to(FfnKind ffn) const {
        return scope == Both || (scope == HpOnly) == (ffn == FfnKind::LatentMoE);  // MoeOnly, LocMoeOnly: the MoE
    }
};

inline std::vector<Flag> flag_table(Config& c) {
    const Flag::Scope both = Flag::Both, HP = Flag::HpOnly, MOE = Flag::MoeOnly, LOC = Flag::LocMoeOnly;
    return {
        {"preset", "model preset: tiny, small, p1, p2 (applied before the other flags)", Flag::Str, &c.preset, both},
        {"seq-len", "sequence length T", Flag::Int, &c.T, both},
        {"d-model", "model width d", Flag::Int, &c.d, both},
        {"layers", "number of layers L", Flag::Int, &c.L, both},
        {"attn-heads", "attention heads (head size d / attn-heads)", Flag::Int, &c.n_head, both},
        {"vocab", "vocabulary size V (256 for data_prep's byte-level shards)", Flag::Int, &c.V, both},
        {"latent-heads", "latent heads H", Flag::Int, &c.H, HP},
        {"head-dim", "latent head size dh", Flag::Int, &c.dh, HP},
        {"experts", "experts E (per latent head for LatentMoE)", Flag::Int, &c.E, both},
        {"expert-dim", "expert hidden size (fe for LatentMoE, f for MoE)", Flag::Int, &c.fe, both},
        {"topk", "active experts k per (sub-)token, 2 <= k <= E (1 <= k with --router locmoe)", Flag::Int, &c.k, both},
        {"latent-init-scale", "multiplies the initial std of W_mh and W_mg (1: SPEC §2's 0.02 and 0.02/sqrt(2L))",
         Flag::Float, &c.latent_init_scale, HP},
        {"expert-shards", "Q: ranks that split each head's experts (P = R / Q head groups; 1: Head Parallel)",
         Flag::Int, &c.expert_shards, HP},
        {"batch", "micro-batch size B (sequences per rank)", Flag::Int, &c.B, both},
        {"grad-accum", "micro-steps per optimizer step", Flag::Int, &c.grad_accum, both},
        {"steps", "optimizer steps (0: generate only, see --sample)", Flag::Int, &c.steps, both},
        {"lr", "peak learning rate", Flag::Float, &c.lr, both},
        {"warmup", "linear warm-up steps", Flag::Int, &c.warmup, both},
        {"lr-floor", "cosine decay ends at lr * lr-floor", Flag::Float, &c.lr_floor, both},
        {"weight-decay", "AdamW weight decay (matrices only)", Flag::Float, &c.weight_decay, both},
        {"grad-clip", "global gradient-norm clip (0 disables)", Flag::Float, &c.grad_clip, both},
        {"bias-rate", "aux-loss-free bias update rate gamma (0 disables)", Flag::Float, &c.bias_rate, both},
        {"seed", "seed for the initial weights", Flag::U64, &c.seed, both},
        {"eval-every", "validation loss every N steps (0: only at the end)", Flag::Int, &c.eval_every, both},
        {"eval-batches", "micro-batches per validation", Flag::Int, &c.eval_batches, both},
        {"log-every", "progress line every N steps", Flag::Int, &c.log_every, both},
        {"train-data", "training shard(s), a path or glob pattern", Flag::Str, &c.train_data, both},
        {"val-data", "validation shard(s), a path or glob pattern", Flag::Str, &c.val_data, both},
        {"device", "auto | cpu | gpu (auto: the GPU if one is present)", Flag::Str, &c.device, both},
        {"checkpoint", "checkpoint file, saved at the end and on Ctrl-C (none: no checkpoint, the run cannot be resumed)", Flag::Str, &c.checkpoint, both},
        {"checkpoint-every", "also save every N steps (0: never in between)", Flag::Int, &c.checkpoint_every, both},
        {"resume", "resume training from this checkpoint (leave out to start fresh)", Flag::Str, &c.resume, both},
        {"log-file", "also write a CSV row per step: step,loss,norm,val_loss,ms,... (train/step_log.h; empty: no log)",
         Flag::Str, &c.log_file, both, true},
        {"bench-layer", "1: time forward+backward of one FFN layer of this config (B·T tokens a rank; under mpirun also its exchanges) and exit",
         Flag::Bool, &c.bench_layer, both},
        {"router", "topk (top-k of x R + b, SPEC 2.2) or locmoe (GrAP gate, capacity, locality, SPEC 2.6)",
         Flag::Str, &c.router, MOE},
        {"ep-exchange", "how Expert Parallel moves rows: device (kernels store them into the owners' memory, no "
         "host synchronisation), host (split sizes read on the host, NCCL send/recv), auto (device where every rank "
         "reaches every other's memory)", Flag::Str, &c.ep_exchange, MOE},
        {"node-size", "locmoe: consecutive ranks per node (0: the ranks on one host)", Flag::Int, &c.node_size, LOC},
        {"capacity-factor", "locmoe: expert capacity factor c_f (0: no capacity, dropless)", Flag::Float,
         &c.capacity_factor, LOC},
        {"capacity-delta", "locmoe: smallest token-gate cosine delta of the capacity bound ec_min", Flag::Float,
         &c.capacity_delta, LOC},
        {"aux-loss-weight", "locmoe: weight alpha of the load-balancing loss L_aux", Flag::Float,
         &c.aux_loss_weight, LOC},
        {"loc-loss-weight", "locmoe: weight mu of the locality loss L_loc", Flag::Float, &c.loc_loss_weight, LOC},
        {"sample", "generate N tokens at the end (with --steps 0 --resume CKPT: from a checkpoint, no training)",
         Flag::Int, &c.sample, both},
        {"sample-every", "also generate every N steps (0: only at the end)", Flag::Int, &c.sample_every, both},
        {"prompt", "text to continue (byte-level vocabulary), else token ids separated by spaces", Flag::Str,
         &c.prompt, both},
        {"temperature", "sampling temperature (0: greedy, the most likely token)", Flag::Float, &c.temperature, both},
        {"top-k", "sample among the k most likely tokens (0: all)", Flag::Int, &c.top_k, both},
        {"sample-seed", "seed for sampling (each sample starts from it)", Flag::U64, &c.sample_seed, both},
    };
}

inline std::string flag_value_string(const Flag& f) {
    switch (f.type) {
        case Flag::Int: return std::to_string(*static_cast<int*>(f.field));
        case Flag::Float: { char b[32]; std::snprintf(b, sizeof b, "%g", *static_cast<float*>(f.field)); return b; }
        case Flag::U64: return std::to_string(*static_cast<uint64_t*>(f.field));
        case Flag::Str: return *static_cast<std::string*>(f.field);
        case Flag::Bool: return *static_cast<bool*>(f.field) ? "1" : "0";
    }
    return "";
}

inline std::string default_checkpoint(FfnKind ffn) {
    return ffn == FfnKind::LatentMoE ? "out/latentmoe.ckpt" : "out/moe.ckpt";
}

inline void print_help(const char* program, FfnKind ffn, const char* summary) {
    Config c;
    c.ffn = ffn;
    apply_preset(c, "tiny");
    c.checkpoint = default_checkpoint(ffn);
    std::printf("usage: %s [--flag value ...]\n\n%s\n\nflags (defaults are the tiny preset's):\n", program, summary);
    for (const Flag& f : flag_table(c)) {
        if (!f.applies_to(ffn)) continue;
        std::printf("  --%-16s %s [%s]\n", f.name, f.help, flag_value_string(f).c_str());
    }
    std::printf("  --%-16s %s\n", "help", "print this text");
}

// Sets one field from its text, rejecting anything that is not entirely a number of the right kind.
inline void set_flag(const Flag& f, const std::string& value) {
    const std::string name = std::string("--") + f.name;
    char* end = nullptr;
    errno = 0;
    switch (f.type) {
        case Flag::Int: {
            long v = std::strtol(value.c_str(), &end, 10);
            if (value.empty() || *end || errno || v < -2147483647L || v > 2147483647L)
                throw ConfigError(name + " expects an integer, got '" + value + "'");
            *static_cast<int*>(f.field) = static_cast<int>(v);
            return;
        }
        case Flag::Float: {
            // parsed as a double, so a value a float cannot hold gets a range message, not "not a number"
            const double v = std::strtod(value.c_str(), &end);
            const bool range = errno == ERANGE;  // beyond a double: huge (±HUGE_VAL) or tiny (about 0)
            if (value.empty() || *end || (!std::isfinite(v) && !range))  // not a number, nan, inf
                throw ConfigError(name + " expects a number, got '" + value + "'");
            if ((range && std::fabs(v) >= 1) || std::fabs(v) > FLT_MAX)
                throw ConfigError(name + " " + value + " is out of range: a float holds at most 3.4e38 in magnitude");
            if ((range && std::fabs(v) < 1) || (v != 0 && std::fabs(v) < FLT_MIN))
                throw ConfigError(name + " " + value + " is out of range: too small for a float (the smallest "
                                  "is 1.2e-38); use 0 for none");
            *static_cast<float*>(f.field) = static_cast<float>(v);
            return;
        }
        case Flag::U64: {
            unsigned long long v = std::strtoull(value.c_str(), &end, 10);
            if (value.empty() || value[0] == '-' || *end || errno)
                throw ConfigError(name + " expects a non-negative integer, got '" + value + "'");
            *static_cast<uint64_t*>(f.field) = v;
            return;
        }
        case Flag::Str:
            // an empty value is most often an unset shell variable: for --checkpoint it would have meant
            // the default path (and overwritten it), for --resume a silent fresh start
            if (value.empty() && !f.empty_ok)
                throw ConfigError(name + " needs a non-empty value, got '' (leave the flag out for its default)");
            *static_cast<std::string*>(f.field) = value;
            return;
        case Flag::Bool:
            if (value != "0" && value != "1") throw ConfigError(name + " expects 0 or 1, got '" + value + "'");
            *static_cast<bool*>(f.field) = value == "1";
            return;
    }
}

// Parses argv into a Config for the given FFN. Returns false if --help was asked for.
// The preset is applied first wherever it appears, so `--topk 4 --preset small` keeps k = 4.
inline bool parse_flags(Config& c, FfnKind ffn, int argc, char** argv) {
    c = Config();
    c.ffn = ffn;
    std::string preset = "tiny";
    std::vector<std::pair<std::string, std::string>> given;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") return false;
        if (arg.rfind("--", 0) != 0) throw ConfigError("unexpected argument '" + arg + "' (flags look like --name value)");
        std::string name = arg.substr(2), value;
        size_t eq = name.find('=');
        if (eq != std::string::npos) {
            value = name.substr(eq + 1);
            name = name.substr(0, eq);
        } else {
            if (i + 1 >= argc) throw ConfigError("flag --" + name + " needs a value");
            value = argv[++i];
        }
        if (name == "preset") preset = value;
        else given.emplace_back(name, value);
    }
    apply_preset(c, preset);
    std::vector<Flag> table = flag_table(c);
    bool bias_rate_given = false;
    for (const auto& [name, value] : given) {
        bias_rate_given |= name == "bias-rate";
        const Flag* found = nullptr;
        for (const Flag& f : table)
            if (name == f.name && f.applies_to(ffn)) found = &f;
        if (!found) throw ConfigError("unknown flag --" + name + " (see --help)");
        set_flag(*found, value);
    }
    if (ffn == FfnKind::MoE) {  // the MoE routes whole tokens: one "head" as wide as the model
        c.H = 1;
        c.dh = c.d;
    }
    if (c.locmoe() && !bias_rate_given) c.bias_rate = 0;  // LocMoE balances through L_aux (validate refuses γ > 0)
    for (const auto& given_flag : given)
        for (const Flag& f : table)
            if (f.scope == Flag::LocMoeOnly && given_flag.first == f.name && !c.locmoe())
                throw ConfigError("--" + given_flag.first + " applies to --router locmoe only");
    if (c.checkpoint.empty()) c.checkpoint = default_checkpoint(ffn);
    return true;
}

inline void print_config(const Config& c) {
    std::printf("config: preset %s | T %d d %d L %d attn-heads %d V %d (padded %d) | %s: ", c.preset.c_str(), c.T,
                c.d, c.L, c.n_head, c.V, c.Vp(), ffn_name(c.ffn));
    if (c.ffn == FfnKind::LatentMoE) std::printf("H %d dh %d E %d fe %d k %d", c.H, c.dh, c.E, c.fe, c.k);
    else std::printf("E %d f %d k %d", c.E, c.fe, c.k);
    if (c.latent_init_scale != 1) std::printf(" | latent-init-scale %g", c.latent_init_scale);
    if (c.locmoe())
        std::printf(" | router locmoe: capacity-factor %g capacity-delta %g aux-loss-weight %g loc-loss-weight %g",
                    c.capacity_factor, c.capacity_delta, c.aux_loss_weight, c.loc_loss_weight);
    std::printf(" | B %d grad-accum %d steps %d lr %g warmup %d bias-rate %g seed %llu\n", c.B, c.grad_accum,
                c.steps, c.lr, c.warmup, c.bias_rate, (unsigned long long)c.seed);
}

}  // namespace lmoe
