// Tests of the shard format and the data loader: round trips, a distinct clear error for every kind of
// bad file, next-token targets, and the property multi-GPU runs rely on: world ranks with B sequences
// each see exactly what one rank with world*B sequences sees, across shard switches and epoch wraps.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "io/dataloader.h"
#include "io/shard.h"
#include "tests/check.h"

using lmoe::DataLoader;

// Writes raw bytes, for files write_shard would refuse to make.
static void write_bytes(const std::string& path, const void* data, size_t bytes) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(data, 1, bytes, f) != bytes) {
        std::fprintf(stderr, "cannot write test file %s\n", path.c_str());
        std::exit(1);
    }
    std::fclose(f);
}

// Writes a shard whose header fields are given directly, followed by `tokens`.
static void write_raw_shard(const std::string& path, int32_t magic, int32_t version, int32_t count, int32_t vocab,
                            const std::vector<uint16_t>& tokens, size_t extra_bytes = 0) {
    std::vector<uint8_t> bytes(lmoe::kShardHeaderBytes + tokens.size() * 2 + extra_bytes, 0);
    int32_t header[lmoe::kShardHeaderInts] = {magic, version, count, vocab};
    std::memcpy(bytes.data(), header, sizeof(header));
    if (!tokens.empty()) std::memcpy(bytes.data() + sizeof(header), tokens.data(), tokens.size() * 2);
    write_bytes(path, bytes.data(), bytes.size());
}

// Tokens first, first+1, ...: a token's value says where it came from, so a wrong offset shows.
static std::vector<uint16_t> counting_tokens(int n, int first) {
    std::vector<uint16_t> tokens(n);
    for (int i = 0; i < n; i++) tokens[i] = static_cast<uint16_t>(first + i);
    return tokens;
}

static void test_round_trip(const std::string& dir) {
    std::mt19937 rng(1234);
    std::uniform_int_distribution<int> token(0, 50256);
    std::vector<uint16_t> tokens(10007);
    for (uint16_t& t : tokens) t = static_cast<uint16_t>(token(rng));
    std::string path = dir + "/round_trip.bin";
    lmoe::write_shard(path, tokens, 50257);
    CHECK(std::filesystem::file_size(path) == 1024 + 2 * tokens.size());
    lmoe::ShardInfo info = lmoe::read_shard_header(path);
    CHECK(info.num_tokens == 10007);
    CHECK(info.vocab_size == 50257);
    CHECK(lmoe::read_shard(path, 50257) == tokens);
    CHECK(lmoe::read_shard(path, 65536) == tokens);  // a larger model vocabulary is fine

    // An llm.c shard records no vocabulary (header[3] == 0) and reads with any vocabulary that fits its ids.
    std::string llmc = dir + "/llmc.bin";
    write_raw_shard(llmc, lmoe::kShardMagic, 1, 5, 0, {1, 2, 3, 4, 5});
    CHECK(lmoe::read_shard_header(llmc).vocab_size == 0);
    CHECK((lmoe::read_shard(llmc, 256) == std::vector<uint16_t>{1, 2, 3, 4, 5}));
}

static void test_bad_files(const std::string& dir) {
    std::string path = dir + "/bad.bin";
    CHECK_THROWS(lmoe::read_shard_header(dir + "/missing.bin"), "missing.bin: cannot open: No such file");
    CHECK_THROWS(lmoe::read_shard(dir, 256), "is a directory");

    std::vector<uint8_t> short_file(100, 0);
    write_bytes(path, short_file.data(), short_file.size());
    CHECK_THROWS(lmoe::read_shard_header(path), "bad.bin: shorter than the 1024-byte llm.c shard header (file is 100");

    write_raw_shard(path, 12345, 1, 3, 256, {1, 2, 3});
    CHECK_THROWS(lmoe::read_shard_header(path), "bad.bin: not an llm.c token shard");

    write_raw_shard(path, lmoe::kShardMagic, 2, 3, 256, {1, 2, 3});
    CHECK_THROWS(lmoe::read_shard_header(path), "bad.bin: unsupported shard version 2");

    write_raw_shard(path, lmoe::kShardMagic, 1, 1000, 256, counting_tokens(12, 0));
    CHECK_THROWS(lmoe::read_shard_header(path), "bad.bin: truncated: header says 1000 tokens, file holds 12");

    write_raw_shard(path, lmoe::kShardMagic, 1, 3, 256, {1, 2, 3}, 1);
    CHECK_THROWS(lmoe::read_shard_header(path), "bad.bin: trailing bytes: header says 3 tokens");

    write_raw_shard(path, lmoe::kShardMagic, 1, 0, 256, {});
    CHECK_THROWS(lmoe::read_shard_header(path), "bad.bin: holds zero tokens");

    write_raw_shard(path, lmoe::kShardMagic, 1, 6, 0, {1, 2, 3, 300, 4, 500});
    CHECK_THROWS(lmoe::read_shard(path, 256), "bad.bin: token id 300 at position 3 is >= vocabulary size 256");

    write_raw_shard(path, lmoe::kShardMagic, 1, 3, 50257, {1, 2, 3});
    CHECK_THROWS(lmoe::read_shard(path, 256), "bad.bin: shard was made for a vocabulary of 50257 tokens");
    CHECK_THROWS(DataLoader(path, 1, 1, 0, 1, 256), "shard was made for a vocabulary of 50257 tokens");

    CHECK_THROWS(lmoe::write_shard(path, {1, 256}, 256), "token id 256 at position 1");
    CHECK_THROWS(lmoe::write_shard(path, {}, 256), "no tokens");
    CHECK_THROWS(lmoe::write_shard(dir + "/no_such_dir/x.bin", {1}, 256), "no_such_dir/x.bin: cannot create");
}

// Inputs are the window's tokens and targets the tokens one place later, including the last target.
static void test_next_token_targets(const std::string& dir) {
    std::string path = dir + "/targets.bin";
    lmoe::write_shard(path, counting_tokens(100, 0), 256);
    const int B = 2, T = 5;
    DataLoader loader(path, B, T, 0, 1, 256);
    CHECK(loader.batches_in_current_shard() == 9);  // (100 - 1) / 10
    CHECK(loader.tokens_per_epoch() == 100);
    std::vector<int32_t> inputs(B * T), targets(B * T);
    bool all_match = true;
    for (int batch = 0; batch < 9; batch++) {
        loader.next_batch(inputs.data(), targets.data());
        for (int i = 0; i < B * T; i++)
            all_match = all_match && inputs[i] == batch * B * T + i && targets[i] == batch * B * T + i + 1;
    }
    CHECK(all_match);
    CHECK(loader.epoch() == 0);
    loader.next_batch(inputs.data(), targets.data());  // the 10th window would need token 100: wrap
    CHECK(loader.epoch() == 1);
    CHECK(inputs[0] == 0 && targets[B * T - 1] == B * T);
}

// Ranks of a world with B sequences each, concatenated, equal one rank with world*B sequences, batch
// by batch, across a switch from a long shard to a short one and a wrap back to the first.
static void test_rank_slicing(const std::string& dir) {
    lmoe::write_shard(dir + "/split_a.bin", counting_tokens(1000, 0), 4096);
    lmoe::write_shard(dir + "/split_b.bin", counting_tokens(700, 2000), 4096);
    std::string pattern = dir + "/split_*.bin";
    const int B = 2, T = 8, world = 2, local = B * T;
    DataLoader rank0(pattern, B, T, 0, world, 4096), rank1(pattern, B, T, 1, world, 4096);
    DataLoader single(pattern, world * B, T, 0, 1, 4096);
    CHECK(rank0.batches_in_current_shard() == 31);  // (1000 - 1) / 32
    CHECK(single.batches_in_current_shard() == 31);

    std::vector<int32_t> in0(local), tg0(local), in1(local), tg1(local), in(world * local), tg(world * local);
    const int batches = 31 + 21 + 5;  // all of shard a, all of shard b ((700 - 1) / 32), into epoch 1
    bool same = true, epochs_agree = true;
    for (int batch = 0; batch < batches; batch++) {
        rank0.next_batch(in0.data(), tg0.data());
        rank1.next_batch(in1.data(), tg1.data());
        single.next_batch(in.data(), tg.data());
        for (int i = 0; i < local; i++)
            same = same && in[i] == in0[i] && tg[i] == tg0[i] && in[local + i] == in1[i] && tg[local + i] == tg1[i];
        epochs_agree = epochs_agree && rank0.epoch() == single.epoch() && rank1.epoch() == single.epoch();
        if (batch == 31) {
            CHECK(in[0] == 2000 && in0[0] == 2000 && in1[0] == 2000 + local);  // first batch of shard b
            CHECK(single.batches_in_current_shard() == 21);
            CHECK(single.epoch() == 0);
        }
        if (batch == 52) CHECK(in[0] == 0 && single.epoch() == 1);  // wrapped to shard a
    }
    CHECK(same);
    CHECK(epochs_agree);
    CHECK(rank1.epoch() == 1);
}

// reset() returns to the very first batch even from another shard and epoch.
static void test_reset(const std::string& dir) {
    std::string pattern = dir + "/split_*.bin";
    DataLoader loader(pattern, 2, 8, 1, 2, 4096);
    std::vector<int32_t> first_in(16), first_tg(16), in(16), tg(16);
    loader.next_batch(first_in.data(), first_tg.data());
    for (int i = 0; i < 60; i++) loader.next_batch(in.data(), tg.data());
    CHECK(loader.epoch() == 1);
    loader.reset();
    CHECK(loader.epoch() == 0);
    CHECK(loader.batches_in_current_shard() == 31);
    loader.next_batch(in.data(), tg.data());
    CHECK(in == first_in && tg == first_tg);
    CHECK(in[0] == 16);  // rank 1 of 2, B*T = 16
}

static void test_glob(const std::string& dir) {
    DataLoader loader(dir + "/split_*.bin", 1, 4, 0, 1, 4096);
    CHECK(loader.files().size() == 2 && loader.files()[0] == dir + "/split_a.bin" &&
          loader.files()[1] == dir + "/split_b.bin");
    CHECK(loader.tokens_per_epoch() == 1700);
    DataLoader one_file(dir + "/split_b.bin", 1, 4, 0, 1, 4096);
    CHECK(one_file.files().size() == 1 && one_file.tokens_per_epoch() == 700);
    CHECK_THROWS(DataLoader(dir + "/nothing_*.bin", 1, 4, 0, 1, 4096), "no shard files match");
    CHECK_THROWS(DataLoader(dir + "/nothing_*.bin", 1, 4, 0, 1, 4096), "nothing_*.bin");
}

static void test_too_small_and_arguments(const std::string& dir) {
    std::string path = dir + "/small.bin";
    lmoe::write_shard(path, counting_tokens(20, 0), 256);
    DataLoader fits(path, 2, 8, 0, 1, 256);  // needs 17
    CHECK(fits.batches_in_current_shard() == 1);
    CHECK_THROWS(DataLoader(path, 2, 8, 0, 2, 256), "small.bin: holds 20 tokens, but one global batch needs 33");
    CHECK_THROWS(DataLoader(path, 0, 8, 0, 1, 256), "B and sequence length T must be positive");
    CHECK_THROWS(DataLoader(path, 2, -1, 0, 1, 256), "B and sequence length T must be positive");
    CHECK_THROWS(DataLoader(path, 2, 8, 0, 0, 256), "world size must be positive");
    CHECK_THROWS(DataLoader(path, 2, 8, 2, 2, 256), "rank 2 is outside 0..1");
    CHECK_THROWS(DataLoader(path, 2, 8, -1, 2, 256), "rank -1 is outside");
    CHECK_THROWS(DataLoader(path, 2, 8, 0, 1, 0), "vocabulary size 0");
    std::string foreign = dir + "/foreign.bin";
    write_raw_shard(foreign, 12345, 1, 3, 0, {1, 2, 3});
    CHECK_THROWS(DataLoader(foreign, 1, 1, 0, 1, 256), "foreign.bin: not an llm.c token shard");
}

// Token ids beyond the vocabulary in a later shard are caught when the loader reaches it, naming the file.
static void test_bad_token_in_later_shard(const std::string& dir) {
    lmoe::write_shard(dir + "/mixed_a.bin", counting_tokens(20, 0), 0);
    lmoe::write_shard(dir + "/mixed_b.bin", counting_tokens(20, 250), 0);
    DataLoader loader(dir + "/mixed_*.bin", 1, 8, 0, 1, 256);
    std::vector<int32_t> in(8), tg(8);
    loader.next_batch(in.data(), tg.data());
    loader.next_batch(in.data(), tg.data());
    CHECK_THROWS(loader.next_batch(in.data(), tg.data()), "mixed_b.bin: token id 256 at position 6");
}

static void test_unigram_entropy() {
    CHECK(std::fabs(lmoe::unigram_entropy_nats({7, 7, 7, 7}, 256)) < 1e-12);
    CHECK(std::fabs(lmoe::unigram_entropy_nats({0, 1, 0, 1}, 256) - std::log(2.0)) < 1e-12);
    CHECK(std::fabs(lmoe::unigram_entropy_nats({0, 1, 2, 3}, 4) - std::log(4.0)) < 1e-12);
    double expected = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25));  // p = (3/4, 1/4)
    CHECK(std::fabs(lmoe::unigram_entropy_nats({5, 5, 9, 5}, 256) - expected) < 1e-12);
    CHECK_THROWS(lmoe::unigram_entropy_nats({}, 256), "no tokens");
    CHECK_THROWS(lmoe::unigram_entropy_nats({1, 4}, 4), "token id 4 at position 1");
}

int main() {
    std::string dir_template = (std::filesystem::temp_directory_path() / "test_data_XXXXXX").string();
    if (!mkdtemp(dir_template.data())) {
        std::perror("mkdtemp");
        return 1;
    }
    const std::string dir = dir_template;
    test_round_trip(dir);
    test_bad_files(dir);
    test_next_token_targets(dir);
    test_rank_slicing(dir);
    test_reset(dir);
    test_glob(dir);
    test_too_small_and_arguments(dir);
    test_bad_token_in_later_shard(dir);
    test_unigram_entropy();
    std::filesystem::remove_all(dir);
    return check::summary();
}
