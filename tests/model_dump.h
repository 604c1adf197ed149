// A model dump: everything an independent checker needs to recompute one forward and backward of the
// whole model (SPEC §2, §8.3) from outside this code base: the configuration, the flat parameter layout,
// the weights, the tokens and targets, the routing bias, the experts the code under test chose, and the
// loss and gradients it got. tests/torch_oracle.py reads it and redoes the step with PyTorch autograd.
// Host-only (C++17).
//
// On disk, in one directory:
//   meta.json          configuration, tensor layout, loss, and for every .bin its dtype and shape
//   params.bin         float32   (P)            the weights, flat, laid out as `tensors` says
//   grads.bin          float64   (P)            d mean-loss / d params from the code under test
//   tokens.bin         int32     (B·T)
//   targets.bin        int32     (B·T)
//   sel.bin            int32     (L, H, N, k)   chosen experts per layer, head, token and slot (N = B·T)
//   routing_bias.bin   float32   (L, H, E)      the selection-only aux-free bias
// All binaries are raw little-endian arrays without headers.
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

struct ModelDump {
    Config cfg;                            // T, d, L, n_head, V, H, dh, E, fe, k, B, ffn kind
    std::vector<TensorSpec> tensors;       // the layout (name, shape, offset, numel)
    std::vector<float> params;             // flat, the weights the run used
    std::vector<double> grads;             // flat, d mean-loss / d params from the code under test
    std::vector<int32_t> tokens, targets;  // B·T each
    std::vector<int> sel;                  // (L, H, N, k): the experts the code under test chose (N = B·T)
    std::vector<float> routing_bias;       // (L, H, E)
    double loss = 0;
    std::string producer;                  // free text for meta.json: which program and build made the dump
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

    std::ostringstream j;
    j << "{\n";
    j << "  \"format\": \"lmoe-model-dump\",\n  \"version\": 1,\n";
    j << "  \"producer\": " << json_string(d.producer) << ",\n";
    j << "  \"config\": {\"ffn\": " << json_string(c.ffn == FfnKind::LatentMoE ? "latentmoe" : "moe")
      << ", \"T\": " << c.T << ", \"d\": " << c.d << ", \"L\": " << c.L << ", \"n_head\": " << c.n_head
      << ", \"V\": " << c.V << ", \"Vp\": " << c.Vp() << ", \"H\": " << c.H << ", \"dh\": " << c.dh
      << ", \"E\": " << c.E << ", \"fe\": " << c.fe << ", \"k\": " << c.k << ", \"B\": " << c.B << "},\n";
    j << "  \"loss\": " << json_number(d.loss) << ",\n";
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
      << json_shape({c.L, c.H, c.E}) << "}\n"
      << "  }\n}\n";

    std::ofstream f(root / "meta.json", std::ios::trunc);
    if (!f) throw std::runtime_error("model dump: cannot open " + (root / "meta.json").string() + " for writing");
    f << j.str();
    f.close();
    if (!f) throw std::runtime_error("model dump: writing " + (root / "meta.json").string() + " failed");
}

}  // namespace lmoe
