// Expert Parallel's split sizes from the count table the ranks all-gather (parallel/expert_dispatch.cuh):
// counts[r·E + e] = the copies rank r routed to expert e; rank q owns experts [q·E/R, (q+1)·E/R).
// Host-only, so the CPU tests check the same arithmetic the host exchange uses and the device one
// computes on the GPU.
#pragma once
#include <cstdint>
#include <vector>

namespace lmoe {

struct ExpertSplits {
    std::vector<int64_t> send, recv;  // rows to / from each rank
    std::vector<int64_t> send_base;   // where this rank's run for each owner starts in its received order
    int64_t received = 0;             // Σ recv
};

// The received order at an owner is by source rank, then the source's group order, so source r's
// run for owner q starts after the runs of the sources before it.
inline ExpertSplits expert_splits(const std::vector<int>& counts, int rank, int R, int E) {
    const int Er = E / R;
    auto run = [&](int source, int owner) {  // copies source routed to owner's experts
        int64_t n = 0;
        for (int e = 0; e < Er; e++) n += counts[(int64_t)source * E + owner * Er + e];
        return n;
    };
    ExpertSplits s{std::vector<int64_t>(R), std::vector<int64_t>(R), std::vector<int64_t>(R, 0), 0};
    for (int q = 0; q < R; q++) {
        s.send[q] = run(rank, q);
        s.recv[q] = run(q, rank);
        s.received += s.recv[q];
        for (int r = 0; r < rank; r++) s.send_base[q] += run(r, q);
    }
    return s;
}

}  // namespace lmoe
