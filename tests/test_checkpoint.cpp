// Tests of the checkpoint format (train/checkpoint.h): a bitwise round trip, a distinct clear refusal for
// every kind of damaged or mismatched file (each byte flipped in the header or payload, truncation,
// trailing bytes, steps out of range, counts, model fields, batch shape, NaN/Inf and negative second
// moments, version 1, foreign files), saves that fail without touching the previous checkpoint or leaving
// temporary files, and two writers of one path.
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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

// The version-2 layout: 19 int64 header words, the header checksum, the payload, the file checksum.
constexpr size_t kHeaderWords = 6 + 10 + 3;
constexpr size_t kPayloadAt = 8 * (kHeaderWords + 1);
enum Word { kMagic, kVersion, kStep, kParams, kBiases, kFields, kFirstField, kB = 16, kT = 17, kGradAccum = 18 };

static void set_word(std::vector<unsigned char>& b, size_t word, int64_t value) {
    std::memcpy(b.data() + 8 * word, &value, 8);
}
static void set_float(std::vector<unsigned char>& b, size_t index, float value) {
    std::memcpy(b.data() + kPayloadAt + 4 * index, &value, 4);
}
// Recomputes both checksums, as a writer that meant those bytes would have.
static void reseal(std::vector<unsigned char>& b) {
    uint64_t h = lmoe::fnv1a64(lmoe::kFnvOffset, b.data(), 8 * kHeaderWords);
    std::memcpy(b.data() + 8 * kHeaderWords, &h, 8);
    h = lmoe::fnv1a64(lmoe::kFnvOffset, b.data(), b.size() - 8);
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

int main() {
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
        CHECK_THROWS(load(bad), "checkpoint version 1 was written by an older trainer; version 1 is not supported");
        CHECK_THROWS(lmoe::checkpoint_step(bad), "version 1 is not supported");
        // a real version-1 header: magic, 1, step, P, Nb, 10 fields, then the payload with no checksum
        std::vector<int64_t> v1 = {lmoe::kCheckpointMagic, 1, 20, (int64_t)P, (int64_t)NB, 10, 0, 64, 2, 4, 256, 4, 16, 8, 32, 2};
        std::vector<unsigned char> raw(8 * v1.size() + 4 * (3 * P + NB));
        std::memcpy(raw.data(), v1.data(), 8 * v1.size());
        with(raw);
        CHECK_THROWS(load(bad), "version 1 is not supported");
        set_word(b, kVersion, 3);
        with(b);
        CHECK_THROWS(load(bad), "checkpoint version 3 is not supported (this trainer reads version 2)");
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
