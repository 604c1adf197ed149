// Checkpoints: everything needed to resume training exactly where it stopped (fp32 weights, AdamW
// moments, routing biases, the step), written atomically and durably, and refused with a clear message
// when they were written for another model or run shape, or are damaged. Host-only; the GPU trainers
// copy their buffers to the host to use it.
//
// Format, version 3 (native byte order: little-endian on every machine we build for):
//
//   int64  magic ("LMOE"), version (3)
//   int64  step, parameter count P, routing-bias count Nb, fingerprint field count F (10)
//   int64  the F fields of model_fingerprint, in its order
//   int64  B, T, grad_accum of the run that wrote it (the data position depends on them)
//   uint64 LaneHash64 of the header bytes above (a damaged header is reported as such, not as a
//          checkpoint of another model)
//   float  params[P], m[P], v[P], routing_bias[Nb]
//   uint64 LaneHash64 of every byte before it (header, header checksum and payload)
//
// Version 2 has the same layout with FNV-1a 64 checksums (byte by byte, the file's continuing from the
// header's state); it is read too, so runs saved in it resume. Version 1 (no checksum,
// no batch shape) is refused: resume such a run with the trainer that wrote it.
#pragma once
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/config.h"

namespace lmoe {

constexpr int64_t kCheckpointMagic = 0x4C4D4F45;  // "LMOE"
constexpr int64_t kCheckpointVersion = 3;          // the version written
constexpr int64_t kCheckpointOldestVersion = 2;    // the oldest version read (RunningChecksum knows both)
constexpr const char* kCheckpointVersionsRead = "versions 2 and 3";  // for the refusals' messages
constexpr int64_t kCheckpointMaxStep = int64_t(1) << 31;  // steps are int: [0, 2^31)

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

// The run-shape fields stored after the fingerprint: a resume with other values would read the data
// from another position, so it is refused, naming the flag.
inline std::vector<std::pair<const char*, int64_t>> run_shape(const Config& c) {
    return {{"--batch", c.B}, {"--seq-len", c.T}, {"--grad-accum", c.grad_accum}};
}

// FNV-1a, 64 bits, continued from `h` over `bytes` bytes: version 2's checksum.
constexpr uint64_t kFnvOffset = 14695981039346656037ull;
inline uint64_t fnv1a64(uint64_t h, const void* data, size_t bytes) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < bytes; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "checkpoints and LaneHash64 read little-endian words");

// LaneHash64, version 3's checksum, over n bytes (docs/checkpoint.md defines it for re-implementers):
//   the bytes, zero-padded to a multiple of 8, are little-endian words w_0 .. w_{m-1}, m = ceil(n / 8);
//   word w_j goes to lane i = j mod 4, a_i <- a_i * P + mix(w_j) mod 2^64, the lanes starting at 1, 2, 3, 4;
//   the checksum is h = mix(mix(mix(mix(n ^ a_0) ^ a_1) ^ a_2) ^ a_3).
// mix is a bijection and P is odd, so changing one word w_j moves its lane by
// (mix(w_j') - mix(w_j)) * P^k, which is not 0 mod 2^64; every final step is a bijection of h and of
// a_i. A change within one aligned 8-byte word (any flipped bit) is therefore always detected, other
// damage is missed with a chance of about 2^-64, and the zero padding cannot hide a change of length
// because n is mixed in. It is no defence against a deliberate forgery.
// Why four lanes: a lane's dependency chain is one multiply and one add per word, and mix depends on the
// data only, so the CPU overlaps the four chains and the mixes of the words ahead (FNV-1a waits on one
// multiply per byte). A lane's closed form, a_i = (i + 1) * P^m_i + sum_k mix(w_{4k+i}) * P^(m_i - 1 - k)
// over its m_i words, lets scripts/checkpoint.py compute it with vector operations.
// update() takes the bytes in any pieces: a partial 32-byte block waits in `pending_`, so the result
// depends on the bytes only, never on how they were split.
class LaneHash64 {
  public:
    static constexpr uint64_t kMultiplier = 0x9E3779B97F4A7C15ull;  // P: odd, bits spread (2^64 / golden ratio)
    // splitmix64's finalizer: invertible (each xor-shift and each multiply by an odd constant is), and
    // every input bit reaches every output bit
    static constexpr uint64_t mix(uint64_t x) {
        x ^= x >> 30;
        x *= 0xBF58476D1CE4E5B9ull;
        x ^= x >> 27;
        x *= 0x94D049BB133111EBull;
        return x ^ (x >> 31);
    }
    void update(const void* data, size_t bytes) {
        const unsigned char* p = static_cast<const unsigned char*>(data);
        length_ += bytes;
        if (pending_bytes_ > 0) {
            const size_t take = std::min(bytes, kBlock - pending_bytes_);
            std::memcpy(pending_ + pending_bytes_, p, take);
            pending_bytes_ += take;
            p += take;
            bytes -= take;
            if (pending_bytes_ < kBlock) return;
            absorb_block(lanes_, pending_);
            pending_bytes_ = 0;
        }
        uint64_t lanes[kLanes];  // a local copy stays in registers; stores to the member could alias `p`
        std::memcpy(lanes, lanes_, sizeof lanes);
        for (; bytes >= kBlock; p += kBlock, bytes -= kBlock) absorb_block(lanes, p);
        std::memcpy(lanes_, lanes, sizeof lanes);
        std::memcpy(pending_, p, bytes);
        pending_bytes_ = bytes;
    }
    // The checksum of every byte given so far; more may follow.
    uint64_t digest() const {
        uint64_t lanes[kLanes];
        std::memcpy(lanes, lanes_, sizeof lanes);
        unsigned char last[kBlock] = {};  // the partial block, zero-padded
        std::memcpy(last, pending_, pending_bytes_);
        for (size_t i = 0; i < (pending_bytes_ + 7) / 8; i++) lanes[i] = absorb(lanes[i], load_word(last + 8 * i));
        uint64_t h = length_;
        for (uint64_t a : lanes) h = mix(h ^ a);
        return h;
    }

  private:
    static constexpr size_t kLanes = 4, kBlock = 8 * kLanes;
    static uint64_t load_word(const unsigned char* p) {
        uint64_t w;
        std::memcpy(&w, p, sizeof w);
        return w;
    }
    static uint64_t absorb(uint64_t lane, uint64_t word) { return lane * kMultiplier + mix(word); }
    static void absorb_block(uint64_t* lanes, const unsigned char* p) {
        for (size_t i = 0; i < kLanes; i++) lanes[i] = absorb(lanes[i], load_word(p + 8 * i));
    }
    uint64_t lanes_[kLanes] = {1, 2, 3, 4};
    unsigned char pending_[kBlock] = {};
    size_t pending_bytes_ = 0;
    uint64_t length_ = 0;
};

// The checksum a checkpoint of `version` carries, fed the file's bytes in order: FNV-1a 64 for
// version 2, LaneHash64 for version 3. value() is the checksum of every byte fed so far (the header
// checksum is value() after the header, the file checksum value() after the payload).
class RunningChecksum {
  public:
    explicit RunningChecksum(int64_t version) : fnv_(version == 2) {}
    void update(const void* data, size_t bytes) {
        if (fnv_) fnv_state_ = fnv1a64(fnv_state_, data, bytes);
        else lane_hash_.update(data, bytes);
    }
    uint64_t value() const { return fnv_ ? fnv_state_ : lane_hash_.digest(); }

  private:
    bool fnv_;
    uint64_t fnv_state_ = kFnvOffset;
    LaneHash64 lane_hash_;
};

// What a checkpoint's header says (after it passed every check that needs no Config).
struct CheckpointHeader {
    int64_t step = 0, num_params = 0, bias_size = 0;
    std::vector<int64_t> fingerprint;  // model_fingerprint's values
    int64_t B = 0, T = 0, grad_accum = 0;
    int64_t bytes() const {            // the whole file's size
        return (int64_t)sizeof(int64_t) * (6 + (int64_t)fingerprint.size() + 3 + 1) +
               (int64_t)sizeof(float) * (3 * num_params + bias_size) + (int64_t)sizeof(uint64_t);
    }
};

namespace checkpoint_detail {

inline std::string system_reason() { return errno ? std::strerror(errno) : "unknown error"; }

// An open checkpoint being read: every read goes through the running checksum.
struct Reader {
    std::string path;
    std::FILE* f = nullptr;
    RunningChecksum checksum{kCheckpointVersion};  // replaced by the file's version's once it is read
    explicit Reader(const std::string& p) : path(p) {
        struct stat named;  // before opening: opening a FIFO would wait for a writer
        if (::stat(p.c_str(), &named) == 0 && !S_ISREG(named.st_mode))
            throw std::runtime_error(path + ": cannot open checkpoint: not a regular file");
        f = std::fopen(p.c_str(), "rb");
        if (!f) throw std::runtime_error(path + ": cannot open checkpoint: " + system_reason());
        struct stat st;
        if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) fail("not a regular file");
    }
    ~Reader() {
        if (f) std::fclose(f);
    }
    [[noreturn]] void fail(const std::string& why) {
        std::fclose(f);
        f = nullptr;
        throw std::runtime_error(path + ": " + why);
    }
    // A mismatch with this run's flags rather than a bad file: the trainers exit 2 for it.
    [[noreturn]] void fail_config(const std::string& why) {
        std::fclose(f);
        f = nullptr;
        throw ConfigError(path + ": " + why);
    }
    // Reads exactly `bytes` or fails with `short_why` (or the system's reason on a read error).
    void read(void* dst, size_t bytes, const char* short_why) {
        if (std::fread(dst, 1, bytes, f) != bytes) {
            if (std::ferror(f)) fail(std::string("reading the checkpoint failed: ") + system_reason());
            fail(short_why);
        }
        checksum.update(dst, bytes);
    }
    int64_t read_i64(const char* short_why) {
        int64_t x;
        read(&x, sizeof x, short_why);
        return x;
    }
    // A float array, read in chunks straight into `dst` (no second copy of the payload).
    void read_floats(std::vector<float>& dst, const char* short_why) {
        constexpr size_t kChunk = 1 << 20;
        for (size_t i = 0; i < dst.size(); i += kChunk)
            read(dst.data() + i, sizeof(float) * std::min(kChunk, dst.size() - i), short_why);
    }
};

// Reads and checks the header: magic, version, field count, header checksum, step range, counts
// within what the file's size can hold. Leaves `r` at the payload.
inline CheckpointHeader read_header(Reader& r) {
    const char* short_header = "checkpoint is truncated (shorter than its header)";
    int64_t magic_version[2];
    if (std::fread(magic_version, sizeof(int64_t), 2, r.f) != 2)
        r.fail("not a checkpoint of this trainer (shorter than 16 bytes)");
    if (magic_version[0] != kCheckpointMagic) r.fail("not a checkpoint of this trainer (no LMOE magic number at its start)");
    const int64_t version = magic_version[1];
    if (version == 1)
        r.fail("checkpoint version 1 was written by an older trainer; version 1 is not supported (this trainer "
               "reads " + std::string(kCheckpointVersionsRead) + ")");
    if (version < kCheckpointOldestVersion || version > kCheckpointVersion)
        r.fail("checkpoint version " + std::to_string(version) + " is not supported (this trainer reads " +
               kCheckpointVersionsRead + ")");
    r.checksum = RunningChecksum(version);
    r.checksum.update(magic_version, sizeof magic_version);
    CheckpointHeader h;
    h.step = r.read_i64(short_header);
    h.num_params = r.read_i64(short_header);
    h.bias_size = r.read_i64(short_header);
    const int64_t fields = r.read_i64(short_header);
    const int64_t expected_fields = (int64_t)model_fingerprint(Config{}).size();
    if (fields != expected_fields)
        r.fail("checkpoint header has " + std::to_string(fields) + " model fields, this trainer expects " +
               std::to_string(expected_fields) + " (a corrupt or foreign checkpoint)");
    h.fingerprint.resize(fields);
    r.read(h.fingerprint.data(), sizeof(int64_t) * fields, short_header);
    h.B = r.read_i64(short_header);
    h.T = r.read_i64(short_header);
    h.grad_accum = r.read_i64(short_header);
    const uint64_t computed = r.checksum.value();
    uint64_t stored;
    r.read(&stored, sizeof stored, short_header);
    if (stored != computed) r.fail("checkpoint is corrupt (checksum mismatch) in its header");
    if (h.step < 0 || h.step >= kCheckpointMaxStep)
        r.fail("checkpoint holds step " + std::to_string(h.step) + ", outside 0 .. 2^31-1 (a corrupt checkpoint)");
    if (h.num_params < 0 || h.bias_size < 0)
        r.fail("checkpoint holds a negative count (" + std::to_string(h.num_params) + " parameters, " +
               std::to_string(h.bias_size) + " routing biases)");
    return h;
}

// Fails unless `values` are all finite (and, with `non_negative`, all >= 0).
inline void check_values(Reader& r, const std::vector<float>& values, const char* what, bool non_negative) {
    for (size_t i = 0; i < values.size(); i++) {
        if (!std::isfinite(values[i]))
            r.fail(std::string("checkpoint has a non-finite value (") + std::to_string(values[i]) + ") in its " + what +
                   " at index " + std::to_string(i));
        if (non_negative && values[i] < 0)
            r.fail(std::string("checkpoint has a negative value (") + std::to_string(values[i]) + ") in its " + what +
                   " at index " + std::to_string(i));
    }
}

// Writes through the running checksum; remembers the first failure's errno.
struct Writer {
    std::FILE* f;
    RunningChecksum checksum{kCheckpointVersion};
    bool ok = true;
    int error = 0;
    void write(const void* src, size_t bytes) {
        if (!ok || bytes == 0) return;
        errno = 0;
        if (std::fwrite(src, 1, bytes, f) != bytes) {
            ok = false;
            error = errno ? errno : EIO;
            return;
        }
        checksum.update(src, bytes);
    }
    void write_floats(const std::vector<float>& src) {
        constexpr size_t kChunk = 1 << 20;
        for (size_t i = 0; i < src.size() && ok; i += kChunk)
            write(src.data() + i, sizeof(float) * std::min(kChunk, src.size() - i));
    }
};

// A temporary name no other writer (thread, process, or machine sharing the folder) picks.
inline std::string temp_path(const std::string& path) {
    static std::atomic<uint64_t> counter{0};
    static const uint32_t salt = std::random_device{}();
    char tail[64];
    std::snprintf(tail, sizeof tail, ".tmp.%ld.%08x%llx", (long)getpid(), salt,
                  (unsigned long long)counter.fetch_add(1));
    return path + tail;
}

}  // namespace checkpoint_detail

// Writes PATH.tmp.<pid>.<unique>, syncs it to disk, renames it to PATH and syncs the folder, so an
// interruption never leaves a broken checkpoint, and two writers of one path never share a temp file.
// PATH must be a regular file or absent. On failure the temp file is removed and the error names the
// system's reason.
inline void save_checkpoint(const std::string& path, const Config& c, const TrainingState& s) {
    if (s.m.size() != s.params.size() || s.v.size() != s.params.size() || s.step < 0)
        throw std::logic_error(path + ": save_checkpoint: moments and parameters differ in size, or step < 0");
    // the rename would replace whatever is there: never a device, a pipe or a folder (as root, a run with
    // --checkpoint /dev/null would otherwise turn /dev/null into a regular file)
    struct stat existing;
    if (::stat(path.c_str(), &existing) == 0 && !S_ISREG(existing.st_mode))
        throw std::runtime_error(path + ": is " + (S_ISDIR(existing.st_mode) ? "a directory" : "not a regular file") +
                                 "; a checkpoint is never written over it");
    const std::string tmp = checkpoint_detail::temp_path(path);
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
        throw std::runtime_error(path + ": cannot create the temporary checkpoint file " + tmp + ": " +
                                 checkpoint_detail::system_reason());
    std::FILE* f = fdopen(fd, "wb");
    if (!f) {
        const int e = errno;
        ::close(fd);
        std::remove(tmp.c_str());
        throw std::runtime_error(path + ": cannot write checkpoint: " + std::strerror(e));
    }
    checkpoint_detail::Writer w{f};
    std::vector<int64_t> header = {kCheckpointMagic, kCheckpointVersion, s.step, (int64_t)s.params.size(),
                                   (int64_t)s.routing_bias.size()};
    const auto fingerprint = model_fingerprint(c);
    header.push_back((int64_t)fingerprint.size());
    for (const auto& field : fingerprint) header.push_back(field.second);
    for (const auto& field : run_shape(c)) header.push_back(field.second);
    w.write(header.data(), sizeof(int64_t) * header.size());
    const uint64_t header_hash = w.checksum.value();
    w.write(&header_hash, sizeof header_hash);
    for (const std::vector<float>* part : {&s.params, &s.m, &s.v, &s.routing_bias}) w.write_floats(*part);
    const uint64_t file_hash = w.checksum.value();
    w.write(&file_hash, sizeof file_hash);
    auto fail = [&](int e, const std::string& what) {
        std::remove(tmp.c_str());
        throw std::runtime_error(path + ": " + what + ": " + std::strerror(e));
    };
    if (!w.ok) {
        std::fclose(f);
        fail(w.error, "writing the checkpoint failed");
    }
    if (std::fflush(f) != 0 || fsync(fileno(f)) != 0) {
        const int e = errno;
        std::fclose(f);
        fail(e, "writing the checkpoint failed");
    }
    if (std::fclose(f) != 0) fail(errno, "writing the checkpoint failed");
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(errno, "cannot rename " + tmp + " to the checkpoint");
    // the rename itself reaches the disk only with the folder
    std::string dir = std::filesystem::path(path).parent_path().string();
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        throw std::runtime_error(path + ": saved, but cannot open its folder to sync it: " +
                                 checkpoint_detail::system_reason());
    // EINVAL: a file system that cannot sync a folder (nothing more to do there)
    if (fsync(dfd) != 0 && errno != EINVAL) {
        const int e = errno;
        ::close(dfd);
        throw std::runtime_error(path + ": saved, but syncing its folder failed: " + std::strerror(e));
    }
    ::close(dfd);
}

// The step a checkpoint was saved at, from its header (magic, version, header checksum and the step's
// range checked; the payload not read): for agreeing on the resumed step before loading.
inline int32_t checkpoint_step(const std::string& path) {
    checkpoint_detail::Reader r(path);
    return (int32_t)checkpoint_detail::read_header(r).step;
}

// Reads a checkpoint for the model `c`; this rank holds `num_params` parameters and `bias_size`
// routing biases (its shard under Head Parallel). Every header field is checked before it is used,
// the sizes before anything is allocated; then the checksum and the values (finite, v >= 0). Throws
// ConfigError (exit 2) when this run's B, T or grad_accum differ and `check_run_shape` (a run that
// trains on reads the data from the checkpoint's position; generation reads none), std::runtime_error
// for the rest.
inline TrainingState load_checkpoint(const std::string& path, const Config& c, int64_t num_params, int64_t bias_size,
                                     bool check_run_shape = true) {
    checkpoint_detail::Reader r(path);
    const CheckpointHeader h = checkpoint_detail::read_header(r);
    const auto fingerprint = model_fingerprint(c);
    for (size_t i = 0; i < fingerprint.size(); i++)
        if (h.fingerprint[i] != fingerprint[i].second)
            r.fail(std::string("checkpoint was written for another model: ") + fingerprint[i].first + " " +
                   std::to_string(h.fingerprint[i]) + " there, " + std::to_string(fingerprint[i].second) + " here");
    if (h.num_params != num_params)  // the fingerprint holds no router: LocMoE's ε replaces the (d, E) matrix
        r.fail("checkpoint holds " + std::to_string(h.num_params) + " parameters, this rank needs " +
               std::to_string(num_params) + " (another number of ranks" +
               (c.ffn == FfnKind::MoE ? ", or the other --router?)" : "?)"));
    if (h.bias_size != bias_size)
        r.fail("checkpoint holds " + std::to_string(h.bias_size) + " routing biases, this rank needs " +
               std::to_string(bias_size) + " (another number of ranks?)");
    const int64_t stored_shape[3] = {h.B, h.T, h.grad_accum};
    const auto shape = run_shape(c);
    for (size_t i = 0; i < shape.size() && check_run_shape; i++)
        if (stored_shape[i] != shape[i].second)
            r.fail_config(std::string("checkpoint was written with ") + shape[i].first + " " + std::to_string(stored_shape[i]) +
                   ", this run has " + shape[i].first + " " + std::to_string(shape[i].second) +
                   " (the data position would differ)");
    struct stat st;
    if (fstat(fileno(r.f), &st) == 0 && (int64_t)st.st_size != h.bytes())
        r.fail(std::string((int64_t)st.st_size < h.bytes() ? "checkpoint is truncated" : "checkpoint has trailing bytes") +
               " (" + std::to_string((int64_t)st.st_size) + " bytes, its header promises " +
               std::to_string(h.bytes()) + ")");
    TrainingState s;
    s.step = (int)h.step;
    s.params.resize(num_params);
    s.m.resize(num_params);
    s.v.resize(num_params);
    s.routing_bias.resize(bias_size);
    for (std::vector<float>* part : {&s.params, &s.m, &s.v, &s.routing_bias})
        r.read_floats(*part, "checkpoint is truncated");
    const uint64_t computed = r.checksum.value();
    uint64_t stored;
    r.read(&stored, sizeof stored, "checkpoint is truncated");
    char extra;
    if (std::fread(&extra, 1, 1, r.f) == 1) r.fail("checkpoint has trailing bytes");
    if (stored != computed) r.fail("checkpoint is corrupt (checksum mismatch)");
    checkpoint_detail::check_values(r, s.params, "parameters", false);
    checkpoint_detail::check_values(r, s.m, "first moment (AdamW m)", false);
    checkpoint_detail::check_values(r, s.v, "second moment (AdamW v)", true);
    checkpoint_detail::check_values(r, s.routing_bias, "routing biases", false);
    return s;
}

// Rank r of R > 1 keeps its own checkpoint file (its expert shard), PATH.rank<r>.
inline std::string rank_path(const std::string& path, int rank, int world) {
    return world == 1 ? path : path + ".rank" + std::to_string(rank);
}

}  // namespace lmoe
