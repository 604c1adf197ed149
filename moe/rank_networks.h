// Ranking networks: the router's top-k as fixed sequences of compare-exchanges over (score, expert)
// pairs held in one thread's registers (moe/router.cuh runs them in its tensor-core kernel; the CPU
// test test_ops checks them against the reference's top-k). Every index is a compile-time constant
// once unrolled, no branch depends on the data, and independent exchanges sit side by side, so
// ranking a row is a short chain of instructions rather than one step per expert.
#pragma once
#include <climits>
#include <cmath>

// Compiled by nvcc for the router and by the host compiler for the CPU test; the loops unroll fully
// on the device (their trip counts are template constants), as they must for the lists to stay in
// registers.
#ifdef __CUDACC__
#define LMOE_HOST_DEVICE __host__ __device__
#define LMOE_UNROLL _Pragma("unroll")
#else
#define LMOE_HOST_DEVICE
#define LMOE_UNROLL
#endif

namespace lmoe {

// The order the router ranks (score, expert) pairs in: the higher score first, equal scores by the
// lower expert (SPEC's tie rule). Scores here are never NaN (a NaN score is taken as -inf).
LMOE_HOST_DEVICE inline bool ranks_before(float s, int e, float s2, int e2) { return s > s2 || (s == s2 && e < e2); }

// (s0, e0), (s1, e1) = the pair that ranks first, then the other.
LMOE_HOST_DEVICE inline void order_pair(float& s0, int& e0, float& s1, int& e1) {
    const bool swap = ranks_before(s1, e1, s0, e0);
    const float hi_s = swap ? s1 : s0, lo_s = swap ? s0 : s1;
    const int hi_e = swap ? e1 : e0, lo_e = swap ? e0 : e1;
    s0 = hi_s, e0 = hi_e, s1 = lo_s, e1 = lo_e;
}

// Networks over N = 2^n pairs:
//   bitonic_merge: a bitonic sequence (rising then falling, or the reverse) into ranked order;
//   bitonic_sort:  any sequence into ranked order, runs of 2, 4, ... sorted in alternating directions
//                  and merged.
// Each pass exchanges the N / 2 pairs (lo, lo + stride), lo the j-th index whose `stride` bit is clear.
LMOE_HOST_DEVICE constexpr int pair_low(int j, int stride) { return j / stride * 2 * stride + j % stride; }
template <int N>
LMOE_HOST_DEVICE inline void bitonic_merge(float (&s)[N], int (&e)[N]) {
LMOE_UNROLL
    for (int stride = N / 2; stride > 0; stride /= 2)
LMOE_UNROLL
        for (int j = 0; j < N / 2; j++) {
            const int lo = pair_low(j, stride), hi = lo + stride;
            order_pair(s[lo], e[lo], s[hi], e[hi]);
        }
}
template <int N>
LMOE_HOST_DEVICE inline void bitonic_sort(float (&s)[N], int (&e)[N]) {
LMOE_UNROLL
    for (int run = 2; run <= N; run *= 2)
LMOE_UNROLL
        for (int stride = run / 2; stride > 0; stride /= 2)
LMOE_UNROLL
            for (int j = 0; j < N / 2; j++) {
                const int lo = pair_low(j, stride), hi = lo + stride;
                if ((lo & run) == 0) order_pair(s[lo], e[lo], s[hi], e[hi]);
                else order_pair(s[hi], e[hi], s[lo], e[lo]);  // this run is sorted the other way
            }
}

// (s, e) = the N best of the two ranked lists (s, e) and (s2, e2), ranked: pairing entry i with the
// other's entry N − 1 − i and keeping the better of each pair leaves a bitonic sequence holding the
// N best, which one merge ranks.
template <int N>
LMOE_HOST_DEVICE inline void keep_best(float (&s)[N], int (&e)[N], const float (&s2)[N], const int (&e2)[N]) {
LMOE_UNROLL
    for (int i = 0; i < N; i++)
        if (ranks_before(s2[N - 1 - i], e2[N - 1 - i], s[i], e[i])) {
            s[i] = s2[N - 1 - i];
            e[i] = e2[N - 1 - i];
        }
    bitonic_merge(s, e);
}

// One thread's share of ranking a row: (s, e) = the KB best, ranked, of the runs of KB experts
// [c0, c0 + KB) for c0 = KB·first, KB·(first + stride), ... (experts past E left out), scored
// logit[e] + bias[e]; KB is a power of two. A NaN score (diverged weights) ranks last, so the list
// holds real experts as long as any are left; entries no expert filled hold (-inf, INT_MAX).
template <int KB>
LMOE_HOST_DEVICE inline void rank_runs(float (&s)[KB], int (&e)[KB], const float* logit, const float* bias, int E,
                                       int first, int stride) {
LMOE_UNROLL
    for (int i = 0; i < KB; i++) s[i] = -INFINITY, e[i] = INT_MAX;
    for (int c0 = KB * first; c0 < E; c0 += KB * stride) {
        float run_s[KB];
        int run_e[KB];
LMOE_UNROLL
        for (int i = 0; i < KB; i++) {
            const int x = c0 + i;
            const float sc = x < E ? logit[x] + bias[x] : -INFINITY;
            run_s[i] = sc != sc ? -INFINITY : sc;
            run_e[i] = x < E ? x : INT_MAX;
        }
        bitonic_sort(run_s, run_e);
        keep_best(s, e, run_s, run_e);
    }
}

}  // namespace lmoe
