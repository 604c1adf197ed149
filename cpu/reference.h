// The CPU reference: every piece of SPEC §2 forward and backward, in plain C++ templated on float
// and double. It is the readable statement of the math and the oracle the GPU kernels are checked
// against, so it favours clarity over speed (a few OpenMP loops make the CPU training path bearable;
// each output element is written by one thread, so results do not depend on the thread count).
//
// Conventions: row-major tensors; N = B·T tokens; a "matrix W: (O, I)" maps I inputs to O outputs
// (y = x W^T). Every backward function *accumulates* (+=) into the gradients it is given.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/locmoe.h"
#include "model/config.h"
#include "model/params.h"

namespace ref {

using lmoe::Config;
using lmoe::FfnKind;

constexpr double kNormEps = 1e-5;
constexpr double kRopeBase = 10000.0;

// ---------------------------------------------------------------------------------------------
// GELU, the exact one: gelu(x) = x·Φ(x) = 0.5·x·(1 + erf(x/√2)); gelu'(x) = Φ(x) + x·φ(x).

template <class T> T gelu(T x) { return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2))); }
template <class T> T gelu_grad(T x) {
    T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
    T pdf = std::exp(T(-0.5) * x * x) * T(0.3989422804014327);  // 1/√(2π)
    return cdf + x * pdf;
}

// ---------------------------------------------------------------------------------------------
// Dense matmul: out[n, o] = Σ_i x[n, i] W[o, i].  dx += dout W,  dW += dout^T x.

template <class T>
void matmul_forward(T* out, const T* x, const T* W, int N, int I, int O) {
#pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++) {
            T acc = 0;
            for (int i = 0; i < I; i++) acc += x[(int64_t)n * I + i] * W[(int64_t)o * I + i];
            out[(int64_t)n * O + o] = acc;
        }
}

template <class T>
void matmul_backward(T* dx, T* dW, const T* dout, const T* x, const T* W, int N, int I, int O) {
#pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++) {
            T g = dout[(int64_t)n * O + o];
            for (int i = 0; i < I; i++) dx[(int64_t)n * I + i] += g * W[(int64_t)o * I + i];
        }
#pragma omp parallel for
    for (int o = 0; o < O; o++)
        for (int n = 0; n < N; n++) {
            T g = dout[(int64_t)n * O + o];
            for (int i = 0; i < I; i++) dW[(int64_t)o * I + i] += g * x[(int64_t)n * I + i];
        }
}

// ---------------------------------------------------------------------------------------------
// Embedding: x[t] = W_te[token[t]].  dW_te[token[t]] += dx[t].

template <class T>
void embedding_forward(T* x, const int* tokens, const T* wte, int N, int d) {
    for (int t = 0; t < N; t++)
        for (int i = 0; i < d; i++) x[(int64_t)t * d + i] = wte[(int64_t)tokens[t] * d + i];
}

template <class T>
void embedding_backward(T* dwte, const T* dx, const int* tokens, int N, int d) {
    for (int t = 0; t < N; t++)
        for (int i = 0; i < d; i++) dwte[(int64_t)tokens[t] * d + i] += dx[(int64_t)t * d + i];
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = g ⊙ x · r with r = 1/√(mean(x²) + ε).
// Backward: dg += dy ⊙ x·r;  dx = r·(g⊙dy) − x · r³ · mean(x ⊙ g ⊙ dy).

template <class T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* g, int N, int d) {
    for (int t = 0; t < N; t++) {
        const T* xt = x + (int64_t)t * d;
        T ss = 0;
        for (int i = 0; i < d; i++) ss += xt[i] * xt[i];
        T r = T(1) / std::sqrt(ss / T(d) + T(kNormEps));
        rstd[t] = r;
        for (int i = 0; i < d; i++) y[(int64_t)t * d + i] = g[i] * xt[i] * r;
    }
}

template <class T>
void rmsnorm_backward(T* dx, T* dg, const T* dy, const T* x, const T* g, const T* rstd, int N, int d) {
    for (int t = 0; t < N; t++) {
        const T *xt = x + (int64_t)t * d, *dyt = dy + (int64_t)t * d;
        T r = rstd[t], dot = 0;
        for (int i = 0; i < d; i++) dot += xt[i] * g[i] * dyt[i];
        for (int i = 0; i < d; i++) {
            dg[i] += dyt[i] * xt[i] * r;
            dx[(int64_t)t * d + i] += r * g[i] * dyt[i] - xt[i] * r * r * r * dot / T(d);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding on q and k, in place: the pair (2i, 2i+1) of a head at position p turns by
// θ = p · base^(−2i/d_attn). Backward turns the gradient pair by −θ.

template <class T>
void rope_rotate(T* qkv, int B, int T_, int n_head, int d_attn, int direction) {
    const int width = 3 * n_head * d_attn;
    for (int b = 0; b < B; b++)
        for (int p = 0; p < T_; p++)
            for (int part = 0; part < 2; part++)  // q, then k
                for (int h = 0; h < n_head; h++) {
                    T* v = qkv + ((int64_t)b * T_ + p) * width + (part * n_head + h) * d_attn;
                    for (int i = 0; i < d_attn / 2; i++) {
                        double theta = p * std::pow(kRopeBase, -2.0 * i / d_attn);
                        T c = T(std::cos(theta)), s = T(direction * std::sin(theta));
                        T a = v[2 * i], bb = v[2 * i + 1];
                        v[2 * i] = a * c - bb * s;
                        v[2 * i + 1] = a * s + bb * c;
                    }
                }
}

template <class T> void rope_forward(T* qkv, int B, int T_, int nh, int da) { rope_rotate(qkv, B, T_, nh, da, +1); }
template <class T> void rope_backward(T* dqkv, int B, int T_, int nh, int da) { rope_rotate(dqkv, B, T_, nh, da, -1); }

// ---------------------------------------------------------------------------------------------
// Causal attention on qkv (N, 3·nh·da) = [q | k | v], head h at columns h·da of each part.
// P[t, s] = softmax_s≤t(q_t·k_s / √da);  o_t = Σ_s P[t, s] v_s.
// Backward: dv_s += Σ_t P[t,s] do_t;  dP = do·v;  dS = P ⊙ (dP − Σ_s P dP);  dq += dS k/√da;  dk += dS^T q/√da.

template <class T>
void attention_forward(T* out, T* probs, const T* qkv, int B, int T_, int nh, int da) {
    const int width = 3 * nh * da, C = nh * da;
    const T scale = T(1) / std::sqrt(T(da));
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int t = 0; t < T_; t++) {
                const T* q = qkv + ((int64_t)b * T_ + t) * width + h * da;
                T* P = probs + (((int64_t)b * nh + h) * T_ + t) * T_;
                T mx = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    const T* k = qkv + ((int64_t)b * T_ + s) * width + C + h * da;
                    T dot = 0;
                    for (int i = 0; i < da; i++) dot += q[i] * k[i];
                    P[s] = dot * scale;
                    mx = std::max(mx, P[s]);
                }
                T sum = 0;
                for (int s = 0; s <= t; s++) sum += (P[s] = std::exp(P[s] - mx));
                for (int s = 0; s < T_; s++) P[s] = s <= t ? P[s] / sum : T(0);
                T* o = out + ((int64_t)b * T_ + t) * C + h * da;
                for (int i = 0; i < da; i++) o[i] = 0;
                for (int s = 0; s <= t; s++) {
                    const T* v = qkv + ((int64_t)b * T_ + s) * width + 2 * C + h * da;
                    for (int i = 0; i < da; i++) o[i] += P[s] * v[i];
                }
            }
}

template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* probs, int B, int T_, int nh, int da) {
    const int width = 3 * nh * da, C = nh * da;
    const T scale = T(1) / std::sqrt(T(da));
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++) {
            std::vector<T> dS(T_);
            for (int t = 0; t < T_; t++) {
                const T* P = probs + (((int64_t)b * nh + h) * T_ + t) * T_;
                const T* dot_ = dout + ((int64_t)b * T_ + t) * C + h * da;
                T pdp = 0;
                for (int s = 0; s <= t; s++) {
                    const T* v = qkv + ((int64_t)b * T_ + s) * width + 2 * C + h * da;
                    T* dv = dqkv + ((int64_t)b * T_ + s) * width + 2 * C + h * da;
                    T dp = 0;
                    for (int i = 0; i < da; i++) {
                        dp += dot_[i] * v[i];
                        dv[i] += P[s] * dot_[i];
                    }
                    dS[s] = dp;
                    pdp += P[s] * dp;
                }
                const T* q = qkv + ((int64_t)b * T_ + t) * width + h * da;
                T* dq = dqkv + ((int64_t)b * T_ + t) * width + h * da;
                for (int s = 0; s <= t; s++) {
                    T ds = P[s] * (dS[s] - pdp) * scale;
                    const T* k = qkv + ((int64_t)b * T_ + s) * width + C + h * da;
                    T* dk = dqkv + ((int64_t)b * T_ + s) * width + C + h * da;
                    for (int i = 0; i < da; i++) {
                        dq[i] += ds * k[i];
                        dk[i] += ds * q[i];
                    }
                }
            }
        }
}

// ---------------------------------------------------------------------------------------------
// Routing (SPEC §2.1/§2.2): logits s = x R (R: (D, E)); the chosen set S = top-k of s + b, ties to
// the lower expert index, in descending order of s + b; gates w = softmax over S of the unbiased s.
// The bias b steers selection only and has no gradient.

template <class T>
void router_logits(T* s, const T* x, const T* R, int D, int E) {
    for (int e = 0; e < E; e++) s[e] = 0;
    for (int i = 0; i < D; i++)
        for (int e = 0; e < E; e++) s[e] += x[i] * R[(int64_t)i * E + e];
}

template <class T>
void select_topk(int* sel, const T* s, const float* bias, int E, int k) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            if (std::find(sel, sel + j, e) != sel + j) continue;
            if (best < 0 || s[e] + T(bias[e]) > s[best] + T(bias[best])) best = e;  // strict: ties keep the lower index
        }
        sel[j] = best;
    }
}

template <class T>
void softmax_gates(T* gate, const T* s, const int* sel, int k) {
    T mx = s[sel[0]];
    for (int j = 1; j < k; j++) mx = std::max(mx, s[sel[j]]);
    T sum = 0;
    for (int j = 0; j < k; j++) sum += (gate[j] = std::exp(s[sel[j]] - mx));
    for (int j = 0; j < k; j++) gate[j] /= sum;
}

// Backward of w = softmax(s_S): ds_j = w_j (dw_j − Σ_i w_i dw_i).
template <class T>
void softmax_gates_backward(T* ds_sel, const T* gate, const T* dgate, int k) {
    T dot = 0;
    for (int j = 0; j < k; j++) dot += gate[j] * dgate[j];
    for (int j = 0; j < k; j++) ds_sel[j] = gate[j] * (dgate[j] - dot);
}

// ---------------------------------------------------------------------------------------------
// One expert on one row x (D): o = W_out^T GELU(W_in x) with W_in: (F, D) and W_out stored either
// as (F, D) (LatentMoE's V) or as (D, F) (the MoE's W2); ExpertLayout hides the difference.

struct ExpertLayout {
    int D, F;
    bool out_is_FxD;  // true: W_out[f, j] at f·D + j;  false: at j·F + f
    int64_t out_index(int f, int j) const { return out_is_FxD ? (int64_t)f * D + j : (int64_t)j * F + f; }
    int64_t size() const { return (int64_t)D * F; }  // elements in one expert's matrix
};

template <class T>
void expert_forward(T* o, const T* x, const T* w_in, const T* w_out, const ExpertLayout& L) {
    for (int j = 0; j < L.D; j++) o[j] = 0;
    for (int f = 0; f < L.F; f++) {
        T h = 0;
        for (int i = 0; i < L.D; i++) h += w_in[(int64_t)f * L.D + i] * x[i];
        T a = gelu(h);
        for (int j = 0; j < L.D; j++) o[j] += a * w_out[L.out_index(f, j)];
    }
}

// Recomputes the hidden row (as the IO-aware kernels do) and accumulates
// dW_out[f, j] += a_f do_j;  dh = (W_out do) ⊙ gelu'(h);  dW_in += dh x^T;  dx += W_in^T dh.
template <class T>
void expert_backward(T* dx, T* dw_in, T* dw_out, const T* dout, const T* x, const T* w_in, const T* w_out,
                     const ExpertLayout& L) {
    for (int f = 0; f < L.F; f++) {
        T h = 0;
        for (int i = 0; i < L.D; i++) h += w_in[(int64_t)f * L.D + i] * x[i];
        T a = gelu(h), da = 0;
        for (int j = 0; j < L.D; j++) {
            da += w_out[L.out_index(f, j)] * dout[j];
            dw_out[L.out_index(f, j)] += a * dout[j];
        }
        T dh = da * gelu_grad(h);
        for (int i = 0; i < L.D; i++) {
            dw_in[(int64_t)f * L.D + i] += dh * x[i];
            dx[i] += dh * w_in[(int64_t)f * L.D + i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A routed expert layer over M rows of width D (rows `ld` apart): the sub-tokens of one LatentMoE
// head, or the tokens of the MoE. y[t] = Σ_{j∈S[t]} w[t,j] · expert_{S[t,j]}(x[t]).
// With freeze_selection the chosen experts in `sel` are kept (for finite differences) and only the
// gates are recomputed, so the function stays differentiable.

template <class T>
struct ExpertBank {   // the E experts of one head (or of the MoE layer) and their router
    const T* router;  // (D, E): R; LocMoE's (E): ε
    const T* w_in;    // (E, F, D)
    const T* w_out;   // E matrices of ExpertLayout
    const float* bias;  // (E): selection-only bias
    int E, k;
    ExpertLayout layout;
};

template <class T>
struct ExpertBankGrad { T *router, *w_in, *w_out; };

template <class T>
void routed_forward(T* y, int64_t ld_y, const T* x, int64_t ld_x, int M, const ExpertBank<T>& bank, int* sel,
                    T* gate, bool freeze_selection) {
    const ExpertLayout& L = bank.layout;
    std::vector<T> s(bank.E), o(L.D);
    for (int t = 0; t < M; t++) {
        const T* xt = x + t * ld_x;
        T* yt = y + t * ld_y;
        int* st = sel + (int64_t)t * bank.k;
        T* wt = gate + (int64_t)t * bank.k;
        router_logits(s.data(), xt, bank.router, L.D, bank.E);
        if (!freeze_selection) select_topk(st, s.data(), bank.bias, bank.E, bank.k);
        softmax_gates(wt, s.data(), st, bank.k);
        for (int j = 0; j < L.D; j++) yt[j] = 0;
        for (int j = 0; j < bank.k; j++) {
            expert_forward(o.data(), xt, bank.w_in + st[j] * L.size(), bank.w_out + st[j] * L.size(), L);
            for (int i = 0; i < L.D; i++) yt[i] += wt[j] * o[i];
        }
    }
}

// The backward of one copy of row x, gate w, on expert e, for dy: do = w dy through the expert
// (accumulating its weight gradients), the copy's dx formed on its own and then added to dx (as a
// distributed layer adds copies coming back from their experts' owners); returns dw = dy·o.
template <class T>
struct CopyBackward {
    std::vector<T> o, dout, dx_copy;  // scratch, reused from copy to copy
    explicit CopyBackward(int D) : o(D), dout(D), dx_copy(D) {}
    T operator()(T* dx, const ExpertBankGrad<T>& grad, const T* dy, const T* x, const ExpertBank<T>& bank, int e,
                 T w) {
        const ExpertLayout& L = bank.layout;
        const T* w_in = bank.w_in + e * L.size();
        const T* w_out = bank.w_out + e * L.size();
        expert_forward(o.data(), x, w_in, w_out, L);
        T dgate = 0;
        for (int i = 0; i < L.D; i++) {
            dgate += dy[i] * o[i];
            dout[i] = w * dy[i];
        }
        std::fill(dx_copy.begin(), dx_copy.end(), T(0));
        expert_backward(dx_copy.data(), grad.w_in + e * L.size(), grad.w_out + e * L.size(), dout.data(), x, w_in,
                        w_out, L);
        for (int i = 0; i < L.D; i++) dx[i] += dx_copy[i];
        return dgate;
    }
};

// Backward of routed_forward: dw_j = dy·o_j, do_j = w_j dy (expert backward), then the gate softmax
// and the router, touching only the k chosen columns: dR[:, e] += x ds_e, dx += R[:, e] ds_e.
// Each copy's dx is formed on its own and then added in slot order, as a distributed layer does when
// copies come back from their experts' owners; so the simulated ranks can match this bit for bit.
template <class T>
void routed_backward(T* dx, int64_t ld_dx, const ExpertBankGrad<T>& grad, const T* dy, int64_t ld_dy, const T* x,
                     int64_t ld_x, int M, const ExpertBank<T>& bank, const int* sel, const T* gate) {
    const ExpertLayout& L = bank.layout;
    const int k = bank.k, E = bank.E;
    CopyBackward<T> copy(L.D);
    std::vector<T> dgate(k), ds(k);
    for (int t = 0; t < M; t++) {
        const T *xt = x + t * ld_x, *dyt = dy + t * ld_dy, *wt = gate + (int64_t)t * k;
        const int* st = sel + (int64_t)t * k;
        T* dxt = dx + t * ld_dx;
        for (int j = 0; j < k; j++) dgate[j] = copy(dxt, grad, dyt, xt, bank, st[j], wt[j]);
        softmax_gates_backward(ds.data(), wt, dgate.data(), k);
        for (int j = 0; j < k; j++)
            for (int i = 0; i < L.D; i++) {
                grad.router[(int64_t)i * E + st[j]] += xt[i] * ds[j];
                dxt[i] += bank.router[(int64_t)i * E + st[j]] * ds[j];
            }
    }
}

// ---------------------------------------------------------------------------------------------
// LocMoE's routed layer (SPEC §2.6) over one rank's micro-batch of M rows: p = the GrAP gate of each
// row (cpu/locmoe.h), S = top-k of p (ties to the lower index), the copies over capacity dropped, and
//   y[t] = Σ_{kept j} p[t, e_j] · expert_{e_j}(x[t])        (bank.router is ε; the bank's bias unused)
// With freeze_selection the choices in `sel` are kept (the drop follows from them), for finite
// differences. Returns the micro-batch's L_aux, L_loc and dropped copies.

template <class T>
struct LocMoeResult {
    T aux = 0, loc = 0;
    int64_t dropped = 0;
};

// The GrAP probabilities p and pre-ReLU z, (M, E) each, of M rows.
template <class T>
void grap_rows(std::vector<T>& p, std::vector<T>& z, const T* x, int64_t ld_x, int M, const T* eps, int D, int E) {
    p.resize((size_t)M * E);
    z.resize((size_t)M * E);
    for (int t = 0; t < M; t++) grap_probs(p.data() + (int64_t)t * E, z.data() + (int64_t)t * E, x + t * ld_x, eps, D, E);
}

template <class T>
LocMoeResult<T> locmoe_forward(T* y, int64_t ld_y, const T* x, int64_t ld_x, int M, const ExpertBank<T>& bank,
                               const lmoe::LocMoeSetup& s, int* sel, T* gate, char* kept, bool freeze_selection) {
    const ExpertLayout& L = bank.layout;
    const int E = bank.E, k = bank.k;
    std::vector<T> p, z, o(L.D);
    grap_rows(p, z, x, ld_x, M, bank.router, L.D, E);
    const std::vector<float> no_bias(E, 0.f);
    for (int t = 0; t < M; t++) {
        int* st = sel + (int64_t)t * k;
        if (!freeze_selection) select_topk(st, p.data() + (int64_t)t * E, no_bias.data(), E, k);
        for (int j = 0; j < k; j++) gate[(int64_t)t * k + j] = p[(int64_t)t * E + st[j]];
    }
    LocMoeResult<T> r;
    r.dropped = capacity_keep(kept, sel, M, E, k, s.capacity);
    const RouterLosses<T> losses = locmoe_losses(p.data(), sel, M, E, k, s);
    r.aux = losses.aux;
    r.loc = losses.loc;
    for (int t = 0; t < M; t++) {
        T* yt = y + t * ld_y;
        for (int i = 0; i < L.D; i++) yt[i] = 0;
        for (int j = 0; j < k; j++) {
            const int64_t c = (int64_t)t * k + j;
            if (!kept[c]) continue;
            expert_forward(o.data(), x + t * ld_x, bank.w_in + sel[c] * L.size(), bank.w_out + sel[c] * L.size(), L);
            for (int i = 0; i < L.D; i++) yt[i] += gate[c] * o[i];
        }
    }
    return r;
}

// Backward of locmoe_forward; the auxiliary losses' gradient is scaled by loss_scale (dy already is).
// Per kept copy the expert backward and dw_j = dy·o_j (CopyBackward), then per row
//   dp[t, i] = loss_scale · dL/dp[t, i] + Σ_{kept j: e_j = i} dw_j
// through the GrAP gate into dε (grad.router) and dx.
template <class T>
void locmoe_backward(T* dx, int64_t ld_dx, const ExpertBankGrad<T>& grad, const T* dy, int64_t ld_dy, const T* x,
                     int64_t ld_x, int M, const ExpertBank<T>& bank, const lmoe::LocMoeSetup& s, const int* sel,
                     const T* gate, const char* kept, T loss_scale) {
    const ExpertLayout& L = bank.layout;
    const int E = bank.E, k = bank.k;
    std::vector<T> p, z, dp(E);
    grap_rows(p, z, x, ld_x, M, bank.router, L.D, E);
    const RouterLosses<T> losses = locmoe_losses(p.data(), sel, M, E, k, s);
    CopyBackward<T> copy(L.D);
    for (int t = 0; t < M; t++) {
        const T* xt = x + t * ld_x;
        T* dxt = dx + t * ld_dx;
        for (int i = 0; i < E; i++) dp[i] = loss_scale * losses.dp[i];
        for (int j = 0; j < k; j++) {
            const int64_t c = (int64_t)t * k + j;
            if (kept[c]) dp[sel[c]] += copy(dxt, grad, dy + t * ld_dy, xt, bank, sel[c], gate[c]);
        }
        grap_backward(dxt, grad.router, dp.data(), p.data() + (int64_t)t * E, z.data() + (int64_t)t * E, L.D, E);
    }
}

// ---------------------------------------------------------------------------------------------
// The two FFNs. Both are routed expert layers; LatentMoE wraps H of them (one per head, on the
// head's dh-wide slice of u = x W_mh^T) between the projections W_mh and W_mg.

// Where one rank's FFN sits among R ranks: `world` ranks, nodes of `node_size` consecutive ones. LocMoE's
// locality target D_l depends on it (SPEC §2.6); one rank by default, whose D_l is uniform.
struct RankPlace {
    int rank = 0, world = 1, node_size = 1;
};

template <class T>
struct FfnCache {          // what the FFN's backward needs from its forward
    std::vector<T> u, y;   // LatentMoE: (N, H·dh) sub-tokens and head outputs
    std::vector<int> sel;  // (H, N, k) chosen experts
    std::vector<T> gate;   // (H, N, k) their gates
    // LocMoE only: its capacity, loss weights and D_l, which copies the capacity kept (N, k), and the
    // forward's losses and drops
    lmoe::LocMoeSetup locmoe;
    std::vector<char> kept;
    T aux_loss = 0, loc_loss = 0;
    int64_t dropped = 0;
};

template <class T>
ExpertBank<T> head_bank(const Config& c, const typename lmoe::ModelTensors<T>::Layer& w, const float* bias, int h) {
    const bool hp = c.ffn == FfnKind::LatentMoE;
    ExpertLayout L{c.dh, c.fe, hp};
    int64_t per_head = (int64_t)c.E * L.size();
    const T* router = c.locmoe() ? w.router_eps : w.router + (int64_t)h * c.dh * c.E;
    return {router, w.expert_in + h * per_head, w.expert_out + h * per_head, bias + (int64_t)h * c.E, c.E, c.k, L};
}

template <class T>
ExpertBankGrad<T> head_bank_grad(const Config& c, const typename lmoe::ModelTensors<T>::Layer& g, int h) {
    int64_t per_head = (int64_t)c.E * c.dh * c.fe;
    T* router = c.locmoe() ? g.router_eps : g.router + (int64_t)h * c.dh * c.E;
    return {router, g.expert_in + h * per_head, g.expert_out + h * per_head};
}

// out (N, d) = FFN(x (N, d)); bias (H, E); place: the rank's, for LocMoE's D_l.
template <class T>
void ffn_forward(T* out, const T* x, int N, const Config& c, const typename lmoe::ModelTensors<T>::Layer& w,
                 const float* bias, FfnCache<T>& cache, bool freeze_selection, const RankPlace& place = {}) {
    const int64_t HD = (int64_t)c.H * c.dh;
    cache.sel.resize((size_t)c.H * N * c.k);
    cache.gate.resize((size_t)c.H * N * c.k);
    if (c.locmoe()) {
        cache.locmoe = lmoe::locmoe_setup(c, N, place.rank, place.world, place.node_size);
        cache.kept.resize((size_t)N * c.k);
        const LocMoeResult<T> r =
            locmoe_forward(out, c.d, x, c.d, N, head_bank<T>(c, w, bias, 0), cache.locmoe, cache.sel.data(),
                           cache.gate.data(), cache.kept.data(), freeze_selection);
        cache.aux_loss = r.aux;
        cache.loc_loss = r.loc;
        cache.dropped = r.dropped;
        return;
    }
    if (c.ffn == FfnKind::MoE) {
        routed_forward(out, c.d, x, c.d, N, head_bank<T>(c, w, bias, 0), cache.sel.data(), cache.gate.data(),
                       freeze_selection);
        return;
    }
    cache.u.resize(N * HD);
    cache.y.resize(N * HD);
    matmul_forward(cache.u.data(), x, w.ffn_in, N, c.d, (int)HD);  // project
    for (int h = 0; h < c.H; h++)                                   // route + experts, per head
        routed_forward(cache.y.data() + h * c.dh, HD, cache.u.data() + h * c.dh, HD, N, head_bank<T>(c, w, bias, h),
                       cache.sel.data() + (int64_t)h * N * c.k, cache.gate.data() + (int64_t)h * N * c.k,
                       freeze_selection);
    matmul_forward(out, cache.y.data(), w.ffn_out, N, (int)HD, c.d);  // merge
}

// loss_scale: d(objective)/d(loss) for the gradient of LocMoE's auxiliary losses (dout already has it).
template <class T>
void ffn_backward(T* dx, const typename lmoe::ModelTensors<T>::Layer& g, const T* dout, const T* x, int N,
                  const Config& c, const typename lmoe::ModelTensors<T>::Layer& w, const float* bias,
                  const FfnCache<T>& cache, T loss_scale = T(1)) {
    const int64_t HD = (int64_t)c.H * c.dh;
    if (c.locmoe()) {
        locmoe_backward(dx, c.d, head_bank_grad<T>(c, g, 0), dout, c.d, x, c.d, N, head_bank<T>(c, w, bias, 0),
                        cache.locmoe, cache.sel.data(), cache.gate.data(), cache.kept.data(), loss_scale);
        return;
    }
    if (c.ffn == FfnKind::MoE) {
        routed_backward(dx, c.d, head_bank_grad<T>(c, g, 0), dout, c.d, x, c.d, N, head_bank<T>(c, w, bias, 0),
                        cache.sel.data(), cache.gate.data());
        return;
    }
    std::vector<T> dy(N * HD, T(0)), du(N * HD, T(0));
    matmul_backward(dy.data(), g.ffn_out, dout, cache.y.data(), w.ffn_out, N, (int)HD, c.d);
    for (int h = 0; h < c.H; h++)
        routed_backward(du.data() + h * c.dh, HD, head_bank_grad<T>(c, g, h), dy.data() + h * c.dh, HD,
                        cache.u.data() + h * c.dh, HD, N, head_bank<T>(c, w, bias, h),
                        cache.sel.data() + (int64_t)h * N * c.k, cache.gate.data() + (int64_t)h * N * c.k);
    matmul_backward(dx, g.ffn_in, du.data(), x, w.ffn_in, N, c.d, (int)HD);
}

// ---------------------------------------------------------------------------------------------
// LM head and loss: logits = x W_lm^T over the padded vocabulary Vp; only the first V count.
// loss = mean_t (logsumexp_{v<V} z_t − z_t[target]);  dz = (softmax − onehot) · dloss / N.

template <class T>
T cross_entropy_forward(T* probs, const T* logits, const int* targets, int N, int V, int Vp) {
    T loss = 0;
    for (int t = 0; t < N; t++) {
        const T* z = logits + (int64_t)t * Vp;
        T* p = probs + (int64_t)t * Vp;
        T mx = *std::max_element(z, z + V), sum = 0;
        for (int v = 0; v < V; v++) sum += (p[v] = std::exp(z[v] - mx));
        for (int v = 0; v < Vp; v++) p[v] = v < V ? p[v] / sum : T(0);
        loss += -std::log(p[targets[t]]);
    }
    return loss / T(N);
}

template <class T>
void cross_entropy_backward(T* dlogits, const T* probs, const int* targets, int N, int Vp, T dloss) {
    for (int t = 0; t < N; t++)
        for (int v = 0; v < Vp; v++)
            dlogits[(int64_t)t * Vp + v] = (probs[(int64_t)t * Vp + v] - T(v == targets[t])) * dloss / T(N);
}

// ---------------------------------------------------------------------------------------------
// The whole model (SPEC §2) on one rank: parameters, gradients, the selection-only routing bias
// (L, H, E) and what backward needs from forward.

template <class T>
struct Model {
    Config cfg;
    lmoe::ParamLayout layout;
    std::vector<T> params, grads;
    std::vector<float> routing_bias;  // (L, H, E); the MoE has H = 1
    lmoe::ModelTensors<T> w, g;
    RankPlace place;  // LocMoE: the rank this model stands for, which sets each layer's D_l

    // activations of the last forward, per layer where marked
    int B = 0, N = 0;
    std::vector<int> tokens, targets;
    std::vector<std::vector<T>> x_in, xn1, rstd1, qkv, probs, attn, x_mid, xn2, rstd2;  // per layer
    std::vector<FfnCache<T>> ffn;                                                       // per layer
    std::vector<T> x_out, xf, rstdf, logits, lm_probs;

    explicit Model(const Config& c) : cfg(c), layout(lmoe::build_param_layout(c)) {
        params.assign(layout.total, T(0));
        grads.assign(layout.total, T(0));
        routing_bias.assign((size_t)c.L * c.H * c.E, 0.f);
        lmoe::init_params(params.data(), layout, c.seed);
        w = lmoe::bind_tensors(layout, params.data(), c.L, c.ffn);
        g = lmoe::bind_tensors(layout, grads.data(), c.L, c.ffn);
    }
    const float* bias(int l) const { return routing_bias.data() + (size_t)l * cfg.H * cfg.E; }
    void zero_grad() { std::fill(grads.begin(), grads.end(), T(0)); }

    // The last forward's mean cross-entropy over the B·T tokens and, for LocMoE, its auxiliary losses
    // summed over the layers (zero for the other routers).
    T cross_entropy = 0, aux_loss = 0, loc_loss = 0;

    // The objective backward() differentiates: the mean cross-entropy over the B·T tokens plus, for
    // LocMoE, L_aux + L_loc of every layer. With freeze_selection, every FFN reuses the experts it
    // chose in the previous forward (finite differences need the routing held fixed).
    T forward(const int* tok, const int* tgt, int batch, bool freeze_selection = false) {
        const Config& c = cfg;
        const int d = c.d, C = c.n_head * c.d_attn();
        B = batch;
        N = B * c.T;
        tokens.assign(tok, tok + N);
        targets.assign(tgt, tgt + N);
        auto sized = [](std::vector<std::vector<T>>& v, int L, size_t n) {
            v.resize(L);
            for (auto& e : v) e.resize(n);
        };
        sized(x_in, c.L, (size_t)N * d); sized(xn1, c.L, (size_t)N * d); sized(rstd1, c.L, N);
        sized(qkv, c.L, (size_t)N * 3 * C); sized(probs, c.L, (size_t)B * c.n_head * c.T * c.T);
        sized(attn, c.L, (size_t)N * C); sized(x_mid, c.L, (size_t)N * d); sized(xn2, c.L, (size_t)N * d);
        sized(rstd2, c.L, N);
        ffn.resize(c.L);
        std::vector<T> x((size_t)N * d), tmp((size_t)N * d);
        embedding_forward(x.data(), tokens.data(), w.wte, N, d);
        for (int l = 0; l < c.L; l++) {
            const auto& wl = w.layers[l];
            x_in[l] = x;
            rmsnorm_forward(xn1[l].data(), rstd1[l].data(), x.data(), wl.ln1, N, d);
            matmul_forward(qkv[l].data(), xn1[l].data(), wl.qkv, N, d, 3 * C);
            rope_forward(qkv[l].data(), B, c.T, c.n_head, c.d_attn());
            attention_forward(attn[l].data(), probs[l].data(), qkv[l].data(), B, c.T, c.n_head, c.d_attn());
            matmul_forward(tmp.data(), attn[l].data(), wl.attn_out, N, C, d);
            for (size_t i = 0; i < x.size(); i++) x[i] += tmp[i];
            x_mid[l] = x;
            rmsnorm_forward(xn2[l].data(), rstd2[l].data(), x.data(), wl.ln2, N, d);
            ffn_forward(tmp.data(), xn2[l].data(), N, c, wl, bias(l), ffn[l], freeze_selection, place);
            for (size_t i = 0; i < x.size(); i++) x[i] += tmp[i];
        }
        x_out = x;
        xf.resize((size_t)N * d);
        rstdf.resize(N);
        logits.resize((size_t)N * c.Vp());
        lm_probs.resize((size_t)N * c.Vp());
        rmsnorm_forward(xf.data(), rstdf.data(), x.data(), w.lnf, N, d);
        matmul_forward(logits.data(), xf.data(), w.lm_head, N, d, c.Vp());
        cross_entropy = cross_entropy_forward(lm_probs.data(), logits.data(), targets.data(), N, c.V, c.Vp());
        if (!c.locmoe()) return cross_entropy;
        aux_loss = loc_loss = 0;
        for (const FfnCache<T>& f : ffn) {
            aux_loss += f.aux_loss;
            loc_loss += f.loc_loss;
        }
        return cross_entropy + aux_loss + loc_loss;
    }

    // Accumulates d(loss · loss_scale)/dθ into grads (loss_scale = 1/grad_accum for accumulation).
    void backward(T loss_scale = T(1)) {
        const Config& c = cfg;
        const int d = c.d, C = c.n_head * c.d_attn();
        std::vector<T> dlogits((size_t)N * c.Vp()), dxf((size_t)N * d, T(0)), dx((size_t)N * d, T(0));
        cross_entropy_backward(dlogits.data(), lm_probs.data(), targets.data(), N, c.Vp(), loss_scale);
        matmul_backward(dxf.data(), g.lm_head, dlogits.data(), xf.data(), w.lm_head, N, d, c.Vp());
        rmsnorm_backward(dx.data(), g.lnf, dxf.data(), x_out.data(), w.lnf, rstdf.data(), N, d);
        for (int l = c.L - 1; l >= 0; l--) {  // dx holds d loss / d (residual stream after layer l)
            const auto &wl = w.layers[l], &gl = g.layers[l];
            std::vector<T> dxn((size_t)N * d, T(0)), dattn((size_t)N * C, T(0)), dqkv((size_t)N * 3 * C, T(0));
            ffn_backward(dxn.data(), gl, dx.data(), xn2[l].data(), N, c, wl, bias(l), ffn[l], loss_scale);
            rmsnorm_backward(dx.data(), gl.ln2, dxn.data(), x_mid[l].data(), wl.ln2, rstd2[l].data(), N, d);
            std::fill(dxn.begin(), dxn.end(), T(0));
            matmul_backward(dattn.data(), gl.attn_out, dx.data(), attn[l].data(), wl.attn_out, N, C, d);
            attention_backward(dqkv.data(), dattn.data(), qkv[l].data(), probs[l].data(), B, c.T, c.n_head,
                               c.d_attn());
            rope_backward(dqkv.data(), B, c.T, c.n_head, c.d_attn());
            matmul_backward(dxn.data(), gl.qkv, dqkv.data(), xn1[l].data(), wl.qkv, N, d, 3 * C);
            rmsnorm_backward(dx.data(), gl.ln1, dxn.data(), x_in[l].data(), wl.ln1, rstd1[l].data(), N, d);
        }
        embedding_backward(g.wte, dx.data(), tokens.data(), N, d);
    }

    // Routed slots per (layer, head, expert) in the last forward: the load the bias update uses
    // (LocMoE: the slots its capacity kept, the rows each expert computed).
    void add_expert_counts(std::vector<int64_t>& counts) const {
        counts.resize((size_t)cfg.L * cfg.H * cfg.E, 0);
        for (int l = 0; l < cfg.L; l++)
            for (int h = 0; h < cfg.H; h++)
                for (int64_t i = 0; i < (int64_t)N * cfg.k; i++)
                    if (ffn[l].kept.empty() || ffn[l].kept[i])
                        counts[((size_t)l * cfg.H + h) * cfg.E + ffn[l].sel[(size_t)h * N * cfg.k + i]]++;
    }
};

// ---------------------------------------------------------------------------------------------
// Optimizer pieces (SPEC §2.3–§2.4), shared by the CPU path and used as the GPU kernels' oracle.

// AdamW step t (1-based): m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;
// θ −= lr · ( m̂ / (√v̂ + ε) + wd·θ ), with m̂ = m/(1−β1^t), v̂ = v/(1−β2^t); wd only where decay.
struct AdamW {
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
};

template <class T>
void adamw_update(T* theta, T* m, T* v, const T* grad, int64_t n, double lr, double wd, int t, const AdamW& hp = {}) {
    const double c1 = 1.0 - std::pow(hp.beta1, t), c2 = 1.0 - std::pow(hp.beta2, t);
    for (int64_t i = 0; i < n; i++) {
        m[i] = T(hp.beta1 * m[i] + (1 - hp.beta1) * grad[i]);
        v[i] = T(hp.beta2 * v[i] + (1 - hp.beta2) * grad[i] * grad[i]);
        double mhat = m[i] / c1, vhat = v[i] / c2;
        theta[i] = T(theta[i] - lr * (mhat / (std::sqrt(vhat) + hp.eps) + wd * theta[i]));
    }
}

// Global gradient norm; if it exceeds `clip` (> 0) every gradient is scaled by clip / norm.
// Returns the norm before clipping.
template <class T>
double clip_grad_norm(T* grads, int64_t n, double clip) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += double(grads[i]) * grads[i];
    double norm = std::sqrt(ss);
    if (clip > 0 && norm > clip)
        for (int64_t i = 0; i < n; i++) grads[i] = T(grads[i] * (clip / norm));
    return norm;
}

// Aux-loss-free balancing for one group of E experts (one layer's head): load_e = count_e / Σ count;
// b += γ · (sign(mean(load) − load) − mean_e sign(mean(load) − load)).
inline void update_routing_bias(float* bias, const int64_t* counts, int E, double gamma) {
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += counts[e];
    if (total == 0 || gamma == 0) return;
    std::vector<double> sgn(E);
    double mean_sign = 0;
    for (int e = 0; e < E; e++) {
        int64_t gap = total - (int64_t)E * counts[e];  // sign(1/E − load_e), exact in integers
        sgn[e] = (gap > 0) - (gap < 0);
        mean_sign += sgn[e] / E;
    }
    for (int e = 0; e < E; e++) bias[e] = float(bias[e] + gamma * (sgn[e] - mean_sign));
}

}  // namespace ref
