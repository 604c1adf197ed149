// Head Parallel × Expert Parallel (SPEC §3) on R = P·Q ranks: which head group and which expert
// shard a rank is, and the fixed bytes of its head exchange. Host-only, so the CPU simulation and
// the trainers share one definition of the grid.
#pragma once
#include <cstdint>

namespace lmoe {

struct HybridGrid {
    int P = 1, Q = 1;  // head groups; expert shards per group (ranks that split each head's experts)
    int world() const { return P * Q; }
    // A group's Q ranks are consecutive. Its expert exchange moves k copies of every sub-token, k
    // times what the head exchange moves, so it is the one that stays within a node when Q divides
    // the node size.
    int group(int rank) const { return rank / Q; }
    int shard(int rank) const { return rank % Q; }
    int rank(int group, int shard) const { return group * Q + shard; }
};

// Bytes one rank sends per layer per training step in the head exchange: four equal-block
// all-to-alls (u and dy to the head owners, y and du back) among the P ranks of one shard, each a
// block of N·(H/P)·dh elements to each of the P − 1 others. SPEC §3's HP bytes with P for R.
inline int64_t hybrid_head_bytes(int64_t N, int H, int dh, int P, int bytes_per_element) {
    return 4 * N * (H / P) * dh * (P - 1) * bytes_per_element;
}

}  // namespace lmoe
