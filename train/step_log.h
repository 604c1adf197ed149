// How the training loop (train/loop.h) reports a step beyond its one-line summary: the expert-load
// line (SPEC §2.3 asks that imbalance be visible), the GPU's time breakdown (SPEC §3), and the
// --log-file CSV that scripts and tests read back. Host-only, so the CPU reference path shares it.
#pragma once
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lmoe {

// Expert loads per layer as "min/median/max": each expert's share of its head's routed slots (1/E
// when balanced), pooled over the layer's heads so one line shows the worst imbalance of each layer.
// `counts` is (L, heads, E); the heads are those of this rank.
inline void print_loads(const std::vector<int64_t>& counts, int L, int E) {
    const int H = (int)(counts.size() / ((size_t)L * E));
    std::printf("    expert load min/median/max (balanced %.3f):", 1.0 / E);
    for (int l = 0; l < L; l++) {
        std::vector<double> shares;
        for (int h = 0; h < H; h++) {
            const int64_t* c = counts.data() + ((size_t)l * H + h) * E;
            int64_t total = 0;
            for (int e = 0; e < E; e++) total += c[e];
            for (int e = 0; e < E; e++) shares.push_back(total ? double(c[e]) / total : 0.0);
        }
        std::sort(shares.begin(), shares.end());
        std::printf(" L%d %.3f/%.3f/%.3f", l, shares.front(), shares[shares.size() / 2], shares.back());
    }
    std::printf("\n");
}

// LocMoE's auxiliary losses and capacity drops over one optimizer step (SPEC §2.6): L_aux and L_loc
// summed over the layers and averaged over the micro-steps and ranks, like the loss; the dropped copies
// per layer summed over them. All zero for the other routers.
struct RouterStats {
    double aux_loss = 0, loc_loss = 0;
    std::vector<int64_t> dropped;  // (L)
    int64_t total_dropped() const {
        int64_t n = 0;
        for (int64_t v : dropped) n += v;
        return n;
    }
};

inline void print_dropped(const RouterStats& s) {
    std::printf("    rows dropped over capacity:");
    for (size_t l = 0; l < s.dropped.size(); l++) std::printf(" L%zu %lld", l, (long long)s.dropped[l]);
    std::printf("\n");
}

// Where a GPU step's milliseconds went, from CUDA events on the training stream. The FFN's time
// includes the all-to-alls inside it; the line shows the two apart.
struct StepTimes {
    double attention = 0, ffn = 0, all_to_all = 0, all_reduce = 0, optimizer = 0;
};

// `ms` is the whole step's wall time; "rest" is what no section claims (embedding, norms, LM head,
// loss, launch gaps).
inline void print_time_breakdown(const StepTimes& t, double ms) {
    std::printf("    time (ms): attention %.2f | FFN compute %.2f | all-to-all %.2f | all-reduce %.2f | "
                "optimizer %.2f | rest %.2f\n", t.attention, t.ffn - t.all_to_all, t.all_to_all, t.all_reduce,
                t.optimizer, ms - t.attention - t.ffn - t.all_reduce - t.optimizer);
}

// The --log-file CSV, one row per step: step,loss,norm,val_loss,ms (val_loss on the last step only,
// NaN elsewhere), and for LocMoE then aux_loss,loc_loss,dropped (the step's RouterStats). Every row is flushed as it is written, so a killed run keeps each step it finished,
// and a failed write (a full disk) throws rather than ending with an empty log. A run resumed at step S
// first cuts the log back to its rows of steps <= S (the later ones are of steps the checkpoint does
// not hold, the last may be half written), then appends. A closed log (no file asked for) ignores rows.
class StepLog {
  public:
    StepLog(const std::string& path, int resumed_step) : path_(path) {
        if (path.empty()) return;
        if (resumed_step > 0) cut_back(resumed_step);
        file_ = std::fopen(path.c_str(), resumed_step > 0 ? "a" : "w");
        if (!file_) fail("cannot open the log file");
    }
    ~StepLog() { if (file_) std::fclose(file_); }
    StepLog(const StepLog&) = delete;
    StepLog& operator=(const StepLog&) = delete;

    void row(int step, double loss, double norm, double val_loss, double ms, const RouterStats* router = nullptr) {
        if (!file_) return;
        bool ok = std::fprintf(file_, "%d,%.9g,%.9g,%.9g,%.3f", step, loss, norm, val_loss, ms) >= 0;
        if (router)
            ok &= std::fprintf(file_, ",%.9g,%.9g,%lld", router->aux_loss, router->loc_loss,
                               (long long)router->total_dropped()) >= 0;
        if (!ok || std::fputc('\n', file_) == EOF || std::fflush(file_) != 0) fail("writing the log failed");
    }
    // At the end of the run: a write error may surface only when the file is closed (NFS).
    void close() {
        if (file_ && std::fclose(std::exchange(file_, nullptr)) != 0) fail("writing the log failed");
    }

  private:
    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error(path_ + ": " + what + ": " + std::strerror(errno));
    }

    // Keeps the whole lines whose step is <= `step`, through a temporary file renamed over the log, so
    // a crash meanwhile leaves the old log or the new one, never a mix. No log yet: nothing to cut.
    void cut_back(int step) {
        std::FILE* in = std::fopen(path_.c_str(), "rb");
        if (!in) {
            if (errno == ENOENT) return;
            fail("cannot read the log file to cut it back to step " + std::to_string(step));
        }
        std::string kept, line;
        for (int ch; (ch = std::fgetc(in)) != EOF;) {
            line += (char)ch;
            if (ch != '\n') continue;
            char* end = nullptr;
            const long row_step = std::strtol(line.c_str(), &end, 10);
            if (end != line.c_str() && *end == ',' && row_step <= step) kept += line;
            line.clear();
        }
        const bool read_failed = std::ferror(in) != 0;
        std::fclose(in);
        if (read_failed) fail("reading the log file failed");
        std::string tmp = path_ + ".XXXXXX";
        const int fd = mkstemp(tmp.data());
        if (fd < 0) fail("cannot create a temporary file next to the log");
        struct stat st;
        if (stat(path_.c_str(), &st) == 0) fchmod(fd, st.st_mode & 07777);  // mkstemp's file is 0600
        std::FILE* out = fdopen(fd, "wb");
        bool ok = out && std::fwrite(kept.data(), 1, kept.size(), out) == kept.size() && std::fflush(out) == 0 &&
                  fsync(fd) == 0;
        int error = errno;
        if (out ? std::fclose(out) != 0 : ::close(fd) != 0) {
            if (ok) error = errno;
            ok = false;
        }
        if (ok && std::rename(tmp.c_str(), path_.c_str()) != 0) {
            error = errno;
            ok = false;
        }
        if (!ok) {
            std::remove(tmp.c_str());
            errno = error;
            fail("cutting the log back to step " + std::to_string(step) + " failed");
        }
    }

    std::string path_;
    std::FILE* file_ = nullptr;
};

}  // namespace lmoe
