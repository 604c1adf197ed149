// llm.c token shards: a header of 256 int32 (magic, version, token count, vocabulary size) followed by
// the tokens as uint16. Shards written by llm.c's own scripts (TinyShakespeare, TinyStories, FineWeb)
// read unchanged; they leave header[3] at 0, which we take to mean "vocabulary size not recorded".
// Every way a file can be wrong gets its own message naming the file, so a bad path or a foreign file
// fails at startup with a clear reason instead of training on garbage.
#pragma once
#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace lmoe {

constexpr int32_t kShardMagic = 20240520, kShardVersion = 1;
constexpr int kShardHeaderInts = 256;
constexpr int64_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);
constexpr int kMaxShardVocab = 65536;  // tokens are uint16

struct ShardInfo {
    int64_t num_tokens;
    int vocab_size;  // 0 = not recorded (llm.c shard)
};

// Closes a FILE* on every path out of a function, including the throwing ones.
struct ShardFile {
    std::FILE* f = nullptr;
    ~ShardFile() { if (f) std::fclose(f); }
};

// Why the last read or write fell short: errno when the C library set one, else `otherwise` (a read
// can only fall short without errno if the file shrank after we measured it).
inline std::string io_failure_reason(const char* otherwise) { return errno ? std::strerror(errno) : otherwise; }

// Opens `path` for reading, or says why it cannot (missing, a directory or other non-file, no permission).
inline std::FILE* open_shard_for_reading(const std::string& path, int64_t* file_bytes) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0)
        throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
    if (S_ISDIR(st.st_mode)) throw std::runtime_error(path + ": cannot open: is a directory, not a shard file");
    // a FIFO would block the open until some writer came, a device could read for ever: shards are files
    if (!S_ISREG(st.st_mode))
        throw std::runtime_error(path + ": cannot open: not a regular file (a FIFO, device or socket), not a shard");
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
    *file_bytes = static_cast<int64_t>(st.st_size);
    return f;
}

// Writes tokens as an llm.c shard. vocab_size goes into header[3] so readers can tell a shard made for
// a larger vocabulary from one they can use; 0 writes an llm.c-style shard that records none.
inline void write_shard(const std::string& path, const std::vector<uint16_t>& tokens, int vocab_size) {
    if (vocab_size < 0 || vocab_size > kMaxShardVocab)
        throw std::runtime_error(path + ": cannot write: vocabulary size " + std::to_string(vocab_size) +
                                 " is outside 0.." + std::to_string(kMaxShardVocab));
    if (tokens.empty()) throw std::runtime_error(path + ": cannot write: no tokens");
    if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
        throw std::runtime_error(path + ": cannot write: " + std::to_string(tokens.size()) +
                                 " tokens exceed the int32 count of the llm.c header; split the text");
    if (vocab_size > 0)
        for (size_t i = 0; i < tokens.size(); i++)
            if (tokens[i] >= vocab_size)
                throw std::runtime_error(path + ": cannot write: token id " + std::to_string(tokens[i]) +
                                         " at position " + std::to_string(i) + " is >= vocabulary size " +
                                         std::to_string(vocab_size));
    int32_t header[kShardHeaderInts] = {};
    header[0] = kShardMagic;
    header[1] = kShardVersion;
    header[2] = static_cast<int32_t>(tokens.size());
    header[3] = vocab_size;
    ShardFile file;
    file.f = std::fopen(path.c_str(), "wb");
    if (!file.f) throw std::runtime_error(path + ": cannot create: " + std::strerror(errno));
    errno = 0;
    bool ok = std::fwrite(header, sizeof(int32_t), kShardHeaderInts, file.f) == sizeof(header) / sizeof(int32_t) &&
              std::fwrite(tokens.data(), sizeof(uint16_t), tokens.size(), file.f) == tokens.size();
    ok = (std::fclose(file.f) == 0) && ok;
    file.f = nullptr;
    if (!ok) {
        std::string reason = io_failure_reason("short write");
        std::remove(path.c_str());  // a half-written shard would only fail later as "truncated"
        throw std::runtime_error(path + ": write failed: " + reason);
    }
}

// Reads the header from an open shard and checks it against the file's length, so a truncated download
// or a file of some other format is caught before any token is used.
inline ShardInfo read_shard_header_from(const std::string& path, std::FILE* f, int64_t file_bytes) {
    if (file_bytes < kShardHeaderBytes)
        throw std::runtime_error(path + ": shorter than the " + std::to_string(kShardHeaderBytes) +
                                 "-byte llm.c shard header (file is " + std::to_string(file_bytes) + " bytes)");
    int32_t header[kShardHeaderInts];
    errno = 0;
    if (std::fread(header, sizeof(int32_t), kShardHeaderInts, f) != sizeof(header) / sizeof(int32_t))
        throw std::runtime_error(path + ": cannot read header: " + io_failure_reason("file shrank while being read"));
    if (header[0] != kShardMagic)
        throw std::runtime_error(path + ": not an llm.c token shard (magic " + std::to_string(header[0]) +
                                 ", expected " + std::to_string(kShardMagic) + ")");
    if (header[1] != kShardVersion)
        throw std::runtime_error(path + ": unsupported shard version " + std::to_string(header[1]) +
                                 " (only version 1, uint16 tokens, is supported; version 2 holds uint32 tokens)");
    int64_t num_tokens = header[2];
    int vocab_size = header[3];
    if (num_tokens < 0)
        throw std::runtime_error(path + ": corrupt header: negative token count " + std::to_string(num_tokens));
    if (num_tokens == 0) throw std::runtime_error(path + ": holds zero tokens");
    if (vocab_size < 0 || vocab_size > kMaxShardVocab)
        throw std::runtime_error(path + ": corrupt header: vocabulary size " + std::to_string(vocab_size) +
                                 " is outside 0.." + std::to_string(kMaxShardVocab));
    int64_t data_bytes = file_bytes - kShardHeaderBytes;
    int64_t declared_bytes = num_tokens * static_cast<int64_t>(sizeof(uint16_t));
    if (data_bytes < declared_bytes)
        throw std::runtime_error(path + ": truncated: header says " + std::to_string(num_tokens) +
                                 " tokens, file holds " + std::to_string(data_bytes / 2));
    if (data_bytes > declared_bytes)
        throw std::runtime_error(path + ": trailing bytes: header says " + std::to_string(num_tokens) +
                                 " tokens (" + std::to_string(declared_bytes) + " bytes), file has " +
                                 std::to_string(data_bytes) + " bytes after the header");
    return ShardInfo{num_tokens, vocab_size};
}

// A shard made for a larger vocabulary (a GPT-2 shard fed to a byte-level model) may hold ids the model
// has no embedding for; catch that from the header before reading any token.
inline void check_shard_vocab(const std::string& path, const ShardInfo& info, int vocab_size) {
    if (info.vocab_size > vocab_size)
        throw std::runtime_error(path + ": shard was made for a vocabulary of " + std::to_string(info.vocab_size) +
                                 " tokens, larger than the vocabulary size " + std::to_string(vocab_size) +
                                 " asked for");
}

// Validates a shard's header without reading its tokens: cheap enough to check every shard at startup.
inline ShardInfo read_shard_header(const std::string& path) {
    ShardFile file;
    int64_t file_bytes = 0;
    file.f = open_shard_for_reading(path, &file_bytes);
    return read_shard_header_from(path, file.f, file_bytes);
}

// Reads and validates the whole shard: an id >= vocab_size would index past the embedding table on the
// GPU, so every token is checked here, where the error can still name the file and position.
inline std::vector<uint16_t> read_shard(const std::string& path, int vocab_size) {
    if (vocab_size <= 0 || vocab_size > kMaxShardVocab)
        throw std::runtime_error(path + ": cannot read with vocabulary size " + std::to_string(vocab_size) +
                                 " (must be 1.." + std::to_string(kMaxShardVocab) + ")");
    ShardFile file;
    int64_t file_bytes = 0;
    file.f = open_shard_for_reading(path, &file_bytes);
    ShardInfo info = read_shard_header_from(path, file.f, file_bytes);
    check_shard_vocab(path, info, vocab_size);
    std::vector<uint16_t> tokens(static_cast<size_t>(info.num_tokens));
    errno = 0;
    if (std::fread(tokens.data(), sizeof(uint16_t), tokens.size(), file.f) != tokens.size())
        throw std::runtime_error(path + ": cannot read tokens: " + io_failure_reason("file shrank while being read"));
    for (size_t i = 0; i < tokens.size(); i++)
        if (tokens[i] >= vocab_size)
            throw std::runtime_error(path + ": token id " + std::to_string(tokens[i]) + " at position " +
                                     std::to_string(i) + " is >= vocabulary size " + std::to_string(vocab_size));
    return tokens;
}

}  // namespace lmoe
