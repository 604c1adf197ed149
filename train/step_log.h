// How the training loop (train/loop.h) reports a step beyond its one-line summary: the expert-load
// line (SPEC §2.3 asks that imbalance be visible), the GPU's time breakdown (SPEC §3), and the
// --log-file CSV that scripts and tests read back. Host-only, so the CPU reference path shares it.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
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
// NaN elsewhere). Appends when a run resumes. A closed log (no file asked for) ignores rows.
class StepLog {
  public:
    StepLog(const std::string& path, bool resumed) {
        if (path.empty()) return;
        const std::filesystem::path dir = std::filesystem::path(path).parent_path();
        if (!dir.empty()) std::filesystem::create_directories(dir);
        file_ = std::fopen(path.c_str(), resumed ? "a" : "w");
        if (!file_) throw std::runtime_error(path + ": cannot write the log file");
    }
    ~StepLog() { if (file_) std::fclose(file_); }
    StepLog(const StepLog&) = delete;
    StepLog& operator=(const StepLog&) = delete;
    void row(int step, double loss, double norm, double val_loss, double ms) {
        if (file_) std::fprintf(file_, "%d,%.9g,%.9g,%.9g,%.3f\n", step, loss, norm, val_loss, ms);
    }

  private:
    std::FILE* file_ = nullptr;
};

}  // namespace lmoe
