// The files a program is about to write (checkpoints, the --log-file CSV, data_prep's shards), checked
// before it writes anything (SPEC §8.6), so that a run does not find out hours in that it cannot save,
// and never writes over its own input: each must be a regular file or a new one in a writable folder,
// not a directory, a device, a FIFO or a socket, not one of the inputs, and no two of them one file.
// Files are compared by identity (st_dev, st_ino), so another name, a link or a glob's match of the
// same file is caught. Shared by the training loop (train/loop.h) and data_prep. Host-only.
#pragma once
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "model/config.h"

namespace lmoe {

// A file and what it is to the program, for messages: {"the checkpoint", "out/moe.ckpt"}.
struct NamedPath {
    std::string role, path;
};

// True when `a` and `b` name one file: the same (st_dev, st_ino) when both exist, the same normalised
// path when neither does yet.
inline bool same_file(const std::string& a, const std::string& b) {
    struct stat sa, sb;
    const bool a_exists = stat(a.c_str(), &sa) == 0, b_exists = stat(b.c_str(), &sb) == 0;
    if (a_exists || b_exists) return a_exists && b_exists && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    auto normal = [](const std::string& p) {  // made absolute first: weakly_canonical leaves "x" relative
        std::error_code error;
        const auto full = std::filesystem::weakly_canonical(std::filesystem::absolute(p, error), error);
        return error ? std::filesystem::path(p) : full;
    };
    return normal(a) == normal(b);
}

// Why `path` cannot be written as an output, or "" when it can. A missing folder is fine when its
// nearest existing ancestor is a writable directory: make_parent_folder creates it.
inline std::string output_problem(const std::string& path, const std::vector<NamedPath>& inputs) {
    auto failed = [](const std::string& what) { return what + ": " + std::strerror(errno); };
    struct stat st;
    if (stat(path.c_str(), &st) == 0) {
        if (S_ISDIR(st.st_mode)) return "is a directory";
        if (!S_ISREG(st.st_mode)) return "is not a regular file (a device, FIFO or socket)";
        for (const NamedPath& input : inputs)
            if (same_file(path, input.path))
                return "is " + input.role + " " + input.path + ", which it would overwrite";
        if (access(path.c_str(), W_OK) != 0) return failed("cannot be written");
    } else if (errno != ENOENT) {
        return failed("cannot be checked");
    }
    std::filesystem::path dir = std::filesystem::path(path).parent_path();
    if (dir.empty()) dir = ".";
    while (stat(dir.c_str(), &st) != 0) {
        if (errno != ENOENT || !dir.has_relative_path() || dir == ".")
            return failed("cannot be checked: folder " + dir.string());
        dir = dir.parent_path();
        if (dir.empty()) dir = ".";
    }
    if (!S_ISDIR(st.st_mode)) return "is in " + dir.string() + ", which is not a folder";
    // files are written to a temporary name in the folder and renamed, so the folder must be writable
    if (access(dir.c_str(), W_OK | X_OK) != 0)
        return failed("is in folder " + dir.string() + ", which is not writable");
    return "";
}

// Throws ConfigError naming the first of `outputs` that cannot be written or is one of `inputs` or
// another output. Touches nothing.
inline void check_outputs(const std::vector<NamedPath>& outputs, const std::vector<NamedPath>& inputs) {
    for (size_t i = 0; i < outputs.size(); i++) {
        const NamedPath& out = outputs[i];
        const std::string problem = output_problem(out.path, inputs);
        if (!problem.empty()) throw ConfigError(out.role + " " + out.path + " " + problem);
        for (size_t j = 0; j < i; j++)
            if (same_file(out.path, outputs[j].path))
                throw ConfigError(out.role + " " + out.path + " is also " + outputs[j].role + " " + outputs[j].path +
                                  "; give them different paths");
    }
}

// Creates the folders `out` will be written in (out/ on a fresh checkout); ConfigError if it cannot.
inline void make_parent_folder(const NamedPath& out) {
    const std::filesystem::path dir = std::filesystem::path(out.path).parent_path();
    if (dir.empty()) return;
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (error)
        throw ConfigError(out.role + " " + out.path + ": cannot create its folder " + dir.string() + ": " +
                          error.message());
}

}  // namespace lmoe
