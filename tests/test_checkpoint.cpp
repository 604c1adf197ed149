// Tests of the checkpoint format (train/checkpoint.h): LaneHash64 against its definition and known values,
// the same however its input is split (every cut, three pieces, byte by byte, random pieces), and changed
// by any flipped bit or appended zero byte; a bitwise round trip of version 3, and a version-2 file
// (FNV-1a checksums) read as well; a distinct clear refusal for every kind of damaged or mismatched file
// (each byte flipped in the header or payload, truncation, trailing bytes, steps out of range, counts,
// model fields, batch shape, NaN/Inf and negative second moments, versions 1 and 4, foreign files), saves
// that fail without touching the previous checkpoint or leaving temporary files, and two writers of one
// path. Prints the hashes' speed (not checked).
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tests/check.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;
using lmoe::Config;
using lmoe::TrainingState;

static std::vector<unsigned char> read_bytes(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) { std::fprintf(stderr, "cannot read %s\n", path.c_str()); std::exit(1); }
    std::vector<unsigned char> b;
    int ch;
    while ((ch = std::fgetc(f)) != EOF) b.push_back((unsigned char)ch);
    std::fclose(f);
    return b;
}

static void write_bytes(const std::string& path, const std::vector<unsigned char>& b) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(b.data(), 1, b.size(), f) != b.size()) {
        std::fprintf(stderr, "cannot write test file %s\n", path.c_str());
        std::exit(1);
    }
    std::fclose(f);
}

// The layout of versions 2 and 3: 19 int64 header words, the header checksum, the payload, the file checksum.
constexpr size_t kHeaderWords = 6 + 10 + 3;
constexpr size_t kPayloadAt = 8 * (kHeaderWords + 1);
enum Word { kMagic, kVersion, kStep, kParams, kBiases, kFields, kFirstField, kB = 16, kT = 17, kGradAccum = 18 };

static void set_word(std::vector<unsigned char>& b, size_t word, int64_t value) {
    std::memcpy(b.data() + 8 * word, &value, 8);
}
static int64_t get_word(const std::vector<unsigned char>& b, size_t word) {
    int64_t value;
    std::memcpy(&value, b.data() + 8 * word, 8);
    return value;
}
static void set_float(std::vector<unsigned char>& b, size_t index, float value) {
    std::memcpy(b.data() + kPayloadAt + 4 * index, &value, 4);
}

// The two checksums written out from their definitions (docs/checkpoint.md), one byte or word at a
// time, independent of the streaming code under test.
static uint64_t reference_fnv1a64(const unsigned char* p, size_t n) {
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}
static uint64_t reference_mix(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
static uint64_t reference_lane_hash(const unsigned char* p, size_t n) {
    uint64_t lanes[4] = {1, 2, 3, 4};
    for (size_t j = 0; 8 * j < n; j++) {
        uint64_t w = 0;  // little-endian, zero-padded past the end
        for (size_t k = 0; k < 8 && 8 * j + k < n; k++) w |= uint64_t(p[8 * j + k]) << (8 * k);
        lanes[j % 4] = lanes[j % 4] * 0x9E3779B97F4A7C15ull + reference_mix(w);
    }
    uint64_t h = n;
    for (uint64_t a : lanes) h = reference_mix(h ^ a);
    return h;
}
static uint64_t lane_hash(const unsigned char* p, size_t n) {
    lmoe::LaneHash64 h;
    h.update(p, n);
    return h.digest();
}
// The checksum a checkpoint of `version` carries over its first `n` bytes.
static uint64_t reference_checksum(int64_t version, const unsigned char* p, size_t n) {
    return version == 2 ? reference_fnv1a64(p, n) : reference_lane_hash(p, n);
}
// Recomputes both checksums for the version the file says, as a writer that meant those bytes would have.
static void reseal(std::vector<unsigned char>& b) {
    const int64_t version = get_word(b, kVersion);
    uint64_t h = reference_checksum(version, b.data(), 8 * kHeaderWords);
    std::memcpy(b.data() + 8 * kHeaderWords, &h, 8);
    h = reference_checksum(version, b.data(), b.size() - 8);
    std::memcpy(b.data() + b.size() - 8, &h, 8);
}

static TrainingState make_state(int step, size_t P, size_t nb, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    TrainingState s;
    s.step = step;
    for (size_t i = 0; i < P; i++) {
        s.params.push_back(normal(rng));
        s.m.push_back(normal(rng) * 1e-3f);
        s.v.push_back(std::fabs(normal(rng)) * 1e-6f);
    }
    for (size_t i = 0; i < nb; i++) s.routing_bias.push_back(normal(rng) * 1e-2f);
    return s;
}

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}
static bool same_state(const TrainingState& a, const TrainingState& b) {
    return a.step == b.step && same_bits(a.params, b.params) && same_bits(a.m, b.m) && same_bits(a.v, b.v) &&
           same_bits(a.routing_bias, b.routing_bias);
}

// Files in `dir` whose name holds ".tmp" (a save's leftovers).
static int temp_files(const std::string& dir) {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir))
        if (e.path().filename().string().find(".tmp") != std::string::npos) n++;
    return n;
}

// LaneHash64 alone: its definition, pieces, flipped bits, lengths, speed.
static void test_lane_hash() {
    std::mt19937_64 rng(7);
    std::vector<unsigned char> data(5000);
    for (unsigned char& x : data) x = (unsigned char)rng();
    {  // known values (docs/checkpoint.md lists them): the bytes 0, 1, ..., n-1
        std::vector<unsigned char> counting(100);
        for (size_t i = 0; i < counting.size(); i++) counting[i] = (unsigned char)i;
        const std::pair<size_t, uint64_t> known[] = {
            {0, 0xe96f4b88d51c8eeaull},  {1, 0xde59611246bc83f8ull},  {7, 0xf9c237fe1fb10696ull},
            {8, 0x3c0875c6f84fe64aull},  {31, 0xdb398549c09d38cdull}, {32, 0x2c674036a1edf262ull},
            {33, 0x83146933bb3c673aull}, {100, 0xf7cb7185cc3825dfull}};
        for (const auto& [n, value] : known) {
            CHECK_MSG(lane_hash(counting.data(), n) == value, "bytes 0 .. " + std::to_string(n) + " - 1");
            CHECK(reference_lane_hash(counting.data(), n) == value);
        }
        CHECK(lane_hash((const unsigned char*)"abc", 3) == 0x417896f3fc0513deull);
    }
    {  // every length 0 .. 100 and some longer ones: the definition, and the same over any split
        std::vector<size_t> lengths;
        for (size_t n = 0; n <= 100; n++) lengths.push_back(n);
        for (size_t n : {255, 256, 257, 1000, 4093, 5000}) lengths.push_back(n);
        int wrong = 0, splits = 0;
        for (size_t n : lengths) {
            const unsigned char* p = data.data();
            const uint64_t whole = reference_lane_hash(p, n);
            wrong += lane_hash(p, n) != whole;
            // two pieces, at every cut (every cut of the long ones would be slow: every 7th)
            for (size_t cut = 0; cut <= n; cut += n <= 100 ? 1 : 7) {
                lmoe::LaneHash64 h;
                h.update(p, cut);
                const uint64_t prefix = h.digest();  // a digest in between does not disturb the state
                h.update(p + cut, n - cut);
                wrong += h.digest() != whole || prefix != reference_lane_hash(p, cut);
                splits++;
            }
            // three pieces with both cuts inside one 32-byte block, then byte by byte, then random pieces
            for (size_t a = 0; a + 2 <= n && a < 64; a += 3) {
                lmoe::LaneHash64 h;
                h.update(p, a);
                h.update(p + a, 1);
                h.update(p + a + 1, n - a - 1);
                wrong += h.digest() != whole;
                splits++;
            }
            lmoe::LaneHash64 bytewise, random_pieces;
            for (size_t i = 0; i < n; i++) bytewise.update(p + i, 1);
            for (size_t i = 0; i < n;) {
                const size_t piece = std::min<size_t>(n - i, rng() % 70);
                random_pieces.update(p + i, piece);
                i += piece;
            }
            random_pieces.update(p, 0);  // an empty piece changes nothing
            wrong += bytewise.digest() != whole || random_pieces.digest() != whole;
            splits += 2;
        }
        CHECK_MSG(wrong == 0, std::to_string(wrong) + " of " + std::to_string(splits + lengths.size()) +
                                  " hashes differ from the definition");
    }
    {  // one flipped bit anywhere, in lengths around the word and block sizes, always changes the hash
        int missed = 0, flips = 0;
        for (size_t n : {1, 7, 8, 9, 31, 32, 33, 100, 257}) {
            std::vector<unsigned char> b(data.begin(), data.begin() + n);
            const uint64_t clean = lane_hash(b.data(), n);
            for (size_t bit = 0; bit < 8 * n; bit++) {
                b[bit / 8] ^= (unsigned char)(1u << (bit % 8));
                missed += lane_hash(b.data(), n) == clean;
                b[bit / 8] ^= (unsigned char)(1u << (bit % 8));
                flips++;
            }
        }
        CHECK_MSG(missed == 0, std::to_string(missed) + " of " + std::to_string(flips) + " flipped bits missed");
        // zero bytes appended (what the padding adds) change it too: the length is mixed in
        std::vector<unsigned char> zeros(40, 0);
        int same = 0;
        for (size_t n = 0; n < 40; n++)
            for (size_t more = 1; n + more <= 40 && more <= 8; more++)
                same += lane_hash(zeros.data(), n) == lane_hash(zeros.data(), n + more);
        CHECK_MSG(same == 0, std::to_string(same) + " zero-byte extensions hash alike");
        // two words swapped, within a lane and across lanes
        std::vector<unsigned char> b(data.begin(), data.begin() + 64);
        const uint64_t clean = lane_hash(b.data(), b.size());
        for (size_t other : {1, 4, 7}) {
            std::vector<unsigned char> swapped = b;
            std::memcpy(swapped.data(), b.data() + 8 * other, 8);
            std::memcpy(swapped.data() + 8 * other, b.data(), 8);
            CHECK(lane_hash(swapped.data(), swapped.size()) != clean);
        }
    }
    {  // speed on 256 MiB (printed, not checked: it depends on the machine)
        std::vector<unsigned char> big(256u << 20);
        for (size_t i = 0; i < big.size(); i += 8) {
            const uint64_t x = rng();
            std::memcpy(big.data() + i, &x, 8);
        }
        auto seconds = [](auto t0) { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
        auto t0 = std::chrono::steady_clock::now();
        const uint64_t lane = lane_hash(big.data(), big.size());
        const double lane_s = seconds(t0);
        const size_t fnv_bytes = big.size() / 4;
        t0 = std::chrono::steady_clock::now();
        const uint64_t fnv = lmoe::fnv1a64(lmoe::kFnvOffset, big.data(), fnv_bytes);
        const double fnv_s = seconds(t0);
        std::printf("LaneHash64 (version 3) %.2f GB/s over 256 MiB, FNV-1a 64 (version 2) %.2f GB/s over 64 MiB "
                    "(one core; %016llx %016llx)\n", big.size() / lane_s / 1e9, fnv_bytes / fnv_s / 1e9,
                    (unsigned long long)lane, (unsigned long long)fnv);
    }
}

int main() {
    test_lane_hash();
    const std::string dir = (fs::temp_directory_path() / ("test_checkpoint." + std::to_string(getpid()))).string();
    fs::remove_all(dir);
    fs::create_directories(dir);
    const Config c;  // the tiny defaults: B 16, T 32, grad_accum 1
    const size_t P = 3000, NB = 64;
    const TrainingState s = make_state(20, P, NB, 1);
    const std::string path = dir + "/a.ckpt";
    auto load = [&](const std::string& p) { return lmoe::load_checkpoint(p, c, P, NB); };

    // ---- round trip, and the layout this test relies on
    lmoe::save_checkpoint(path, c, s);
    CHECK(same_state(load(path), s));
    CHECK(lmoe::checkpoint_step(path) == 20);
    const std::vector<unsigned char> good = read_bytes(path);
    CHECK(good.size() == kPayloadAt + 4 * (3 * P + NB) + 8);
    CHECK(get_word(good, kVersion) == 3);
    {  // both checksums are LaneHash64 of every byte before them
        auto b = good;
        reseal(b);
        CHECK(b == good);
        uint64_t stored;
        std::memcpy(&stored, good.data() + 8 * kHeaderWords, 8);
        CHECK(stored == reference_lane_hash(good.data(), 8 * kHeaderWords));
    }
    CHECK(temp_files(dir) == 0);
    {  // an empty routing bias (the dense parts only) and step 0 round-trip too
        TrainingState z = make_state(0, 10, 0, 2);
        lmoe::save_checkpoint(dir + "/z.ckpt", c, z);
        CHECK(same_state(lmoe::load_checkpoint(dir + "/z.ckpt", c, 10, 0), z));
    }
    // a resealed copy of `good` with one change loads, so the checks below refuse only what they name
    {
        auto b = good;
        set_word(b, kStep, (int64_t(1) << 31) - 1);
        reseal(b);
        write_bytes(dir + "/maxstep.ckpt", b);
        CHECK(lmoe::checkpoint_step(dir + "/maxstep.ckpt") == 2147483647);
        CHECK(load(dir + "/maxstep.ckpt").step == 2147483647);
    }
    {  // version 2 (FNV-1a 64 checksums) loads; damage to it is refused
        auto v2 = good;
        set_word(v2, kVersion, 2);
        reseal(v2);
        const std::string old = dir + "/v2.ckpt";
        write_bytes(old, v2);
        CHECK(lmoe::checkpoint_step(old) == 20);
        CHECK(same_state(load(old), s));
        auto b = v2;
        b[kPayloadAt + 4 * P + 3] ^= 0x80;
        write_bytes(old, b);
        CHECK_THROWS(load(old), "checkpoint is corrupt (checksum mismatch)");
        b = v2;
        b[8 * kStep] ^= 0x01;
        write_bytes(old, b);
        CHECK_THROWS(load(old), "checkpoint is corrupt (checksum mismatch) in its header");
        // each version's checksum is checked as that version's: the other hash is refused
        b = good;
        set_word(b, kVersion, 2);
        write_bytes(old, b);
        CHECK_THROWS(load(old), "checkpoint is corrupt (checksum mismatch) in its header");
        b = v2;
        set_word(b, kVersion, 3);
        write_bytes(old, b);
        CHECK_THROWS(load(old), "checkpoint is corrupt (checksum mismatch) in its header");
        // a version-2 file whose payload checksum is LaneHash64's: the whole file is checked with FNV-1a
        b = v2;
        const uint64_t lane = reference_lane_hash(b.data(), b.size() - 8);
        std::memcpy(b.data() + b.size() - 8, &lane, 8);
        write_bytes(old, b);
        CHECK_THROWS(load(old), "checkpoint is corrupt (checksum mismatch)");
        // a save after loading a version-2 checkpoint writes version 3
        lmoe::save_checkpoint(old, c, load(dir + "/maxstep.ckpt"));
        CHECK(get_word(read_bytes(old), kVersion) == 3);
    }

    // ---- damaged files
    const std::string bad = dir + "/bad.ckpt";
    auto with = [&](std::vector<unsigned char> b) { write_bytes(bad, b); };
    {  // one byte flipped anywhere in the payload or the trailing checksum
        for (size_t at : {kPayloadAt, kPayloadAt + 4 * P + 1, kPayloadAt + 4 * (3 * P + NB) - 1, good.size() - 1}) {
            auto b = good;
            b[at] ^= 0x10;
            with(b);
            CHECK_THROWS(load(bad), "checkpoint is corrupt (checksum mismatch)");
        }
        int missed = 0;  // one bit at 97 places spread over the payload, each bit of a byte in turn
        for (size_t k = 0; k < 97; k++) {
            auto b = good;
            b[kPayloadAt + k * (good.size() - kPayloadAt - 1) / 96] ^= (unsigned char)(1u << (k % 8));
            with(b);
            bool refused = false;
            try { load(bad); } catch (const std::exception& e) {
                refused = std::string(e.what()).find("checkpoint is corrupt (checksum mismatch)") != std::string::npos;
            }
            missed += !refused;
        }
        CHECK_MSG(missed == 0, std::to_string(missed) + " of 97 flipped payload bits missed");
        // every header byte after magic and version, including the header checksum
        int refused = 0;
        for (size_t at = 16; at < kPayloadAt; at++) {
            auto b = good;
            b[at] ^= 0x01;
            with(b);
            try { load(bad); } catch (const std::exception& e) {
                const std::string w = e.what();
                refused += w.find("checksum mismatch) in its header") != std::string::npos ||
                           w.find("model fields") != std::string::npos;  // the field count, checked first
            }
        }
        CHECK_MSG(refused == (int)(kPayloadAt - 16), std::to_string(refused) + " of " +
                                                          std::to_string(kPayloadAt - 16) + " header bytes");
        auto b = good;
        b[8 * kStep] ^= 0x04;  // step 20 -> 16: plausible, but the header checksum knows
        with(b);
        CHECK_THROWS(load(bad), "checkpoint is corrupt (checksum mismatch) in its header");
        CHECK_THROWS(lmoe::checkpoint_step(bad), "checksum mismatch");
    }
    {  // truncated anywhere, or extended
        for (size_t keep : {good.size() - 1, good.size() - 8, kPayloadAt + 100, kPayloadAt, (size_t)100}) {
            with(std::vector<unsigned char>(good.begin(), good.begin() + keep));
            CHECK_THROWS(load(bad), "checkpoint is truncated");
        }
        // refused from the file's size, before the payload is allocated or read
        with(std::vector<unsigned char>(good.begin(), good.begin() + kPayloadAt));
        CHECK_THROWS(load(bad), "checkpoint is truncated (" + std::to_string(kPayloadAt) + " bytes, its header promises " +
                                    std::to_string(good.size()) + ")");
        with(std::vector<unsigned char>(good.begin(), good.begin() + 12));
        CHECK_THROWS(load(bad), "not a checkpoint of this trainer");
        with({});
        CHECK_THROWS(load(bad), "not a checkpoint of this trainer");
        auto b = good;
        b.push_back(0);
        with(b);
        CHECK_THROWS(load(bad), "checkpoint has trailing bytes (" + std::to_string(good.size() + 1) +
                                    " bytes, its header promises " + std::to_string(good.size()) + ")");
        b.insert(b.end(), good.begin(), good.end());  // two checkpoints glued together
        with(b);
        CHECK_THROWS(load(bad), "checkpoint has trailing bytes");
    }
    {  // steps outside [0, 2^31), even with valid checksums: refused, not wrapped
        for (int64_t step : {int64_t(-1), int64_t(-20), int64_t(1) << 31, int64_t(1) << 40, INT64_MIN, INT64_MAX}) {
            auto b = good;
            set_word(b, kStep, step);
            reseal(b);
            with(b);
            CHECK_THROWS(load(bad), "checkpoint holds step " + std::to_string(step) + ", outside 0 .. 2^31-1");
            CHECK_THROWS(lmoe::checkpoint_step(bad), "outside 0 .. 2^31-1");
        }
    }
    {  // counts: what this rank needs, checked before anything is allocated
        CHECK_THROWS(lmoe::load_checkpoint(path, c, P + 1, NB), "checkpoint holds 3000 parameters, this rank needs 3001");
        CHECK_THROWS(lmoe::load_checkpoint(path, c, P, NB / 2), "checkpoint holds 64 routing biases, this rank needs 32");
        for (int64_t count : {int64_t(1) << 60, INT64_MAX, int64_t(-1)}) {  // would be a huge or negative allocation
            auto b = good;
            set_word(b, kParams, count);
            reseal(b);
            with(b);
            CHECK_THROWS(load(bad), "checkpoint holds");
            set_word(b, kParams, P);
            set_word(b, kBiases, count);
            reseal(b);
            with(b);
            CHECK_THROWS(load(bad), "checkpoint holds");
        }
        auto b = good;
        set_word(b, kFields, 11);
        with(b);
        CHECK_THROWS(load(bad), "checkpoint header has 11 model fields, this trainer expects 10");
        set_word(b, kFields, int64_t(1) << 62);
        with(b);
        CHECK_THROWS(load(bad), "model fields");
    }
    {  // another model, another batch shape
        Config other = c;
        other.d = 128;
        CHECK_THROWS(lmoe::load_checkpoint(path, other, P, NB), "checkpoint was written for another model: d 64 there, 128 here");
        other = c;
        other.ffn = lmoe::FfnKind::MoE;
        CHECK_THROWS(lmoe::load_checkpoint(path, other, P, NB), "another model: ffn kind 0 there, 1 here");
        other = c;
        other.B = 8;
        CHECK_THROWS(lmoe::load_checkpoint(path, other, P, NB),
                     "checkpoint was written with --batch 16, this run has --batch 8");
        other = c;
        other.T = 64;
        CHECK_THROWS(lmoe::load_checkpoint(path, other, P, NB),
                     "checkpoint was written with --seq-len 32, this run has --seq-len 64");
        other = c;
        other.grad_accum = 4;
        CHECK_THROWS(lmoe::load_checkpoint(path, other, P, NB),
                     "checkpoint was written with --grad-accum 1, this run has --grad-accum 4");
        bool config_error = false;  // a flag that disagrees with the checkpoint: exit status 2, like other flags
        try { lmoe::load_checkpoint(path, other, P, NB); } catch (const lmoe::ConfigError&) { config_error = true; } catch (...) {}
        CHECK(config_error);
        other = c;
        other.steps = 5000;  // the step budget, learning rate, ... may change on a resume
        other.lr = 1e-4f;
        CHECK(same_state(lmoe::load_checkpoint(path, other, P, NB), s));
    }
    {  // values that no training run produces, written with valid checksums
        const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
        struct Case { size_t index; float value; const char* needle; };
        const Case cases[] = {
            {5, nan, "non-finite value (nan) in its parameters at index 5"},
            {P - 1, -inf, "non-finite value (-inf) in its parameters"},
            {P + 7, inf, "non-finite value (inf) in its first moment"},
            {P + 8, nan, "in its first moment"},
            {2 * P + 3, -1.f, "negative value (-1.000000) in its second moment"},
            {2 * P + 4, nan, "non-finite value (nan) in its second moment"},
            {3 * P + 1, inf, "non-finite value (inf) in its routing biases"},
        };
        for (const Case& k : cases) {
            auto b = good;
            set_float(b, k.index, k.value);
            reseal(b);
            with(b);
            CHECK_THROWS(load(bad), k.needle);
        }
        auto b = good;
        set_float(b, 2 * P, -0.f);  // -0 is >= 0
        set_float(b, 2 * P + 1, 0.f);
        set_float(b, 5, -1.f);  // negative weights and first moments are fine
        set_float(b, P + 5, -1.f);
        reseal(b);
        with(b);
        CHECK(load(bad).params[5] == -1.f);
        TrainingState n = s;  // save does not refuse NaN (the loop never saves after a non-finite loss)
        n.m[3] = nan;
        lmoe::save_checkpoint(bad, c, n);
        CHECK_THROWS(load(bad), "non-finite value (nan) in its first moment (AdamW m) at index 3");
    }
    {  // other versions, other files
        auto b = good;
        set_word(b, kVersion, 1);
        with(b);
        CHECK_THROWS(load(bad), "checkpoint version 1 was written by an older trainer; version 1 is not supported "
                                "(this trainer reads versions 2 and 3)");
        CHECK_THROWS(lmoe::checkpoint_step(bad), "version 1 is not supported");
        // a real version-1 header: magic, 1, step, P, Nb, 10 fields, then the payload with no checksum
        std::vector<int64_t> v1 = {lmoe::kCheckpointMagic, 1, 20, (int64_t)P, (int64_t)NB, 10, 0, 64, 2, 4, 256, 4, 16, 8, 32, 2};
        std::vector<unsigned char> raw(8 * v1.size() + 4 * (3 * P + NB));
        std::memcpy(raw.data(), v1.data(), 8 * v1.size());
        with(raw);
        CHECK_THROWS(load(bad), "version 1 is not supported");
        set_word(b, kVersion, 4);
        with(b);
        CHECK_THROWS(load(bad), "checkpoint version 4 is not supported (this trainer reads versions 2 and 3)");
        set_word(b, kVersion, -7);
        with(b);
        CHECK_THROWS(load(bad), "checkpoint version -7 is not supported");
        b = good;
        set_word(b, kMagic, 0x4C4D4F46);
        with(b);
        CHECK_THROWS(load(bad), "not a checkpoint of this trainer");
        b = good;
        b[7] = 1;  // the magic's high bytes
        with(b);
        CHECK_THROWS(load(bad), "not a checkpoint of this trainer");
        with(std::vector<unsigned char>(200, 'x'));
        CHECK_THROWS(load(bad), "not a checkpoint of this trainer");
        CHECK_THROWS(load(dir + "/missing.ckpt"), "missing.ckpt: cannot open checkpoint: No such file or directory");
        CHECK_THROWS(load(dir), "not a regular file");
    }

    // ---- saves that fail: the previous checkpoint stays as it was, no temporary file is left behind
    const TrainingState s2 = make_state(40, P, NB, 3);
    {  // the path is a folder or a pipe: refused and left as it is, never "(disk full?)"
        fs::create_directories(dir + "/sub/a_folder");
        CHECK_THROWS(lmoe::save_checkpoint(dir + "/sub/a_folder", c, s2),
                     "a_folder: is a directory; a checkpoint is never written over it");
        CHECK(fs::is_directory(dir + "/sub/a_folder"));
        CHECK(mkfifo((dir + "/sub/a_pipe").c_str(), 0644) == 0);
        CHECK_THROWS(lmoe::save_checkpoint(dir + "/sub/a_pipe", c, s2), "a_pipe: is not a regular file");
        CHECK(fs::is_fifo(dir + "/sub/a_pipe"));
        CHECK(temp_files(dir + "/sub") == 0);
        CHECK_THROWS(lmoe::save_checkpoint(dir + "/no/such/folder/x.ckpt", c, s2),
                     "cannot create the temporary checkpoint file " + dir + "/no/such/folder/x.ckpt.tmp.");
        CHECK_THROWS(lmoe::save_checkpoint(dir + "/no/such/folder/x.ckpt", c, s2), ": No such file or directory");
    }
    {  // the disk fills mid-write (a file-size limit, which holds for root too): EFBIG
        struct rlimit old;
        getrlimit(RLIMIT_FSIZE, &old);
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit small = old;
        small.rlim_cur = 16384;  // the header and a few thousand floats
        CHECK(setrlimit(RLIMIT_FSIZE, &small) == 0);
        CHECK_THROWS(lmoe::save_checkpoint(path, c, s2), "a.ckpt: writing the checkpoint failed: File too large");
        setrlimit(RLIMIT_FSIZE, &old);
        signal(SIGXFSZ, SIG_DFL);
        CHECK(read_bytes(path) == good);
        CHECK(same_state(load(path), s));
        CHECK(temp_files(dir) == 0);
    }
    if (geteuid() != 0) {  // a read-only folder (root ignores permissions, so only as another user)
        const std::string ro = dir + "/readonly";
        fs::create_directories(ro);
        lmoe::save_checkpoint(ro + "/a.ckpt", c, s);
        chmod(ro.c_str(), 0555);
        CHECK_THROWS(lmoe::save_checkpoint(ro + "/a.ckpt", c, s2), "Permission denied");
        chmod(ro.c_str(), 0755);
        CHECK(same_state(lmoe::load_checkpoint(ro + "/a.ckpt", c, P, NB), s));
        CHECK(temp_files(ro) == 0);
    } else {
        std::printf("running as root: the read-only folder case is skipped (the file-size limit case stands in)\n");
    }

    // ---- two writers of one path (two runs sharing --checkpoint): every save succeeds, the file is one of them
    {
        const std::string shared = dir + "/shared.ckpt";
        pid_t kids[2];
        for (int k = 0; k < 2; k++) {
            kids[k] = fork();
            if (kids[k] == 0) {
                const TrainingState mine = k == 0 ? s : s2;
                try {
                    for (int i = 0; i < 30; i++) lmoe::save_checkpoint(shared, c, mine);
                } catch (const std::exception& e) {
                    std::fprintf(stderr, "writer %d: %s\n", k, e.what());
                    _exit(1);
                }
                _exit(0);
            }
        }
        for (pid_t kid : kids) {
            int status = 0;
            waitpid(kid, &status, 0);
            CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
        const TrainingState got = load(shared);
        CHECK(same_state(got, s) || same_state(got, s2));
        CHECK(temp_files(dir) == 0);
        lmoe::save_checkpoint(shared, c, s2);  // and a plain overwrite
        CHECK(same_state(load(shared), s2));
    }

    fs::remove_all(dir);
    return check::summary();
}
