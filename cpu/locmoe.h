// LocMoE's router in the CPU reference (SPEC §2.6), templated on float and double like the rest of it:
// the GrAP gate, the two auxiliary losses and the capacity drop. The routed layer that uses them
// (locmoe_forward, locmoe_backward) is in cpu/reference.h, beside the top-k router's.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "model/locmoe.h"

namespace ref {

// The GrAP gate of one row x (D), D % E == 0:
//   a_i = (E/D) Σ_{j in group i} x_j      (x Ω^T: Ω's row i averages the i-th of E equal groups)
//   z_i = a_i + ε_i;   g = ReLU(z);   p = softmax over all E of g
// z is kept for the backward (ReLU's mask).
template <class T>
void grap_probs(T* p, T* z, const T* x, const T* eps, int D, int E) {
    const int G = D / E;
    T mx = 0;  // g >= 0
    for (int i = 0; i < E; i++) {
        T a = 0;
        for (int j = 0; j < G; j++) a += x[i * G + j];
        z[i] = a / T(G) + eps[i];
        mx = std::max(mx, std::max(z[i], T(0)));
    }
    T sum = 0;
    for (int i = 0; i < E; i++) sum += (p[i] = std::exp(std::max(z[i], T(0)) - mx));
    for (int i = 0; i < E; i++) p[i] /= sum;
}

// Backward of grap_probs for one row, from dp (E):
//   dz = p ⊙ (dp − Σ_i p_i dp_i) ⊙ 1{z > 0};   dε += dz;   dx_j += (E/D) dz_{group(j)}
template <class T>
void grap_backward(T* dx, T* deps, const T* dp, const T* p, const T* z, int D, int E) {
    const int G = D / E;
    T dot = 0;
    for (int i = 0; i < E; i++) dot += p[i] * dp[i];
    for (int i = 0; i < E; i++) {
        const T dz = z[i] > 0 ? p[i] * (dp[i] - dot) : T(0);
        deps[i] += dz;
        for (int j = 0; j < G; j++) dx[i * G + j] += dz / T(G);
    }
}

// The capacity drop, in a fixed order: copy (t, j) of expert e is kept while fewer than C earlier
// tokens of the micro-batch chose e, so the latest tokens are dropped first. C = 0 keeps everything.
// Returns the number of dropped copies.
inline int64_t capacity_keep(char* kept, const int* sel, int M, int E, int k, int C) {
    std::vector<int> taken(E, 0);
    int64_t dropped = 0;
    for (int64_t c = 0; c < (int64_t)M * k; c++) {
        kept[c] = C == 0 || taken[sel[c]] < C;
        taken[sel[c]] += kept[c];
        dropped += !kept[c];
    }
    return dropped;
}

// The auxiliary losses of one rank's micro-batch of M rows, from the full probabilities p (M, E) and
// the choices sel (M, k):
//   f_i = share of the M·k routed slots on expert i, before the capacity drop (no gradient)
//   P_i = mean over the rows of p[t, i]
//   L_aux = α E Σ_i f_i P_i;   L_loc = μ KL(P ‖ D) = μ Σ_i P_i log(P_i / D_i)
// and their gradient, the same for every row: dL/dp[t, i] = (α E f_i + μ (log(P_i / D_i) + 1)) / M.
template <class T>
struct RouterLosses {
    T aux = 0, loc = 0;
    std::vector<T> dp;  // (E)
};

template <class T>
RouterLosses<T> locmoe_losses(const T* p, const int* sel, int M, int E, int k, const lmoe::LocMoeSetup& s) {
    std::vector<T> f(E, T(0)), P(E, T(0));
    for (int64_t c = 0; c < (int64_t)M * k; c++) f[sel[c]] += T(1);
    for (int t = 0; t < M; t++)
        for (int i = 0; i < E; i++) P[i] += p[(int64_t)t * E + i];
    RouterLosses<T> out;
    out.dp.resize(E);
    for (int i = 0; i < E; i++) {
        f[i] /= T((int64_t)M * k);
        P[i] /= T(M);
        // P_i = 0 (every p[t, i] underflowed) would make P log P a NaN: the smallest normal stands in
        const T log_ratio = std::log(std::max(P[i], std::numeric_limits<T>::min()) / T(s.D[i]));
        out.aux += T(s.alpha) * T(E) * f[i] * P[i];
        out.loc += T(s.mu) * P[i] * log_ratio;
        out.dp[i] = (T(s.alpha) * T(E) * f[i] + T(s.mu) * (log_ratio + T(1))) / T(M);
    }
    return out;
}

}  // namespace ref
