// Data-parallel reader of llm.c token shards. The order is deterministic and independent of how the
// global batch is split: global batch g covers world*B*T tokens (plus one for the last target) starting
// at g*world*B*T in the current shard, and rank r takes the B*T slice at r*B*T. So one rank with
// B' = world*B sees exactly the concatenation of what the world ranks see, which is what lets a
// multi-GPU run be checked against the one-GPU run. One shard is held in memory at a time.
#pragma once
#include <glob.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/shard.h"

namespace lmoe {

// The sorted list of shard files a path or glob pattern names. A path that names an existing file is
// taken literally, even when it holds glob characters (data[1].bin, run*.bin as a real name); only a
// path that names no file is expanded as a pattern.
inline std::vector<std::string> glob_shards(const std::string& pattern) {
    struct stat st;
    if (!pattern.empty() && stat(pattern.c_str(), &st) == 0) return {pattern};
    glob_t matches{};  // zeroed so globfree is safe whatever glob returns
    int status = glob(pattern.c_str(), 0, nullptr, &matches);
    std::vector<std::string> files;
    if (status == 0)
        for (size_t i = 0; i < matches.gl_pathc; i++) files.push_back(matches.gl_pathv[i]);
    globfree(&matches);
    if (status == GLOB_NOMATCH) throw std::runtime_error("no shard files match '" + pattern + "'");
    if (status != 0) throw std::runtime_error("cannot expand shard pattern '" + pattern + "' (glob error)");
    return files;
}

// Bytes of tokens in the largest shard the pattern names (its file size less the header), for the
// memory estimate; 0 when the pattern names nothing readable (the loader then says why).
inline int64_t largest_shard_bytes(const std::string& pattern) {
    int64_t largest = 0;
    try {
        for (const std::string& file : glob_shards(pattern)) {
            struct stat st;
            if (stat(file.c_str(), &st) == 0 && S_ISREG(st.st_mode))
                largest = std::max<int64_t>(largest, static_cast<int64_t>(st.st_size) - kShardHeaderBytes);
        }
    } catch (const std::exception&) {
        return 0;
    }
    return largest;
}

class DataLoader {
   public:
    // Checks every shard's header up front, so a bad or too-small shard fails at startup rather than
    // when the loader reaches it hours into a run.
    DataLoader(const std::string& pattern, int B, int T, int rank, int world, int vocab_size)
        : B_(B), T_(T), rank_(rank), world_(world), vocab_size_(vocab_size) {
        if (B <= 0 || T <= 0)
            throw std::runtime_error("DataLoader: batch size B and sequence length T must be positive (got B " +
                                     std::to_string(B) + ", T " + std::to_string(T) + ")");
        if (world <= 0)
            throw std::runtime_error("DataLoader: world size must be positive (got " + std::to_string(world) + ")");
        if (rank < 0 || rank >= world)
            throw std::runtime_error("DataLoader: rank " + std::to_string(rank) + " is outside 0.." +
                                     std::to_string(world - 1) + " for world size " + std::to_string(world));
        if (vocab_size <= 0 || vocab_size > kMaxShardVocab)
            throw std::runtime_error("DataLoader: vocabulary size " + std::to_string(vocab_size) +
                                     " is outside 1.." + std::to_string(kMaxShardVocab));
        files_ = glob_shards(pattern);
        int64_t window = global_batch_tokens();
        for (const std::string& file : files_) {
            ShardInfo info = read_shard_header(file);
            check_shard_vocab(file, info, vocab_size);
            if (info.num_tokens < window + 1)
                throw std::runtime_error(file + ": holds " + std::to_string(info.num_tokens) +
                                         " tokens, but one global batch needs " + std::to_string(window + 1) +
                                         " (world " + std::to_string(world) + " x B " + std::to_string(B) + " x T " +
                                         std::to_string(T) + " + 1 for the last target)");
            tokens_per_epoch_ += info.num_tokens;
        }
        load_shard(0);
    }

    // Fills this rank's B*T inputs and their next-token targets, moving to the next shard (and the next
    // epoch after the last one) when the current shard cannot hold another whole global batch.
    void next_batch(int32_t* inputs, int32_t* targets) {
        if (batch_in_shard_ >= batches_in_current_shard()) {
            size_t next = (shard_ + 1) % files_.size();
            if (next == 0) epoch_++;
            load_shard(next);
        }
        int64_t local = static_cast<int64_t>(B_) * T_;
        int64_t start = batch_in_shard_ * global_batch_tokens() + rank_ * local;
        const uint16_t* window = tokens_.data() + start;
        for (int64_t i = 0; i < local; i++) {
            inputs[i] = window[i];
            targets[i] = window[i + 1];
        }
        batch_in_shard_++;
    }

    // Back to the very first batch of the first shard, epoch 0: eval passes over the val split this way.
    void reset() {
        load_shard(0);
        epoch_ = 0;
    }

    int64_t tokens_per_epoch() const { return tokens_per_epoch_; }

    // Global batches that fit in the current shard; an eval over a single val shard runs this many.
    int64_t batches_in_current_shard() const {
        return (static_cast<int64_t>(tokens_.size()) - 1) / global_batch_tokens();
    }

    int epoch() const { return epoch_; }
    const std::vector<std::string>& files() const { return files_; }

   private:
    int64_t global_batch_tokens() const { return static_cast<int64_t>(world_) * B_ * T_; }

    // Makes `shard` current, starting at its first batch; rereads only when the shard changes, so a
    // single-shard loader wraps epochs without touching the disk.
    void load_shard(size_t shard) {
        if (shard != shard_ || tokens_.empty()) tokens_ = read_shard(files_[shard], vocab_size_);
        shard_ = shard;
        batch_in_shard_ = 0;
    }

    int B_, T_, rank_, world_, vocab_size_;
    std::vector<std::string> files_;
    int64_t tokens_per_epoch_ = 0;
    std::vector<uint16_t> tokens_;  // the current shard
    size_t shard_ = 0;              // index into files_ of the current shard
    int64_t batch_in_shard_ = 0;    // next global batch to read from the current shard
    int epoch_ = 0;
};

// Entropy (nats) of the unigram distribution of the tokens: the loss a model gets by predicting token
// frequencies alone. The trainers print it as the baseline a learning model's loss must fall below.
inline double unigram_entropy_nats(const std::vector<uint16_t>& tokens, int vocab_size) {
    if (tokens.empty()) throw std::runtime_error("unigram_entropy_nats: no tokens");
    if (vocab_size <= 0 || vocab_size > kMaxShardVocab)
        throw std::runtime_error("unigram_entropy_nats: vocabulary size " + std::to_string(vocab_size) +
                                 " is outside 1.." + std::to_string(kMaxShardVocab));
    std::vector<int64_t> counts(vocab_size, 0);
    for (size_t i = 0; i < tokens.size(); i++) {
        if (tokens[i] >= vocab_size)
            throw std::runtime_error("unigram_entropy_nats: token id " + std::to_string(tokens[i]) + " at position " +
                                     std::to_string(i) + " is >= vocabulary size " + std::to_string(vocab_size));
        counts[tokens[i]]++;
    }
    double n = static_cast<double>(tokens.size()), entropy = 0.0;
    for (int64_t c : counts) {
        double p = static_cast<double>(c) / n;
        if (c > 0) entropy -= p * std::log(p);
    }
    return entropy;
}

}  // namespace lmoe
