// How the training loop (train/loop.h) reports a step beyond its one-line summary: the expert-load
// line (SPEC §2.3 asks that imbalance be visible), the GPU's time breakdown (SPEC §3), and the
// --log-file CSV that scripts and tests read back. Host-only, so the CPU reference path shares it.
#pragma once
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "moe/router_stats.h"

namespace lmoe {

// The expert load of one layer: each expert's share of its head's routed slots (1/E when
// balanced), pooled over the layer's heads, so the extremes show the worst imbalance of the layer.
struct LayerLoad {
    double min, median, max;
};

// `counts` is (L, heads, E); the heads are those of this rank.
inline std::vector<LayerLoad> layer_loads(const std::vector<int64_t>& counts, int L, int E) {
    const int H = (int)(counts.size() / ((size_t)L * E));
    std::vector<LayerLoad> loads;
    for (int l = 0; l < L; l++) {
        std::vector<double> shares;
        for (int h = 0; h < H; h++) {
            const int64_t* c = counts.data() + ((size_t)l * H + h) * E;
            int64_t total = 0;
            for (int e = 0; e < E; e++) total += c[e];
            for (int e = 0; e < E; e++) shares.push_back(total ? double(c[e]) / total : 0.0);
        }
        std::sort(shares.begin(), shares.end());
        loads.push_back({shares.front(), shares[shares.size() / 2], shares.back()});
    }
    return loads;
}

// The expert-load line: "min/median/max" of every layer.
inline void print_loads(const std::vector<LayerLoad>& loads, int E) {
    std::printf("    expert load min/median/max (balanced %.3f):", 1.0 / E);
    for (size_t l = 0; l < loads.size(); l++)
        std::printf(" L%zu %.3f/%.3f/%.3f", l, loads[l].min, loads[l].median, loads[l].max);
    std::printf("\n");
}

inline void print_dropped(const RouterStats& s) {
    std::printf("    rows dropped over capacity:");
    for (size_t l = 0; l < s.dropped.size(); l++) std::printf(" L%zu %lld", l, (long long)s.dropped[l]);
    std::printf("\n");
}

// "42s", "3m12s", "2h05m": how long the rest of a run will take, for the progress line.
inline std::string format_duration(double seconds) {
    const long s = std::lround(std::max(0.0, seconds));
    char text[32];
    if (s < 60) std::snprintf(text, sizeof text, "%lds", s);
    else if (s < 3600) std::snprintf(text, sizeof text, "%ldm%02lds", s / 60, s % 60);
    else std::snprintf(text, sizeof text, "%ldh%02ldm", s / 3600, s % 3600 / 60);
    return text;
}

// Where a GPU step's milliseconds went, from CUDA events on the training stream. The FFN's time
// includes the all-to-alls inside it; the line and the log show the two apart. The CPU path measures
// none of it: NaN.
struct StepTimes {
    double attention = NAN, ffn = NAN, all_to_all = NAN, all_reduce = NAN, optimizer = NAN;

    double ffn_compute() const { return ffn - all_to_all; }
    // what no section claims (embedding, norms, LM head, loss, launch gaps, the forward's waits for
    // AdamW, which runs on a stream of its own) of a step of `ms`
    double rest(double ms) const { return ms - attention - ffn - all_reduce - optimizer; }
};

inline void print_time_breakdown(const StepTimes& t, double ms) {
    std::printf("    time (ms): attention %.2f | FFN compute %.2f | all-to-all %.2f | all-reduce %.2f | "
                "optimizer %.2f | rest %.2f\n", t.attention, t.ffn_compute(), t.all_to_all, t.all_reduce,
                t.optimizer, t.rest(ms));
}

// What a model's optimizer_step hands the training loop: the step's loss (the mean cross-entropy over
// its micro-batches and the ranks) and the gradient norm before clipping.
struct StepResult {
    double loss, norm;
};

// One row of the log: what the progress line shows, for every step.
struct StepRow {
    int step;
    double loss, norm;
    double val_loss;     // NaN unless the validation loss was computed after this step
    double ms;           // the step's wall time
    double lr;
    int64_t tokens;      // trained through this step, over all ranks
    double elapsed_s;    // since the run started (or resumed), evaluations and samples included
    int64_t sent_bytes;  // by this rank to others in this step
    StepTimes times;
    RouterStats router;  // LocMoE's losses and drops; zero for the other routers
    std::vector<LayerLoad> loads;
};

// The --log-file CSV, one row per step and no header (tests and scripts count rows as steps):
//   step,loss,norm,val_loss,ms,lr,tokens,elapsed_s,sent_bytes,
//   attention_ms,ffn_compute_ms,all_to_all_ms,all_reduce_ms,optimizer_ms,rest_ms,
//   aux_loss,loc_loss,dropped (LocMoE's, SPEC §2.6; 0 for the other routers),
//   then min,median,max expert load of layer 0, of layer 1, ... (3·L columns)
// val_loss is NaN where none was computed; the time breakdown is NaN on the CPU path. Every row is
// flushed as it is written, so a killed run keeps each step it finished, and a failed write (a full
// disk) throws rather than ending with an empty log. A run resumed at step S first cuts the log back
// to its rows of steps <= S (the later ones are of steps the checkpoint does not hold, the last may be
// half written), then appends. A closed log (no file asked for) ignores rows.
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

    void row(const StepRow& r) {
        if (!file_) return;
        const StepTimes& t = r.times;
        bool ok = std::fprintf(file_, "%d,%.9g,%.9g,%.9g,%.3f,%.6g,%lld,%.3f,%lld,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f",
                               r.step, r.loss, r.norm, r.val_loss, r.ms, r.lr, (long long)r.tokens, r.elapsed_s,
                               (long long)r.sent_bytes, t.attention, t.ffn_compute(), t.all_to_all, t.all_reduce,
                               t.optimizer, t.rest(r.ms)) >= 0;
        ok = ok && std::fprintf(file_, ",%.9g,%.9g,%lld", r.router.aux_loss, r.router.loc_loss,
                                (long long)r.router.total_dropped()) >= 0;
        for (const LayerLoad& l : r.loads)
            ok = ok && std::fprintf(file_, ",%.5f,%.5f,%.5f", l.min, l.median, l.max) >= 0;
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
