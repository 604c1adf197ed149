// data_prep: turns text files into llm.c token shards for the trainers. The tokenizer is byte-level
// (every byte is one token, V = 256), so it needs no vocabulary file and no network. The text of all
// inputs, concatenated, is split at a byte boundary: the last fraction goes to PREFIX_val.bin, the rest
// to PREFIX_train.bin. Exit status: 0 success, 1 data or I/O error, 2 usage error (an output that is not
// a writable file, or is one of the inputs, included: train/output_paths.h checks them before reading).
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/dataloader.h"
#include "io/shard.h"
#include "train/output_paths.h"

constexpr int kByteVocab = 256;

const char* const kUsage =
    "usage: data_prep [--out PREFIX] [--val-fraction F] FILE...\n"
    "\n"
    "Turns text into llm.c token shards for the trainers. The tokenizer is byte-level: every byte\n"
    "of the text is one token (vocabulary size 256). The FILEs are concatenated in the order given,\n"
    "with nothing between them; the last fraction F of the bytes is written to PREFIX_val.bin and\n"
    "the rest to PREFIX_train.bin.\n"
    "\n"
    "  FILE              a text file, or - for standard input (use -- before names starting with -)\n"
    "  --out PREFIX      output prefix (default data/text); its directory is created if missing\n"
    "  --val-fraction F  fraction of the bytes held out for validation, 0 < F < 1 (default 0.1)\n"
    "  -h, --help        print this help and exit\n"
    "\n"
    "Exit status: 0 success, 1 data or I/O error, 2 usage error (including an output that is a\n"
    "directory, a device, one of the FILEs or in a folder that cannot be written: nothing is written).\n";

// A mistake in how the program was called (exit 2), as opposed to a problem with the data (exit 1).
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::string out_prefix = "data/text";
    double val_fraction = 0.1;
    std::vector<std::string> inputs;
    bool help = false;
};

// Parses a fraction strictly: "0.1x" or "nan" must be rejected, not read as 0.1 or slip past a range check.
double parse_val_fraction(const std::string& text) {
    char* end = nullptr;
    errno = 0;
    double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(value))
        throw UsageError("--val-fraction: '" + text + "' is not a number");
    if (value <= 0.0 || value >= 1.0)
        throw UsageError("--val-fraction must be between 0 and 1 (exclusive), got " + text);
    return value;
}

// Reads the command line into Options; every mistake is a UsageError naming the offending argument.
Options parse_args(const std::vector<std::string>& args) {
    Options options;
    bool flags_done = false;
    for (size_t i = 0; i < args.size(); i++) {
        const std::string& arg = args[i];
        bool is_flag = !flags_done && arg.size() > 1 && arg[0] == '-';
        if (!is_flag) {
            options.inputs.push_back(arg);
        } else if (arg == "--") {
            flags_done = true;
        } else if (arg == "--help" || arg == "-h") {
            options.help = true;
        } else if (arg == "--out" || arg == "--val-fraction") {
            if (i + 1 == args.size()) throw UsageError(arg + " needs a value");
            const std::string& value = args[++i];
            if (arg == "--out") {
                if (value.empty()) throw UsageError("--out needs a non-empty prefix");
                options.out_prefix = value;
            } else {
                options.val_fraction = parse_val_fraction(value);
            }
        } else {
            throw UsageError("unknown flag '" + arg + "'");
        }
    }
    if (!options.help && options.inputs.empty()) throw UsageError("no input files");
    return options;
}

// Returns the bytes of `path` ("-" = standard input), or throws naming the file and the reason.
std::string read_input(const std::string& path) {
    bool is_stdin = path == "-";
    std::FILE* f = is_stdin ? stdin : std::fopen(path.c_str(), "rb");
    if (!f) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
    std::string text;
    char buffer[1 << 16];
    size_t got;
    while ((got = std::fread(buffer, 1, sizeof(buffer), f)) > 0) text.append(buffer, got);
    bool failed = std::ferror(f) != 0;
    int read_errno = errno;
    if (!is_stdin) std::fclose(f);
    if (failed) throw std::runtime_error((is_stdin ? "standard input" : path) + ": read failed: " +
                                         std::strerror(read_errno));
    return text;
}

// Prints a fraction as the user would write it (0.1, not to_string's 0.100000).
std::string format_fraction(double fraction) {
    char text[32];
    std::snprintf(text, sizeof(text), "%g", fraction);
    return text;
}

struct Split {
    std::vector<uint16_t> train, val;
};

// Tokenizes bytes one to one and splits off the last val_fraction of them. Each side needs at least two
// tokens: one input and the target that follows it.
Split split_bytes(const std::string& text, double val_fraction) {
    int64_t total = static_cast<int64_t>(text.size());
    int64_t num_val = std::llround(static_cast<double>(total) * val_fraction);
    int64_t num_train = total - num_val;
    if (num_train < 2 || num_val < 2)
        throw std::runtime_error("input of " + std::to_string(total) + " bytes split at val fraction " +
                                 format_fraction(val_fraction) + " leaves " + std::to_string(num_train) +
                                 " train and " + std::to_string(num_val) +
                                 " val tokens; each side needs at least 2 (an input and its target)");
    // Through unsigned char: a plain char above 127 is negative and would not become the byte's id.
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(text.data());
    Split split;
    split.train.assign(bytes, bytes + num_train);
    split.val.assign(bytes + num_train, bytes + total);
    return split;
}

// Does the work once the arguments are known: read, tokenize, split, write, report.
void run(const Options& options) {
    std::string train_path = options.out_prefix + "_train.bin", val_path = options.out_prefix + "_val.bin";
    std::vector<lmoe::NamedPath> inputs;
    for (const std::string& path : options.inputs)  // /dev/stdin: the file standard input reads, if any
        inputs.push_back({path == "-" ? "standard input" : "the input", path == "-" ? "/dev/stdin" : path});
    const std::vector<lmoe::NamedPath> outputs = {{"the train shard", train_path}, {"the val shard", val_path}};
    lmoe::check_outputs(outputs, inputs);
    std::string text;
    for (const std::string& path : options.inputs) text += read_input(path);
    if (text.empty())
        throw std::runtime_error("input is empty (0 bytes in " + std::to_string(options.inputs.size()) +
                                 (options.inputs.size() == 1 ? " file)" : " files)"));
    Split split = split_bytes(text, options.val_fraction);
    lmoe::make_parent_folder(outputs[0]);
    lmoe::write_shard(train_path, split.train, kByteVocab);
    lmoe::write_shard(val_path, split.val, kByteVocab);
    std::printf("data_prep: read %zu bytes from %zu file(s); byte-level tokens, vocabulary size %d\n", text.size(),
                options.inputs.size(), kByteVocab);
    std::printf("data_prep: wrote %s: %zu tokens\n", train_path.c_str(), split.train.size());
    std::printf("data_prep: wrote %s: %zu tokens (val fraction %g)\n", val_path.c_str(), split.val.size(),
                options.val_fraction);
    std::printf("data_prep: unigram entropy of the train split: %.4f nats (the loss of predicting byte frequencies)\n",
                lmoe::unigram_entropy_nats(split.train, kByteVocab));
}

int main(int argc, char** argv) {
    try {
        Options options = parse_args(std::vector<std::string>(argv + 1, argv + argc));
        if (options.help) {
            std::fputs(kUsage, stdout);
            return 0;
        }
        run(options);
        return 0;
    } catch (const lmoe::ConfigError& e) {  // an output that cannot be written or would overwrite an input
        std::fprintf(stderr, "data_prep: error: %s\n", e.what());
        return 2;
    } catch (const UsageError& e) {
        std::fprintf(stderr, "data_prep: error: %s\nrun 'data_prep --help' for usage\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "data_prep: error: %s\n", e.what());
        return 1;
    }
}
