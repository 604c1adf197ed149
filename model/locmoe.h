// What LocMoE (SPEC §2.6) fixes before the first step, for the CPU reference and the GPU alike: the
// expert capacity and each rank's locality target D_l. Host-only.
//
// Capacity: at most C = max(ec_min, ⌈c_f · N·k / E⌉) rows per expert, rank and micro-batch, where
// ec_min = ⌈1 / (E · p_δ)⌉ is the paper's lower bound (its Theorem 1) and p_δ = 1 − I_{δ²}(1/2, (d−1)/2)
// is the chance that a random direction in d dimensions lies at a cosine of at least δ from a fixed one.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/config.h"

namespace lmoe {

// The regularised incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1, by Lentz's continued
// fraction (Numerical Recipes §6.4): it converges fast for x < (a+1)/(a+b+2), so beyond that point the
// symmetry I_x(a, b) = 1 − I_{1−x}(b, a) is used. Relative accuracy about 1e-14.
inline double regularized_incomplete_beta(double a, double b, double x) {
    if (!(a > 0 && b > 0 && x >= 0 && x <= 1)) throw std::invalid_argument("incomplete beta: a, b > 0, x in [0, 1]");
    if (x == 0 || x == 1) return x;
    if (x > (a + 1) / (a + b + 2)) return 1 - regularized_incomplete_beta(b, a, 1 - x);
    const double front = std::exp(std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) +
                                  b * std::log1p(-x)) / a;
    const double tiny = 1e-300;
    double c = 1, d = 1 - (a + b) * x / (a + 1);
    d = 1 / (std::fabs(d) < tiny ? tiny : d);
    double f = d;
    for (int m = 1; m <= 10000; m++) {
        // the even and the odd term of the fraction for this m
        for (int odd = 0; odd < 2; odd++) {
            const double num = odd ? -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
                                   : m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m));
            d = 1 + num * d;
            d = 1 / (std::fabs(d) < tiny ? tiny : d);
            c = 1 + num / c;
            if (std::fabs(c) < tiny) c = tiny;
            const double step = c * d;
            f *= step;
            if (odd && std::fabs(step - 1) < 1e-15) return front * f;
        }
    }
    throw std::runtime_error("incomplete beta: the continued fraction did not converge");
}

// p_δ = 1 − I_{δ²}(1/2, (d−1)/2), for 0 < δ < 1 and d >= 2.
inline double capacity_p_delta(int d, double delta) {
    return 1 - regularized_incomplete_beta(0.5, 0.5 * (d - 1), delta * delta);
}

struct ExpertCapacity {
    double p_delta;  // the share of directions at a cosine of at least δ
    double ec_min;   // ⌈1 / (E · p_δ)⌉, a double: it is huge when δ is near 1
    int C;           // rows per expert, rank and micro-batch; 0: unlimited (--capacity-factor 0)
};

// The capacity of a LocMoE layer with N tokens per rank and micro-batch.
inline ExpertCapacity expert_capacity(const Config& c, int N) {
    ExpertCapacity cap;
    cap.p_delta = capacity_p_delta(c.d, c.capacity_delta);
    cap.ec_min = std::ceil(1.0 / (c.E * cap.p_delta));
    // an expert can receive at most N rows (a token picks it once): a larger C is N
    const double per_expert = std::ceil((double)c.capacity_factor * N * c.k / c.E);
    cap.C = c.capacity_factor == 0 ? 0 : (int)std::min<double>(N, std::max(cap.ec_min, per_expert));
    return cap;
}

// Prints C, ec_min and p_δ, as a run starts.
inline void print_capacity(const Config& c, int N) {
    const ExpertCapacity cap = expert_capacity(c, N);
    std::printf("LocMoE capacity: p_delta %.6g (delta %g, d %d), ec_min %.0f, C %s rows per expert, rank and "
                "micro-batch of %d tokens\n", cap.p_delta, c.capacity_delta, c.d, cap.ec_min,
                cap.C == 0 ? "unlimited" : std::to_string(cap.C).c_str(), N);
}

// The locality target D_l of rank `rank` (SPEC §2.6): (1 − η) uniform over the experts of its node's
// ranks plus η uniform over all E. Rank r owns experts [r·E/R, (r+1)·E/R) and a node is `node_size`
// consecutive ranks, so the node's experts are consecutive too.
constexpr double kLocalityFloor = 0.1;  // η: the paper's fully local target makes the KL infinite
inline std::vector<double> locality_target(int E, int rank, int world, int node_size) {
    const int per_node = E / world * node_size, first = rank / node_size * per_node;
    std::vector<double> D(E, kLocalityFloor / E);
    for (int e = first; e < first + per_node; e++) D[e] += (1 - kLocalityFloor) / per_node;
    return D;
}

// The ranks of one node: --node-size, or by default the ranks on this rank's host, which must divide
// R. Throws ConfigError otherwise (a host holding a number of ranks that does not divide R).
inline int locmoe_node_size(const Config& c, int world, int ranks_on_host) {
    const int n = c.node_size ? c.node_size : ranks_on_host;
    if (world % n != 0)
        throw ConfigError("the " + std::to_string(ranks_on_host) + " ranks on this host do not divide R = " +
                          std::to_string(world) + ": give --node-size");
    return n;
}

// Everything a LocMoE layer needs besides its weights, for rank `rank` of `world` with N tokens per
// micro-batch: the loss weights, the capacity and the locality target.
struct LocMoeSetup {
    double alpha, mu;       // weights of L_aux and L_loc
    int capacity;           // C; 0: unlimited
    std::vector<double> D;  // (E) the locality target D_l
};
inline LocMoeSetup locmoe_setup(const Config& c, int N, int rank, int world, int node_size) {
    return {c.aux_loss_weight, c.loc_loss_weight, expert_capacity(c, N).C, locality_target(c.E, rank, world, node_size)};
}

}  // namespace lmoe
