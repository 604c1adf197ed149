// Checkpoints: everything needed to resume training exactly where it stopped (fp32 weights, AdamW
// moments, routing biases, the step), written atomically, and refused with a clear message when they
// were written for another model. Host-only; the GPU trainers copy their buffers to the host to use it.
#pragma once
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/config.h"

namespace lmoe {

constexpr int32_t kCheckpointMagic = 0x4C4D4F45;  // "LMOE"
constexpr int32_t kCheckpointVersion = 1;

struct TrainingState {
    int step = 0;                      // optimizer steps done
    std::vector<float> params, m, v;   // this rank's parameters and AdamW moments
    std::vector<float> routing_bias;   // (L, H, E)
};

// The fields that fix the parameter shapes, in the order they are stored.
inline std::vector<std::pair<const char*, int32_t>> model_fingerprint(const Config& c) {
    return {{"ffn kind", (int32_t)c.ffn}, {"d", c.d}, {"L", c.L}, {"attn-heads", c.n_head}, {"V", c.V},
            {"latent-heads", c.H},        {"head-dim", c.dh}, {"experts", c.E}, {"expert-dim", c.fe}, {"topk", c.k}};
}

// Writes to PATH.tmp and renames, so an interruption mid-write never leaves a broken checkpoint.
inline void save_checkpoint(const std::string& path, const Config& c, const TrainingState& s) {
    const std::string tmp = path + ".tmp";
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw std::runtime_error(path + ": cannot write checkpoint");
    auto fingerprint = model_fingerprint(c);
    std::vector<int64_t> header = {kCheckpointMagic, kCheckpointVersion, s.step, (int64_t)s.params.size(),
                                   (int64_t)s.routing_bias.size(), (int64_t)fingerprint.size()};
    for (const auto& field : fingerprint) header.push_back(field.second);
    bool ok = std::fwrite(header.data(), sizeof(int64_t), header.size(), f) == header.size();
    for (const std::vector<float>* part : {&s.params, &s.m, &s.v, &s.routing_bias})
        ok = ok && std::fwrite(part->data(), sizeof(float), part->size(), f) == part->size();
    ok = (std::fclose(f) == 0) && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        throw std::runtime_error(path + ": writing the checkpoint failed (disk full?)");
    }
}

// Reads a checkpoint for the model `c`; this rank holds `num_params` parameters and `bias_size`
// routing biases (its shard under Head Parallel).
inline TrainingState load_checkpoint(const std::string& path, const Config& c, int64_t num_params, int64_t bias_size) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw std::runtime_error(path + ": cannot open checkpoint");
    auto fail = [&](const std::string& why) {
        std::fclose(f);
        throw std::runtime_error(path + ": " + why);
    };
    int64_t head[6];
    if (std::fread(head, sizeof(int64_t), 6, f) != 6 || head[0] != kCheckpointMagic)
        fail("not a checkpoint of this trainer");
    if (head[1] != kCheckpointVersion) fail("checkpoint version " + std::to_string(head[1]) + " is not supported");
    auto fingerprint = model_fingerprint(c);
    std::vector<int64_t> stored(head[5]);
    if (head[5] != (int64_t)fingerprint.size() || std::fread(stored.data(), sizeof(int64_t), stored.size(), f) != stored.size())
        fail("truncated or foreign checkpoint header");
    for (size_t i = 0; i < fingerprint.size(); i++)
        if (stored[i] != fingerprint[i].second)
            fail(std::string("checkpoint was written for another model: ") + fingerprint[i].first + " " +
                 std::to_string(stored[i]) + " there, " + std::to_string(fingerprint[i].second) + " here");
    if (head[3] != num_params || head[4] != bias_size)
        fail("checkpoint holds " + std::to_string(head[3]) + " parameters, this rank needs " +
             std::to_string(num_params) + " (another number of ranks?)");
    TrainingState s;
    s.step = (int)head[2];
    s.params.resize(num_params);
    s.m.resize(num_params);
    s.v.resize(num_params);
    s.routing_bias.resize(bias_size);
    for (std::vector<float>* part : {&s.params, &s.m, &s.v, &s.routing_bias})
        if (std::fread(part->data(), sizeof(float), part->size(), f) != part->size()) fail("checkpoint is truncated");
    char extra;
    if (std::fread(&extra, 1, 1, f) == 1) fail("checkpoint has trailing bytes");
    std::fclose(f);
    return s;
}

// Rank r of R > 1 keeps its own checkpoint file (its expert shard), PATH.rank<r>.
inline std::string rank_path(const std::string& path, int rank, int world) {
    return world == 1 ? path : path + ".rank" + std::to_string(rank);
}

}  // namespace lmoe
