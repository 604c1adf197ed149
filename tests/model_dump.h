// A model dump: everything an independent checker needs to recompute one forward and backward of the
// whole model (SPEC §2, §8.3) from outside this code base: the configuration, the flat parameter layout,
// the weights, the tokens and targets, the routing bias, the experts the code under test chose, and the
// loss and gradients it got. tests/torch_oracle.py reads it and redoes the step with PyTorch autograd.
// Host-only (C++17).
//
// On disk, in one directory:
//   meta.json          configuration, tensor layout, loss, and for every .bin its dtype and shape
//   params.bin         float32   (P)            the weights, flat, laid out as `tensors` says
//   grads.bin          float64   (P)            d loss / d params from the code under test
//   tokens.bin         int32     (B·T)
//   targets.bin        int32     (B·T)
//   sel.bin            int32     (L, H, N, k)   chosen experts per layer, head, token and slot (N = B·T)
//   routing_bias.bin   float32   (L, H, E)      the selection-only aux-free bias
//   kept.bin           int32     (L, H, N, k)   LocMoE only: 1 where the capacity kept a copy, 0 where it
//                                               dropped it
// All binaries are raw little-endian arrays without headers. meta.json's "loss" is the objective the
// gradients are of: the cross-entropy, plus every layer's L_aux + L_loc with LocMoE (SPEC §2.6), whose
// parts, capacity and drops are in its "locmoe" object.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace lmoe {

// What LocMoE (SPEC §2.6) adds: the rank the step stands for (its locality target D_l follows from it),
// what the code under test derived from the configuration (p_δ, ec_min, the capacity C), the parts of
// the loss (summed over the layers) and its capacity drop.
struct LocMoeDump {
    int rank = 0, world = 1, node_size = 1;  // rank of `world`, nodes of node_size consecutive ranks
    double p_delta = 0, ec_min = 0;
    int capacity = 0;                        // C rows per expert and micro-batch; 0: unlimited
    double cross_entropy = 0, aux_loss = 0, loc_loss = 0;
    std::vector<int> kept;                   // (L, H, N, k) 1: kept, 0: dropped
    std::vector<int64_t> dropped;            // (L) copies over capacity per layer
};

struct ModelDump {
    Config cfg;                            // T, d, L, n_head, V, H, dh, E, fe, k, B, ffn kind, router
    std::vector<TensorSpec> tensors;       // the layout (name, shape, offset, numel)
    std::vector<float> params;             // flat, the weights the run used
    std::vector<double> grads;             // flat, d loss / d params from the code under test
    std::vector<int32_t> tokens, targets;  // B·T each
    std::vector<int> sel;                  // (L, H, N, k): the experts the code under test chose (N = B·T)
    std::vector<float> routing_bias;       // (L, H, E)
    double loss = 0;                       // the objective: cross-entropy (+ Σ_l L_aux + L_loc with LocMoE)
    std::string producer;                  // free text for meta.json: which program and build made the dump
    LocMoeDump locmoe;                     // with cfg.locmoe() only
};

namespace dump_detail {

inline std::string json_string(const std::string& s) {
    std::string out = "\"";
    for (char ch : s) {
        unsigned char c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += ch;
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
        } else {
            out += ch;
        }
    }
    return out + "\"";
}

// JSON has no NaN or infinity: a non-finite number becomes null, which the reader treats as a failure.
inline std::string json_number(double x) {
    if (!std::isfinite(x)) return "null";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.17g", x);
    return buf;
}

inline std::string json_shape(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

inline bool little_endian() {
    const uint16_t one = 1;
    return *reinterpret_cast<const unsigned char*>(&one) == 1;
}

template <class T>
void write_bin(const std::filesystem::path& path, const std::vector<T>& v) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error("model dump: cannot open " + path.string() + " for writing");
    f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
    f.close();
    if (!f) throw std::runtime_error("model dump: writing " + path.string() + " failed");
}

inline void require_size(const char* what, size_t got, int64_t want) {
    if (static_cast<int64_t>(got) != want)
        throw std::runtime_error(std::string("model dump: ") + what + " has " + std::to_string(got) +
                                 " elements, expected " + std::to_string(want));
}

}  // namespace dump_detail

// Writes the dump into `dir` (created with its parents if needed). Checks first that every array has
// the size the configuration and layout imply, so a malformed dump fails here and not in the checker.
// Throws std::runtime_error on any inconsistency or I/O failure.
inline void write_model_dump(const std::string& dir, const ModelDump& d) {
    namespace fs = std::filesystem;
    using namespace dump_detail;
    static_assert(sizeof(float) == 4 && sizeof(double) == 8 && sizeof(int) == 4, "the dump format needs 32-bit int");
    if (!little_endian()) throw std::runtime_error("model dump: the format is little-endian; this host is not");

    const Config& c = d.cfg;
    const int64_t N = int64_t(c.B) * c.T;
    int64_t total = 0;
    for (const TensorSpec& t : d.tensors) {
        int64_t n = 1;
        for (int64_t s : t.shape) n *= s;
        if (n != t.numel || t.offset != total)
            throw std::runtime_error("model dump: tensor " + t.name + " has an inconsistent shape, numel or offset");
        total += t.numel;
    }
    require_size("params", d.params.size(), total);
    require_size("grads", d.grads.size(), total);
    require_size("tokens", d.tokens.size(), N);
    require_size("targets", d.targets.size(), N);
    require_size("sel", d.sel.size(), int64_t(c.L) * c.H * N * c.k);
    require_size("routing_bias", d.routing_bias.size(), int64_t(c.L) * c.H * c.E);
    const LocMoeDump& loc = d.locmoe;
    if (c.locmoe()) {
        require_size("kept", loc.kept.size(), int64_t(c.L) * c.H * N * c.k);
        require_size("dropped", loc.dropped.size(), c.L);
    }

    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec || !fs::is_directory(dir))
        throw std::runtime_error("model dump: cannot create directory " + dir + (ec ? ": " + ec.message() : ""));
    const fs::path root(dir);

    write_bin(root / "params.bin", d.params);
    write_bin(root / "grads.bin", d.grads);
    write_bin(root / "tokens.bin", d.tokens);
    write_bin(root / "targets.bin", d.targets);
    write_bin(root / "sel.bin", d.sel);
    write_bin(root / "routing_bias.bin", d.routing_bias);
    if (c.locmoe()) write_bin(root / "kept.bin", loc.kept);

    std::ostringstream j;
    j << "{\n";
    j << "  \"format\": \"lmoe-model-dump\",\n  \"version\": 2,\n";
    j << "  \"producer\": " << json_string(d.producer) << ",\n";
    j << "  \"config\": {\"ffn\": " << json_string(c.ffn == FfnKind::LatentMoE ? "latentmoe" : "moe")
      << ", \"router\": " << json_string(c.locmoe() ? "locmoe" : "topk")
      << ", \"T\": " << c.T << ", \"d\": " << c.d << ", \"L\": " << c.L << ", \"n_head\": " << c.n_head
      << ", \"V\": " << c.V << ", \"Vp\": " << c.Vp() << ", \"H\": " << c.H << ", \"dh\": " << c.dh
      << ", \"E\": " << c.E << ", \"fe\": " << c.fe << ", \"k\": " << c.k << ", \"B\": " << c.B;
    if (c.locmoe())  // the float flags exactly as the code used them (as doubles)
        j << ", \"capacity_factor\": " << json_number(c.capacity_factor)
          << ", \"capacity_delta\": " << json_number(c.capacity_delta)
          << ", \"aux_loss_weight\": " << json_number(c.aux_loss_weight)
          << ", \"loc_loss_weight\": " << json_number(c.loc_loss_weight) << ", \"rank\": " << loc.rank
          << ", \"world\": " << loc.world << ", \"node_size\": " << loc.node_size;
    j << "},\n";
    j << "  \"loss\": " << json_number(d.loss) << ",\n";
    if (c.locmoe()) {
        j << "  \"locmoe\": {\"p_delta\": " << json_number(loc.p_delta) << ", \"ec_min\": "
          << json_number(loc.ec_min) << ", \"capacity\": " << loc.capacity
          << ", \"cross_entropy\": " << json_number(loc.cross_entropy)
          << ", \"aux_loss\": " << json_number(loc.aux_loss) << ", \"loc_loss\": " << json_number(loc.loc_loss)
          << ", \"dropped\": [";
        for (int l = 0; l < c.L; l++) j << (l ? ", " : "") << loc.dropped[l];
        j << "]},\n";
    }
    j << "  \"num_params\": " << total << ",\n";
    j << "  \"tensors\": [\n";
    for (size_t i = 0; i < d.tensors.size(); i++) {
        const TensorSpec& t = d.tensors[i];
        j << "    {\"name\": " << json_string(t.name) << ", \"shape\": " << json_shape(t.shape)
          << ", \"offset\": " << t.offset << ", \"numel\": " << t.numel << "}"
          << (i + 1 < d.tensors.size() ? ",\n" : "\n");
    }
    j << "  ],\n";
    j << "  \"files\": {\n"
      << "    \"params\": {\"file\": \"params.bin\", \"dtype\": \"float32\", \"shape\": [" << total << "]},\n"
      << "    \"grads\": {\"file\": \"grads.bin\", \"dtype\": \"float64\", \"shape\": [" << total << "]},\n"
      << "    \"tokens\": {\"file\": \"tokens.bin\", \"dtype\": \"int32\", \"shape\": [" << N << "]},\n"
      << "    \"targets\": {\"file\": \"targets.bin\", \"dtype\": \"int32\", \"shape\": [" << N << "]},\n"
      << "    \"sel\": {\"file\": \"sel.bin\", \"dtype\": \"int32\", \"shape\": "
      << json_shape({c.L, c.H, N, c.k}) << "},\n"
      << "    \"routing_bias\": {\"file\": \"routing_bias.bin\", \"dtype\": \"float32\", \"shape\": "
      << json_shape({c.L, c.H, c.E}) << "}";
    if (c.locmoe())
        j << ",\n    \"kept\": {\"file\": \"kept.bin\", \"dtype\": \"int32\", \"shape\": "
          << json_shape({c.L, c.H, N, c.k}) << "}";
    j << "\n  }\n}\n";

    std::ofstream f(root / "meta.json", std::ios::trunc);
    if (!f) throw std::runtime_error("model dump: cannot open " + (root / "meta.json").string() + " for writing");
    f << j.str();
    f.close();
    if (!f) throw std::runtime_error("model dump: writing " + (root / "meta.json").string() + " failed");
}

}  // namespace lmoe
