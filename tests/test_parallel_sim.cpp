// Head Parallel and Expert Parallel simulated over R = 1, 2, 4 and 8 virtual ranks on the CPU
// (SPEC §3, §8.2). Each rank holds only its shard of the expert tensors (build_param_layout with
// rank/world); data moves between ranks only through all_to_all and exchange below, which also count
// the bytes on the wire, and Expert Parallel's all-gather of its count table. The distributed layer must reproduce the one-rank layer: outputs, input gradients and
// expert gradients bit for bit (each row sees the same arithmetic in the same order), replicated
// gradients up to the order of the cross-rank sum. Expert Parallel runs with either router: the
// top-k router of SPEC §2.2 or LocMoE's (§2.6), and every exchange is hierarchical over nodes of 1, 2
// or 4 ranks, so each rank's bytes within and across nodes are counted apart. Head Parallel × Expert
// Parallel runs every (P, Q) of R = 2 … 16 ranks that the tiny and small presets' H and E allow.
#include <cstdio>
#include <string>

#include "cpu/reference.h"
#include "parallel/expert_splits.h"
#include "parallel/hybrid.h"
#include "util/rng.h"
#include "tests/check.h"

using Vec = std::vector<double>;
using Blocks = std::vector<std::vector<Vec>>;  // [from rank][to rank]
using Layer = lmoe::ModelTensors<double>::Layer;

constexpr int kBf16Bytes = 2, kCountBytes = 4;

// The simulated network: rank r's block for q becomes rank q's block from r. Counts the bytes each
// rank sends to other ranks (elements go as bf16 on the real wire). The count exchange uses it as is.
Blocks all_to_all(const Blocks& send, std::vector<int64_t>& bytes_sent, int bytes_per_element) {
    const int R = (int)send.size();
    Blocks recv(R, std::vector<Vec>(R));
    for (int r = 0; r < R; r++)
        for (int q = 0; q < R; q++) {
            recv[q][r] = send[r][q];
            if (q != r) bytes_sent[r] += (int64_t)send[r][q].size() * bytes_per_element;
        }
    return recv;
}

// The bytes each rank sent within its node and to other nodes.
struct Wire {
    int node_size;  // consecutive ranks per node
    std::vector<int64_t> within, across;
    Wire(int R, int node_size) : node_size(node_size), within(R, 0), across(R, 0) {}
    int64_t total(int r) const { return within[r] + across[r]; }
};

// The rank that carries a block from r to q across nodes (SPEC §2.6's hierarchical exchange): the rank
// of r's node with q's local index. Within one node, q itself.
int relay_rank(int r, int q, int node_size) {
    return r / node_size == q / node_size ? q : r / node_size * node_size + q % node_size;
}

// The same delivery as all_to_all, in two stages: each block for another node first moves within the
// source's node to relay_rank, then each relay sends one transfer per peer node (the blocks of its
// node's ranks for the one rank of that node with its local index).
Blocks exchange(const Blocks& send, Wire& wire, int bytes_per_element) {
    const int R = (int)send.size();
    Blocks recv(R, std::vector<Vec>(R));
    std::vector<std::vector<int64_t>> transfer(R, std::vector<int64_t>(R, 0));  // [relay][destination] elements
    for (int r = 0; r < R; r++)
        for (int q = 0; q < R; q++) {
            const int relay = relay_rank(r, q, wire.node_size);
            const int64_t bytes = (int64_t)send[r][q].size() * bytes_per_element;
            if (relay != r) wire.within[r] += bytes;  // stage 1, within the node
            if (relay != q) transfer[relay][q] += bytes;
            recv[q][r] = send[r][q];
        }
    for (int relay = 0; relay < R; relay++)  // stage 2: one transfer per peer node
        for (int q = 0; q < R; q++) wire.across[relay] += transfer[relay][q];
    return recv;
}

// One rank's parameters and gradients, laid out and initialised as on a real rank.
struct RankState {
    lmoe::ParamLayout layout;
    Vec params, grads;
    Layer w, g;
    RankState(const lmoe::Config& c, int rank, int world, double scale)
        : layout(lmoe::build_param_layout(c, rank, world)), params(layout.total), grads(layout.total, 0.0) {
        lmoe::init_params(params.data(), layout, c.seed);
        for (double& p : params) p *= scale;  // larger weights than 0.02 give routing with clear margins
        w = lmoe::bind_tensors(layout, params.data(), 1, c.ffn).layers[0];
        g = lmoe::bind_tensors(layout, grads.data(), 1, c.ffn).layers[0];
        if (c.locmoe())  // ε starts at zero in training; here it is random (the same on every rank)
            for (int e = 0; e < c.E; e++) w.router_eps[e] = 0.3 * lmoe::normal_at(c.seed, 999, e);
    }
};

struct LayerRun {
    Vec out, dx;           // (N, d) for all tokens, in global order
    Vec grads;             // the one-rank layout: expert shards placed, replicated gradients summed
    std::vector<int64_t> within, across, meta_bytes;  // sent to other ranks, per rank
    Vec aux, loc;          // LocMoE: each rank's L_aux and L_loc
    std::vector<std::vector<int>> sel;    // Expert Parallel: each rank's choices (Nr, k)
    std::vector<std::vector<char>> kept;  // and which of them its capacity kept
};

// Gathers per-rank gradients into the one-rank layout.
Vec assemble_grads(const lmoe::Config& c, const std::vector<RankState>& ranks) {
    lmoe::ParamLayout global = lmoe::build_param_layout(c);
    Vec out(global.total, 0.0);
    for (const RankState& rs : ranks)
        for (const lmoe::TensorSpec& t : rs.layout.tensors) {
            const lmoe::TensorSpec& gt = global.find(t.name);
            for (int64_t i = 0; i < t.numel; i++) out[gt.offset + t.global_first + i] += rs.grads[t.offset + i];
        }
    return out;
}

Vec rows(const Vec& m, int first, int count, int width) {
    return Vec(m.begin() + (int64_t)first * width, m.begin() + (int64_t)(first + count) * width);
}

// The one-rank layer, on all N tokens.
LayerRun run_single(const lmoe::Config& c, const Vec& x, const Vec& dout, const std::vector<float>& bias, int N,
                    double scale) {
    RankState rs(c, 0, 1, scale);
    LayerRun run;
    run.out.assign((size_t)N * c.d, 0.0);
    run.dx.assign((size_t)N * c.d, 0.0);
    ref::FfnCache<double> cache;
    ref::ffn_forward(run.out.data(), x.data(), N, c, rs.w, bias.data(), cache, false);
    ref::ffn_backward(run.dx.data(), rs.g, dout.data(), x.data(), N, c, rs.w, bias.data(), cache);
    run.grads = rs.grads;
    return run;
}

// ---------------------------------------------------------------------------------------------
// Head Parallel: rank q owns heads [q·H/R, (q+1)·H/R). Project locally, send each head-owner its
// heads' columns of every local token (equal blocks, no metadata), route and compute there on all
// R·Nr tokens, send the outputs back in the same blocks, merge locally. Backward mirrors it.

// Splits each rank's (Nr, H·dh) matrix into per-owner column blocks (Nr, H/R·dh).
Blocks split_by_head_owner(const std::vector<Vec>& m, int Nr, int HD, int R) {
    const int width = HD / R;
    Blocks send(R, std::vector<Vec>(R));
    for (int r = 0; r < R; r++)
        for (int q = 0; q < R; q++)
            for (int t = 0; t < Nr; t++)
                send[r][q].insert(send[r][q].end(), m[r].begin() + (int64_t)t * HD + q * width,
                                  m[r].begin() + (int64_t)t * HD + (q + 1) * width);
    return send;
}

// Inverse of split_by_head_owner on the receiving side: rank r's blocks from every owner -> (Nr, H·dh).
Vec join_head_blocks(const std::vector<Vec>& from_owner, int Nr, int HD, int R) {
    const int width = HD / R;
    Vec m((size_t)Nr * HD);
    for (int q = 0; q < R; q++)
        for (int t = 0; t < Nr; t++)
            std::copy(from_owner[q].begin() + (int64_t)t * width, from_owner[q].begin() + (int64_t)(t + 1) * width,
                      m.begin() + (int64_t)t * HD + q * width);
    return m;
}

LayerRun run_head_parallel(const lmoe::Config& c, const Vec& x, const Vec& dout, const std::vector<float>& bias,
                           int N, int R, int node_size, double scale) {
    const int Nr = N / R, HD = c.H * c.dh, Hr = c.H / R, width = Hr * c.dh, d = c.d;
    std::vector<RankState> ranks;
    for (int r = 0; r < R; r++) ranks.emplace_back(c, r, R, scale);
    LayerRun run;
    Wire wire(R, node_size);

    // project: u_r = x_r W_mh^T                                     (Nr, H·dh) per rank
    std::vector<Vec> u(R, Vec((size_t)Nr * HD));
    for (int r = 0; r < R; r++)
        ref::matmul_forward(u[r].data(), rows(x, r * Nr, Nr, d).data(), ranks[r].w.ffn_in, Nr, d, HD);
    // exchange: owner q gets its heads' columns of all R·Nr tokens  (R·Nr, H/R·dh) per owner
    Blocks got = exchange(split_by_head_owner(u, Nr, HD, R), wire, kBf16Bytes);
    std::vector<Vec> U(R), Y(R);
    std::vector<std::vector<int>> sel(R);
    std::vector<Vec> gate(R);
    for (int q = 0; q < R; q++) {
        for (int r = 0; r < R; r++) U[q].insert(U[q].end(), got[q][r].begin(), got[q][r].end());
        Y[q].assign(U[q].size(), 0.0);
        sel[q].resize((size_t)Hr * N * c.k);
        gate[q].resize((size_t)Hr * N * c.k);
        // route + compute + weight, per owned head                    (R·Nr, dh) per head
        for (int hl = 0; hl < Hr; hl++)
            ref::routed_forward(Y[q].data() + hl * c.dh, width, U[q].data() + hl * c.dh, width, N,
                                ref::head_bank<double>(c, ranks[q].w, bias.data() + (size_t)q * Hr * c.E, hl),
                                sel[q].data() + (size_t)hl * N * c.k, gate[q].data() + (size_t)hl * N * c.k, false);
    }
    // exchange back: rank r gets y of its tokens from every owner   (Nr, H·dh) per rank
    Blocks y_send(R, std::vector<Vec>(R));
    for (int q = 0; q < R; q++)
        for (int r = 0; r < R; r++) y_send[q][r] = rows(Y[q], r * Nr, Nr, width);
    Blocks y_got = exchange(y_send, wire, kBf16Bytes);
    std::vector<Vec> y(R);
    run.out.resize((size_t)N * d);
    for (int r = 0; r < R; r++) {
        y[r] = join_head_blocks(y_got[r], Nr, HD, R);
        // merge: out_r = y_r W_mg^T                                  (Nr, d)
        ref::matmul_forward(run.out.data() + (int64_t)r * Nr * d, y[r].data(), ranks[r].w.ffn_out, Nr, HD, d);
    }

    // backward: dy_r = dout_r W_mg, exchange to owners, expert backward there, exchange du back
    std::vector<Vec> dy(R, Vec((size_t)Nr * HD, 0.0));
    for (int r = 0; r < R; r++)
        ref::matmul_backward(dy[r].data(), ranks[r].g.ffn_out, rows(dout, r * Nr, Nr, d).data(), y[r].data(),
                             ranks[r].w.ffn_out, Nr, HD, d);
    Blocks dy_got = exchange(split_by_head_owner(dy, Nr, HD, R), wire, kBf16Bytes);
    Blocks du_send(R, std::vector<Vec>(R));
    for (int q = 0; q < R; q++) {
        Vec dY, dU(U[q].size(), 0.0);
        for (int r = 0; r < R; r++) dY.insert(dY.end(), dy_got[q][r].begin(), dy_got[q][r].end());
        for (int hl = 0; hl < Hr; hl++)
            ref::routed_backward(dU.data() + hl * c.dh, width, ref::head_bank_grad<double>(c, ranks[q].g, hl),
                                 dY.data() + hl * c.dh, width, U[q].data() + hl * c.dh, width, N,
                                 ref::head_bank<double>(c, ranks[q].w, bias.data() + (size_t)q * Hr * c.E, hl),
                                 sel[q].data() + (size_t)hl * N * c.k, gate[q].data() + (size_t)hl * N * c.k);
        for (int r = 0; r < R; r++) du_send[q][r] = rows(dU, r * Nr, Nr, width);
    }
    Blocks du_got = exchange(du_send, wire, kBf16Bytes);
    run.dx.assign((size_t)N * d, 0.0);
    for (int r = 0; r < R; r++) {
        Vec du = join_head_blocks(du_got[r], Nr, HD, R);
        ref::matmul_backward(run.dx.data() + (int64_t)r * Nr * d, ranks[r].g.ffn_in, du.data(),
                             rows(x, r * Nr, Nr, d).data(), ranks[r].w.ffn_in, Nr, d, HD);
    }
    run.grads = assemble_grads(c, ranks);
    run.within = wire.within;
    run.across = wire.across;
    return run;
}

// ---------------------------------------------------------------------------------------------
// Expert Parallel: rank q owns experts [q·E/R, (q+1)·E/R). Route locally, group the Nr·k copies by
// expert (stable), exchange per-expert counts, send each copy's row to its expert's owner, run the
// experts there, send results back, restore (token, slot) order, weight and sum.

struct Copy { int token, slot, expert; };

// How a rank routes its own Nr tokens x (Nr, d) and takes its router's gradient. route: sel, gate and
// kept (Nr, k). backward: from each kept copy's dw = dy·o (Nr, k), adds the router's part to dx (Nr, d,
// which already holds the copies' dx) and to the router's weight gradient.
struct SimRouter {
    virtual ~SimRouter() = default;
    virtual void route(int r, RankState& rs, const double* x, int Nr, int* sel, double* gate, char* kept) = 0;
    virtual void backward(int r, RankState& rs, double* dx, const double* x, int Nr, const int* sel,
                          const double* gate, const char* kept, const double* dgate) = 0;
};

// SPEC §2.2: top-k of x R + b, gates the softmax over the chosen; nothing is dropped.
struct TopKRouter : SimRouter {
    const lmoe::Config& c;
    const std::vector<float>& bias;
    TopKRouter(const lmoe::Config& c, const std::vector<float>& bias) : c(c), bias(bias) {}
    void route(int, RankState& rs, const double* x, int Nr, int* sel, double* gate, char* kept) override {
        Vec s(c.E);
        for (int t = 0; t < Nr; t++) {
            ref::router_logits(s.data(), x + (int64_t)t * c.d, rs.w.router, c.d, c.E);
            ref::select_topk(sel + t * c.k, s.data(), bias.data(), c.E, c.k);
            ref::softmax_gates(gate + t * c.k, s.data(), sel + t * c.k, c.k);
        }
        std::fill(kept, kept + Nr * c.k, 1);
    }
    void backward(int, RankState& rs, double* dx, const double* x, int Nr, const int* sel, const double* gate,
                  const char*, const double* dgate) override {
        Vec ds(c.k);
        for (int t = 0; t < Nr; t++) {  // the gate softmax and the router's k columns
            ref::softmax_gates_backward(ds.data(), gate + t * c.k, dgate + t * c.k, c.k);
            for (int j = 0; j < c.k; j++)
                for (int i = 0; i < c.d; i++) {
                    const int e = sel[t * c.k + j];
                    rs.g.router[(int64_t)i * c.E + e] += x[(int64_t)t * c.d + i] * ds[j];
                    dx[(int64_t)t * c.d + i] += rs.w.router[(int64_t)i * c.E + e] * ds[j];
                }
        }
    }
};

// SPEC §2.6: the GrAP gate, the capacity and the two losses of each rank's micro-batch, towards its
// node's target; the losses' gradient scaled by loss_scale. Keeps each rank's losses.
struct LocMoeRouter : SimRouter {
    const lmoe::Config& c;
    const int R, node_size;
    const double loss_scale;
    std::vector<Vec> p, z;
    std::vector<ref::RouterLosses<double>> losses;
    LocMoeRouter(const lmoe::Config& c, int R, int node_size, double loss_scale)
        : c(c), R(R), node_size(node_size), loss_scale(loss_scale), p(R), z(R), losses(R) {}
    void route(int r, RankState& rs, const double* x, int Nr, int* sel, double* gate, char* kept) override {
        const lmoe::LocMoeSetup setup = lmoe::locmoe_setup(c, Nr, r, R, node_size);
        ref::grap_rows(p[r], z[r], x, c.d, Nr, rs.w.router_eps, c.d, c.E);
        const std::vector<float> no_bias(c.E, 0.f);
        for (int t = 0; t < Nr; t++) {
            ref::select_topk(sel + t * c.k, p[r].data() + (int64_t)t * c.E, no_bias.data(), c.E, c.k);
            for (int j = 0; j < c.k; j++) gate[t * c.k + j] = p[r][(int64_t)t * c.E + sel[t * c.k + j]];
        }
        ref::capacity_keep(kept, sel, Nr, c.E, c.k, setup.capacity);
        losses[r] = ref::locmoe_losses(p[r].data(), sel, Nr, c.E, c.k, setup);
    }
    void backward(int r, RankState& rs, double* dx, const double*, int Nr, const int* sel, const double*,
                  const char* kept, const double* dgate) override {
        Vec dp(c.E);
        for (int t = 0; t < Nr; t++) {
            for (int i = 0; i < c.E; i++) dp[i] = loss_scale * losses[r].dp[i];
            for (int j = 0; j < c.k; j++)
                if (kept[t * c.k + j]) dp[sel[t * c.k + j]] += dgate[t * c.k + j];
            ref::grap_backward(dx + (int64_t)t * c.d, rs.g.router_eps, dp.data(), p[r].data() + (int64_t)t * c.E,
                               z[r].data() + (int64_t)t * c.E, c.d, c.E);
        }
    }
};

LayerRun run_expert_parallel(const lmoe::Config& c, const Vec& x, const Vec& dout, SimRouter& router, int N, int R,
                             int node_size, double scale, const Vec* router_override = nullptr) {
    const int Nr = N / R, Er = c.E / R, d = c.d, k = c.k;
    const ref::ExpertLayout L{d, c.fe, false};
    std::vector<RankState> ranks;
    for (int r = 0; r < R; r++) {
        ranks.emplace_back(c, r, R, scale);
        if (router_override) std::copy(router_override->begin(), router_override->end(), ranks[r].w.router);
    }
    LayerRun run;
    Wire wire(R, node_size);
    std::vector<int64_t> meta(R, 0);

    // route locally: selection, gates and the capacity's verdict per (token, slot)   (Nr, k) per rank
    std::vector<std::vector<int>> sel(R, std::vector<int>((size_t)Nr * k));
    std::vector<Vec> gate(R, Vec((size_t)Nr * k));
    std::vector<std::vector<char>> kept(R, std::vector<char>((size_t)Nr * k));
    std::vector<std::vector<Copy>> order(R);  // each rank's kept copies grouped by expert, stable in (token, slot)
    std::vector<int> table((size_t)R * c.E, 0);  // (R, E): copies rank r routed to expert e, int32 on the real wire
    for (int r = 0; r < R; r++) {
        router.route(r, ranks[r], x.data() + (int64_t)r * Nr * d, Nr, sel[r].data(), gate[r].data(), kept[r].data());
        // group: copies sorted by expert, then token, then slot
        for (int e = 0; e < c.E; e++)
            for (int t = 0; t < Nr; t++)
                for (int j = 0; j < k; j++)
                    if (sel[r][t * k + j] == e && kept[r][t * k + j]) order[r].push_back({t, j, e});
        for (const Copy& cp : order[r]) table[(size_t)r * c.E + cp.expert] += 1;
    }
    // all-gather the count table: every rank's row of E integers to every other rank; owner q reads
    // how many rows of each of its experts come from each rank, counts[q][r][el]
    Blocks counts(R, std::vector<Vec>(R, Vec(Er)));
    for (int r = 0; r < R; r++) {
        meta[r] += (int64_t)(R - 1) * c.E * kCountBytes;
        for (int q = 0; q < R; q++)
            for (int el = 0; el < Er; el++) counts[q][r][el] = table[(size_t)r * c.E + q * Er + el];
    }

    // dispatch rows to owners (rows for owner q, in the grouped order)
    auto dispatch = [&](const std::vector<Vec>& per_copy) {  // per_copy[r]: (copies of r in order, d)
        Blocks send(R, std::vector<Vec>(R));
        for (int r = 0; r < R; r++)
            for (size_t i = 0; i < order[r].size(); i++) {
                Vec& b = send[r][order[r][i].expert / Er];
                b.insert(b.end(), per_copy[r].begin() + (int64_t)i * d, per_copy[r].begin() + (int64_t)(i + 1) * d);
            }
        return exchange(send, wire, kBf16Bytes);
    };
    // For owner q, visits its rows expert by expert, and within an expert source rank by source rank:
    // so each expert's rows come in global token order, as in the one-rank layer.
    auto for_each_owned_row = [&](int q, const auto& body) {
        for (int el = 0; el < Er; el++)
            for (int r = 0; r < R; r++) {
                int64_t first = 0;  // rows from r before expert el
                for (int e2 = 0; e2 < el; e2++) first += (int64_t)counts[q][r][e2];
                for (int64_t i = first; i < first + (int64_t)counts[q][r][el]; i++) body(el, r, i);
            }
    };
    std::vector<Vec> x_copy(R);
    for (int r = 0; r < R; r++)
        for (const Copy& cp : order[r])
            x_copy[r].insert(x_copy[r].end(), x.begin() + (int64_t)(r * Nr + cp.token) * d,
                             x.begin() + (int64_t)(r * Nr + cp.token + 1) * d);
    Blocks x_got = dispatch(x_copy);
    // The split sizes the exchange computes from the table (parallel/expert_splits.h) are the blocks
    // this network delivered, and each source's run starts at an owner where the runs of the sources
    // before it end: the received order the device transport stores into.
    for (int q = 0; q < R; q++) {
        int64_t at = 0;
        const lmoe::ExpertSplits owner = lmoe::expert_splits(table, q, R, c.E);
        for (int r = 0; r < R; r++) {
            const lmoe::ExpertSplits source = lmoe::expert_splits(table, r, R, c.E);
            const int64_t rows = (int64_t)x_got[q][r].size() / d;
            CHECK_MSG(source.send[q] == rows && owner.recv[r] == rows && source.send_base[q] == at,
                      "EP R=" + std::to_string(R) + ": expert_splits places rank " + std::to_string(r) +
                          "'s run for rank " + std::to_string(q));
            at += rows;
        }
        CHECK_MSG(owner.received == at, "EP R=" + std::to_string(R) + ": rows received at rank " + std::to_string(q));
    }
    // compute: each owned expert on its rows                         o = W2 GELU(W1 x)
    Blocks o_send(R, std::vector<Vec>(R));
    for (int q = 0; q < R; q++) {
        for (int r = 0; r < R; r++) o_send[q][r].assign(x_got[q][r].size(), 0.0);
        for_each_owned_row(q, [&](int el, int r, int64_t i) {
            ref::expert_forward(o_send[q][r].data() + i * d, x_got[q][r].data() + i * d,
                                ranks[q].w.expert_in + el * L.size(), ranks[q].w.expert_out + el * L.size(), L);
        });
    }
    Blocks o_got = exchange(o_send, wire, kBf16Bytes);
    // restore (token, slot) order, weight and sum in slot order       y[t] = Σ_j w_j o_j
    std::vector<Vec> o_slot(R, Vec((size_t)Nr * k * d));  // (Nr, k, d)
    for (int r = 0; r < R; r++) {
        std::vector<int64_t> taken(R, 0);
        for (const Copy& cp : order[r]) {
            int q = cp.expert / Er;
            std::copy(o_got[r][q].begin() + taken[q] * d, o_got[r][q].begin() + (taken[q] + 1) * d,
                      o_slot[r].begin() + ((int64_t)cp.token * k + cp.slot) * d);
            taken[q]++;
        }
    }
    run.out.assign((size_t)N * d, 0.0);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < Nr; t++)
            for (int j = 0; j < k; j++)
                if (kept[r][t * k + j])
                    for (int i = 0; i < d; i++)
                        run.out[(int64_t)(r * Nr + t) * d + i] +=
                            gate[r][t * k + j] * o_slot[r][((int64_t)t * k + j) * d + i];

    // backward: dw_j = dy·o_j and do_j = w_j dy at the source; expert backward at the owner
    std::vector<Vec> do_copy(R), dgate(R, Vec((size_t)Nr * k, 0.0));
    for (int r = 0; r < R; r++)
        for (const Copy& cp : order[r]) {
            const double* dyt = dout.data() + (int64_t)(r * Nr + cp.token) * d;
            const double* o = o_slot[r].data() + ((int64_t)cp.token * k + cp.slot) * d;
            for (int i = 0; i < d; i++) {
                dgate[r][cp.token * k + cp.slot] += dyt[i] * o[i];
                do_copy[r].push_back(gate[r][cp.token * k + cp.slot] * dyt[i]);
            }
        }
    Blocks do_got = dispatch(do_copy);
    Blocks dxc_send(R, std::vector<Vec>(R));
    for (int q = 0; q < R; q++) {
        for (int r = 0; r < R; r++) dxc_send[q][r].assign(do_got[q][r].size(), 0.0);
        for_each_owned_row(q, [&](int el, int r, int64_t i) {
            ref::expert_backward(dxc_send[q][r].data() + i * d, ranks[q].g.expert_in + el * L.size(),
                                 ranks[q].g.expert_out + el * L.size(), do_got[q][r].data() + i * d,
                                 x_got[q][r].data() + i * d, ranks[q].w.expert_in + el * L.size(),
                                 ranks[q].w.expert_out + el * L.size(), L);
        });
    }
    Blocks dxc_got = exchange(dxc_send, wire, kBf16Bytes);
    run.dx.assign((size_t)N * d, 0.0);
    for (int r = 0; r < R; r++) {
        std::vector<Vec> dx_slot((size_t)Nr * k);
        std::vector<int64_t> taken(R, 0);
        for (const Copy& cp : order[r]) {
            int q = cp.expert / Er;
            dx_slot[(size_t)cp.token * k + cp.slot].assign(dxc_got[r][q].begin() + taken[q] * d,
                                                           dxc_got[r][q].begin() + (taken[q] + 1) * d);
            taken[q]++;
        }
        // each token: its kept copies' dx in slot order, then the router's part
        for (int t = 0; t < Nr; t++)
            for (int j = 0; j < k; j++)
                if (kept[r][t * k + j])
                    for (int i = 0; i < d; i++) run.dx[(int64_t)(r * Nr + t) * d + i] += dx_slot[(size_t)t * k + j][i];
        router.backward(r, ranks[r], run.dx.data() + (int64_t)r * Nr * d, x.data() + (int64_t)r * Nr * d, Nr,
                        sel[r].data(), gate[r].data(), kept[r].data(), dgate[r].data());
    }
    run.grads = assemble_grads(c, ranks);
    run.within = wire.within;
    run.across = wire.across;
    run.meta_bytes = meta;
    run.sel = sel;
    run.kept = kept;
    return run;
}

// LocMoE's layer as one rank holding every expert computes it (cpu/reference.h), on each rank's
// micro-batch in turn with that rank's target and capacity: the losses are per rank (SPEC §2.6), so
// this is the result the ranks must reproduce.
LayerRun run_single_locmoe(const lmoe::Config& c, const Vec& x, const Vec& dout, int N, int R, int node_size,
                           double scale, double loss_scale) {
    const int Nr = N / R, d = c.d, k = c.k;
    RankState rs(c, 0, 1, scale);
    const std::vector<float> no_bias(c.E, 0.f);
    const ref::ExpertBank<double> bank = ref::head_bank<double>(c, rs.w, no_bias.data(), 0);
    LayerRun run;
    run.out.assign((size_t)N * d, 0.0);
    run.dx.assign((size_t)N * d, 0.0);
    for (int r = 0; r < R; r++) {
        const lmoe::LocMoeSetup setup = lmoe::locmoe_setup(c, Nr, r, R, node_size);
        const int64_t first = (int64_t)r * Nr * d;
        std::vector<int> sel((size_t)Nr * k);
        Vec gate((size_t)Nr * k);
        std::vector<char> kept((size_t)Nr * k);
        const ref::LocMoeResult<double> losses = ref::locmoe_forward(run.out.data() + first, d, x.data() + first, d, Nr,
                                                                     bank, setup, sel.data(), gate.data(), kept.data(), false);
        ref::locmoe_backward(run.dx.data() + first, d, ref::head_bank_grad<double>(c, rs.g, 0), dout.data() + first, d,
                             x.data() + first, d, Nr, bank, setup, sel.data(), gate.data(), kept.data(), loss_scale);
        run.aux.push_back(losses.aux);
        run.loc.push_back(losses.loc);
    }
    run.grads = rs.grads;
    return run;
}

// ---------------------------------------------------------------------------------------------

bool bitwise_equal(const Vec& a, const Vec& b) { return a.size() == b.size() && a == b; }

double max_rel_diff(const Vec& a, const Vec& b, int64_t first, int64_t count) {
    double diff = 0, scale = 0;
    for (int64_t i = first; i < first + count; i++) {
        diff = std::max(diff, std::abs(a[i] - b[i]));
        scale = std::max(scale, std::abs(b[i]));
    }
    return diff / std::max(scale, 1e-300);
}

// Compares a distributed run with the one-rank run: outputs, dx and expert gradients bitwise,
// replicated gradients to 1e-12 (their cross-rank sum adds the same terms in another order).
// router_owned: the router gradients are one rank's (sharded with their heads or experts); else the
// router is replicated over ranks and its gradient is a cross-rank sum as well.
void compare_runs(const std::string& what, const lmoe::Config& c, const LayerRun& one, const LayerRun& many,
                  bool router_owned = true) {
    CHECK_MSG(bitwise_equal(one.out, many.out), what + ": outputs differ");
    CHECK_MSG(bitwise_equal(one.dx, many.dx), what + ": input gradients differ");
    lmoe::ParamLayout layout = lmoe::build_param_layout(c);
    for (const lmoe::TensorSpec& t : layout.tensors) {
        Vec a(one.grads.begin() + t.offset, one.grads.begin() + t.offset + t.numel);
        Vec b(many.grads.begin() + t.offset, many.grads.begin() + t.offset + t.numel);
        bool ffn = t.name.find("router") != std::string::npos || t.name.find("expert") != std::string::npos ||
                   t.name.find("ffn_") != std::string::npos;
        if (!ffn) continue;  // the layout holds the whole model; only the FFN's tensors take part here
        bool nonzero = std::any_of(a.begin(), a.end(), [](double v) { return v != 0; });
        CHECK_MSG(nonzero, what + ": " + t.name + " has an all-zero gradient, so comparing it proves nothing");
        const bool router = t.name.find("router") != std::string::npos;
        if (t.expert && (router_owned || !router))
            CHECK_MSG(bitwise_equal(a, b), what + ": expert gradient " + t.name + " differs");
        else {
            double rel = max_rel_diff(many.grads, one.grads, t.offset, t.numel);
            CHECK_MSG(rel < 1e-12, what + ": replicated gradient " + t.name + " off by " + std::to_string(rel));
        }
    }
}

lmoe::Config layer_config(lmoe::FfnKind kind) {
    lmoe::Config c;
    c.ffn = kind;
    c.L = 1;
    c.d = 16; c.E = 16; c.fe = 6; c.k = 3;
    if (kind == lmoe::FfnKind::LatentMoE) { c.H = 8; c.dh = 4; }
    else { c.H = 1; c.dh = c.d; }
    return c;
}

// Each rank's bytes within and across nodes as its routing implies, counted copy by copy: a kept copy
// whose expert lives on another rank crosses four times (x and d_o to the owner, o and dx back), each
// time to a rank of the same node, or to the relay of exchange's first stage and then across.
void add_hop(Wire& want, int from, int to, int64_t bytes) {
    if (from == to) return;
    const int relay = relay_rank(from, to, want.node_size);
    if (relay != from) want.within[from] += bytes;
    if (relay != to) want.across[relay] += bytes;
}

// A copy's four crossings: x and d_o to the owner, o and dx back.
void add_round_trips(Wire& want, int from, int owner, int64_t row_bytes) {
    for (int twice = 0; twice < 2; twice++) {
        add_hop(want, from, owner, row_bytes);
        add_hop(want, owner, from, row_bytes);
    }
}

void expect_wire(const std::string& what, const std::vector<int64_t>& within, const std::vector<int64_t>& across,
                 const Wire& want, const char* source) {
    for (size_t r = 0; r < within.size(); r++)
        CHECK_MSG(within[r] == want.within[r] && across[r] == want.across[r],
                  what + " rank " + std::to_string(r) + " sent " + std::to_string(within[r]) + " + " +
                      std::to_string(across[r]) + " bytes within + across nodes, " + source + " " +
                      std::to_string(want.within[r]) + " + " + std::to_string(want.across[r]));
}

void expect_ep_bytes(const std::string& what, const lmoe::Config& c, const LayerRun& run, int R, int node_size) {
    Wire want(R, node_size);
    for (int r = 0; r < R; r++)
        for (size_t i = 0; i < run.sel[r].size(); i++)
            if (run.kept[r][i]) add_round_trips(want, r, run.sel[r][i] / (c.E / R), (int64_t)c.d * kBf16Bytes);
    expect_wire(what, run.within, run.across, want, "its routing implies");
}

void print_bytes(const std::string& what, const LayerRun& run) {
    std::printf("%s: layer matches one rank; bytes sent per rank within + across nodes:", what.c_str());
    for (size_t r = 0; r < run.within.size(); r++)
        std::printf(" %lld+%lld", (long long)run.within[r], (long long)run.across[r]);
    std::printf("\n");
}

// ---------------------------------------------------------------------------------------------
// Head Parallel × Expert Parallel (SPEC §3): R = P·Q ranks, rank r in head group p = r / Q and expert
// shard q = r % Q (parallel/hybrid.h). Rank (p, q) owns heads [p·H/P, (p+1)·H/P), their routers R_h
// whole (replicated over the group's Q ranks) and, in each of them, experts [q·E/Q, (q+1)·E/Q).
// Forward: project locally; the equal-block head exchange among the P ranks of shard q gives rank
// (p, q) its heads' sub-tokens of those P ranks' tokens; route them there; the copies move within the
// group to their experts' owners (counts first, as Expert Parallel does), are computed, come back, and
// are weighted and summed; y returns in the head exchange's blocks and is merged locally. Backward
// mirrors it.
//
// Each rank trains on its own mean loss, as the trainer does: its output gradient is R times its
// rows' share of the global objective's; replicated gradients (W_mh, W_mg) are averaged over the R
// ranks; R_h's are summed over the group and, like the expert gradients, divided by R
// (train/gpu_model.cuh's sync_gradients). R is a power of two here, so those scalings are exact.
//
// Rank (p, q) reads block q·P + p of the global batch: shard q's P ranks then hold one contiguous
// run of it, so an owner that takes an expert's rows source by source within its group takes them in
// global order, as the one-rank layer does. Outputs, input gradients and expert gradients are then
// bitwise; W_mh, W_mg and (for Q > 1) R_h add the same partial sums in another order.

struct HybridRun {
    LayerRun run;                          // within/across: both exchanges; meta_bytes: the counts
    Wire hp, ep;                           // the head exchange and the expert exchange apart
    std::vector<std::vector<int>> owner;   // per rank: the rank owning each routed copy's expert
};

HybridRun run_hybrid(const lmoe::Config& c, const Vec& x, const Vec& dout, const std::vector<float>& bias, int N,
                     const lmoe::HybridGrid grid, int node_size, double scale) {
    const int P = grid.P, Q = grid.Q, R = grid.world(), Nr = N / R, M = P * Nr;  // M: sub-tokens per owned head
    const int HD = c.H * c.dh, Hp = c.H / P, Eq = c.E / Q, width = Hp * c.dh, d = c.d, k = c.k, dh = c.dh, E = c.E;
    CHECK_MSG((R & (R - 1)) == 0, "the exact rescaling by R needs R a power of two");
    const ref::ExpertLayout L{dh, c.fe, true};
    const int64_t ex = L.size();      // elements per expert matrix
    const RankState one(c, 0, 1, scale);  // the one-rank weights: each rank copies its slices
    struct Rank {
        Vec router, w_in, w_out;          // (Hp, dh, E), (Hp, Eq, fe, dh) ×2
        Vec g_router, g_in, g_out, g_ffn_in, g_ffn_out;
    };
    std::vector<Rank> ranks(R);
    for (int r = 0; r < R; r++) {
        Rank& rk = ranks[r];
        const int p = grid.group(r), q = grid.shard(r);
        for (int hl = 0; hl < Hp; hl++) {
            const int h = p * Hp + hl;
            rk.router.insert(rk.router.end(), one.w.router + (int64_t)h * dh * E, one.w.router + (int64_t)(h + 1) * dh * E);
            for (int el = 0; el < Eq; el++) {
                const int64_t at = ((int64_t)h * E + q * Eq + el) * ex;
                rk.w_in.insert(rk.w_in.end(), one.w.expert_in + at, one.w.expert_in + at + ex);
                rk.w_out.insert(rk.w_out.end(), one.w.expert_out + at, one.w.expert_out + at + ex);
            }
        }
        rk.g_router.assign(rk.router.size(), 0.0);
        rk.g_in.assign(rk.w_in.size(), 0.0);
        rk.g_out.assign(rk.w_out.size(), 0.0);
        rk.g_ffn_in.assign((size_t)HD * d, 0.0);
        rk.g_ffn_out.assign((size_t)d * HD, 0.0);
    }
    auto block_of = [&](int r) { return grid.shard(r) * P + grid.group(r); };  // the micro-batch rank r reads
    HybridRun hr{LayerRun{}, Wire(R, node_size), Wire(R, node_size), std::vector<std::vector<int>>(R)};
    std::vector<int64_t> meta(R, 0);

    // The head exchange: each rank's (Nr, H·dh) rows, cut into its shard's P head-group column blocks
    // -> at (p, q) the (M, H/P·dh) sub-tokens of group p's heads, rows from group 0, 1, … in turn.
    auto to_head_owners = [&](const std::vector<Vec>& m) {
        Blocks send(R, std::vector<Vec>(R));
        for (int r = 0; r < R; r++)
            for (int p2 = 0; p2 < P; p2++) {
                Vec& b = send[r][grid.rank(p2, grid.shard(r))];
                for (int t = 0; t < Nr; t++)
                    b.insert(b.end(), m[r].begin() + (int64_t)t * HD + p2 * width,
                             m[r].begin() + (int64_t)t * HD + (p2 + 1) * width);
            }
        Blocks got = exchange(send, hr.hp, kBf16Bytes);
        std::vector<Vec> owned(R);
        for (int r = 0; r < R; r++)
            for (int p2 = 0; p2 < P; p2++) {
                const Vec& b = got[r][grid.rank(p2, grid.shard(r))];
                owned[r].insert(owned[r].end(), b.begin(), b.end());
            }
        return owned;
    };
    // Its reverse: the (M, H/P·dh) rows at each owner back to their token's rank as (Nr, H·dh).
    auto from_head_owners = [&](const std::vector<Vec>& owned) {
        Blocks send(R, std::vector<Vec>(R));
        for (int r = 0; r < R; r++)
            for (int p2 = 0; p2 < P; p2++)
                send[r][grid.rank(p2, grid.shard(r))] = rows(owned[r], p2 * Nr, Nr, width);
        Blocks got = exchange(send, hr.hp, kBf16Bytes);
        std::vector<Vec> m(R, Vec((size_t)Nr * HD));
        for (int r = 0; r < R; r++)
            for (int p2 = 0; p2 < P; p2++) {
                const Vec& b = got[r][grid.rank(p2, grid.shard(r))];
                for (int t = 0; t < Nr; t++)
                    std::copy(b.begin() + (int64_t)t * width, b.begin() + (int64_t)(t + 1) * width,
                              m[r].begin() + (int64_t)t * HD + p2 * width);
            }
        return m;
    };

    // project: u_r = x_r W_mh^T, then to the head owners
    std::vector<Vec> u(R, Vec((size_t)Nr * HD));
    for (int r = 0; r < R; r++)
        ref::matmul_forward(u[r].data(), rows(x, block_of(r) * Nr, Nr, d).data(), one.w.ffn_in, Nr, d, HD);
    const std::vector<Vec> U = to_head_owners(u);

    // route each owned head's M sub-tokens; group the copies by (head, expert), stable in (token, slot)
    struct HCopy { int head, token, slot, expert; };
    std::vector<std::vector<HCopy>> order(R);
    std::vector<std::vector<int>> sel(R, std::vector<int>((size_t)Hp * M * k));
    std::vector<Vec> gate(R, Vec((size_t)Hp * M * k));
    auto slot_at = [&](int hl, int t, int j) { return ((size_t)hl * M + t) * k + j; };
    Blocks counts_send(R, std::vector<Vec>(R));
    for (int r = 0; r < R; r++) {
        const int p = grid.group(r);
        Vec s(E);
        for (int hl = 0; hl < Hp; hl++)
            for (int t = 0; t < M; t++) {
                ref::router_logits(s.data(), U[r].data() + (int64_t)t * width + hl * dh,
                                   ranks[r].router.data() + (int64_t)hl * dh * E, dh, E);
                int* st = sel[r].data() + slot_at(hl, t, 0);
                ref::select_topk(st, s.data(), bias.data() + (int64_t)(p * Hp + hl) * E, E, k);
                ref::softmax_gates(gate[r].data() + slot_at(hl, t, 0), s.data(), st, k);
            }
        for (int hl = 0; hl < Hp; hl++)
            for (int e = 0; e < E; e++)
                for (int t = 0; t < M; t++)
                    for (int j = 0; j < k; j++)
                        if (sel[r][slot_at(hl, t, j)] == e) order[r].push_back({hl, t, j, e});
        for (int q2 = 0; q2 < Q; q2++) counts_send[r][grid.rank(p, q2)].assign((size_t)Hp * Eq, 0.0);
        for (const HCopy& cp : order[r]) {
            hr.owner[r].push_back(grid.rank(p, cp.expert / Eq));
            counts_send[r][hr.owner[r].back()][(size_t)cp.head * Eq + cp.expert % Eq] += 1;
        }
    }
    // counts within the group: each owner learns how many rows of each (head, expert) come from each peer
    const Blocks counts = all_to_all(counts_send, meta, kCountBytes);

    auto dispatch = [&](const std::vector<Vec>& per_copy) {  // per_copy[r]: (copies of r in order, dh)
        Blocks send(R, std::vector<Vec>(R));
        for (int r = 0; r < R; r++)
            for (size_t i = 0; i < order[r].size(); i++) {
                Vec& b = send[r][hr.owner[r][i]];
                b.insert(b.end(), per_copy[r].begin() + (int64_t)i * dh, per_copy[r].begin() + (int64_t)(i + 1) * dh);
            }
        return exchange(send, hr.ep, kBf16Bytes);
    };
    auto send_back = [&](const Blocks& at_owner) { return exchange(at_owner, hr.ep, kBf16Bytes); };
    // Owner o's rows (head, expert) by (head, expert), and within one source by source: global order.
    auto for_each_owned_row = [&](int o, const auto& body) {
        const int p = grid.group(o);
        for (int hl = 0; hl < Hp; hl++)
            for (int el = 0; el < Eq; el++)
                for (int q2 = 0; q2 < Q; q2++) {
                    const Vec& n = counts[o][grid.rank(p, q2)];
                    int64_t first = 0;
                    for (int i = 0; i < hl * Eq + el; i++) first += (int64_t)n[i];
                    for (int64_t i = first; i < first + (int64_t)n[hl * Eq + el]; i++)
                        body((int64_t)(hl * Eq + el) * ex, grid.rank(p, q2), i);
                }
    };
    // rows coming back from the owners, in each source's copy order -> per (head, token, slot)
    auto restore = [&](const Blocks& got, int r) {
        Vec slot((size_t)Hp * M * k * dh);
        std::vector<int64_t> taken(R, 0);
        for (size_t i = 0; i < order[r].size(); i++) {
            const HCopy& cp = order[r][i];
            const int o = hr.owner[r][i];
            std::copy(got[r][o].begin() + taken[o] * dh, got[r][o].begin() + (taken[o] + 1) * dh,
                      slot.begin() + slot_at(cp.head, cp.token, cp.slot) * dh);
            taken[o]++;
        }
        return slot;
    };

    std::vector<Vec> x_copy(R);
    for (int r = 0; r < R; r++)
        for (const HCopy& cp : order[r]) {
            const auto row = U[r].begin() + (int64_t)cp.token * width + cp.head * dh;
            x_copy[r].insert(x_copy[r].end(), row, row + dh);
        }
    const Blocks x_got = dispatch(x_copy);
    Blocks o_send(R, std::vector<Vec>(R));
    for (int o = 0; o < R; o++) {
        for (int r = 0; r < R; r++) o_send[o][r].assign(x_got[o][r].size(), 0.0);
        for_each_owned_row(o, [&](int64_t at, int r, int64_t i) {
            ref::expert_forward(o_send[o][r].data() + i * dh, x_got[o][r].data() + i * dh, ranks[o].w_in.data() + at,
                                ranks[o].w_out.data() + at, L);
        });
    }
    const Blocks o_got = send_back(o_send);
    std::vector<Vec> o_slot(R), Y(R, Vec((size_t)M * width, 0.0));
    for (int r = 0; r < R; r++) {
        o_slot[r] = restore(o_got, r);
        for (int hl = 0; hl < Hp; hl++)  // y[t, h] = Σ_j w_j o_j in slot order
            for (int t = 0; t < M; t++)
                for (int j = 0; j < k; j++)
                    for (int i = 0; i < dh; i++)
                        Y[r][(int64_t)t * width + hl * dh + i] +=
                            gate[r][slot_at(hl, t, j)] * o_slot[r][slot_at(hl, t, j) * dh + i];
    }
    const std::vector<Vec> y = from_head_owners(Y);
    LayerRun& run = hr.run;
    run.out.assign((size_t)N * d, 0.0);
    for (int r = 0; r < R; r++)  // merge: out_r = y_r W_mg^T
        ref::matmul_forward(run.out.data() + (int64_t)block_of(r) * Nr * d, y[r].data(), one.w.ffn_out, Nr, HD, d);

    // backward: each rank's own mean loss, R times its share of the global one
    std::vector<Vec> dy(R, Vec((size_t)Nr * HD, 0.0)), dout_r(R);
    for (int r = 0; r < R; r++) {
        dout_r[r] = rows(dout, block_of(r) * Nr, Nr, d);
        for (double& v : dout_r[r]) v *= R;
        ref::matmul_backward(dy[r].data(), ranks[r].g_ffn_out.data(), dout_r[r].data(), y[r].data(), one.w.ffn_out, Nr,
                             HD, d);
    }
    const std::vector<Vec> dY = to_head_owners(dy);
    std::vector<Vec> do_copy(R), dgate(R, Vec((size_t)Hp * M * k, 0.0));
    for (int r = 0; r < R; r++)
        for (const HCopy& cp : order[r]) {  // dw_j = dy·o_j, d_o_j = w_j dy at the source
            const size_t s = slot_at(cp.head, cp.token, cp.slot);
            const double* dyt = dY[r].data() + (int64_t)cp.token * width + cp.head * dh;
            for (int i = 0; i < dh; i++) {
                dgate[r][s] += dyt[i] * o_slot[r][s * dh + i];
                do_copy[r].push_back(gate[r][s] * dyt[i]);
            }
        }
    const Blocks do_got = dispatch(do_copy);
    Blocks dxc_send(R, std::vector<Vec>(R));
    for (int o = 0; o < R; o++) {
        for (int r = 0; r < R; r++) dxc_send[o][r].assign(do_got[o][r].size(), 0.0);
        for_each_owned_row(o, [&](int64_t at, int r, int64_t i) {
            ref::expert_backward(dxc_send[o][r].data() + i * dh, ranks[o].g_in.data() + at, ranks[o].g_out.data() + at,
                                 do_got[o][r].data() + i * dh, x_got[o][r].data() + i * dh, ranks[o].w_in.data() + at,
                                 ranks[o].w_out.data() + at, L);
        });
    }
    const Blocks dxc_got = send_back(dxc_send);
    std::vector<Vec> dU(R, Vec((size_t)M * width, 0.0));
    for (int r = 0; r < R; r++) {
        const Vec dx_slot = restore(dxc_got, r);
        Vec ds(k);
        for (int hl = 0; hl < Hp; hl++)
            for (int t = 0; t < M; t++) {  // the copies' dx in slot order, then the gate softmax and R_h
                double* dut = dU[r].data() + (int64_t)t * width + hl * dh;
                const double* ut = U[r].data() + (int64_t)t * width + hl * dh;
                const int* st = sel[r].data() + slot_at(hl, t, 0);
                for (int j = 0; j < k; j++)
                    for (int i = 0; i < dh; i++) dut[i] += dx_slot[slot_at(hl, t, j) * dh + i];
                ref::softmax_gates_backward(ds.data(), gate[r].data() + slot_at(hl, t, 0),
                                            dgate[r].data() + slot_at(hl, t, 0), k);
                double* g_router = ranks[r].g_router.data() + (int64_t)hl * dh * E;
                const double* router = ranks[r].router.data() + (int64_t)hl * dh * E;
                for (int j = 0; j < k; j++)
                    for (int i = 0; i < dh; i++) {
                        g_router[(int64_t)i * E + st[j]] += ut[i] * ds[j];
                        dut[i] += router[(int64_t)i * E + st[j]] * ds[j];
                    }
            }
    }
    const std::vector<Vec> du = from_head_owners(dU);
    run.dx.assign((size_t)N * d, 0.0);
    for (int r = 0; r < R; r++) {
        Vec dx((size_t)Nr * d, 0.0);
        ref::matmul_backward(dx.data(), ranks[r].g_ffn_in.data(), du[r].data(),
                             rows(x, block_of(r) * Nr, Nr, d).data(), one.w.ffn_in, Nr, d, HD);
        for (int64_t i = 0; i < (int64_t)Nr * d; i++) run.dx[(int64_t)block_of(r) * Nr * d + i] = dx[i] / R;
    }

    // the gradients as the trainer leaves them, placed in the one-rank layout
    run.grads.assign(one.layout.total, 0.0);
    const int64_t f_in = one.layout.find("layer0.ffn_in").offset, f_out = one.layout.find("layer0.ffn_out").offset;
    const int64_t g_router = one.layout.find("layer0.router").offset;
    const int64_t g_in = one.layout.find("layer0.expert_in").offset, g_out = one.layout.find("layer0.expert_out").offset;
    for (int64_t i = 0; i < (int64_t)HD * d; i++) {  // the all-reduce average over R
        for (int r = 0; r < R; r++) {
            run.grads[f_in + i] += ranks[r].g_ffn_in[i];
            run.grads[f_out + i] += ranks[r].g_ffn_out[i];
        }
        run.grads[f_in + i] /= R;
        run.grads[f_out + i] /= R;
    }
    for (int r = 0; r < R; r++) {
        const int p = grid.group(r), q = grid.shard(r);
        for (int hl = 0; hl < Hp; hl++) {
            const int h = p * Hp + hl;
            for (int64_t i = 0; i < (int64_t)dh * E; i++)  // summed over the group here, divided by R below
                run.grads[g_router + (int64_t)h * dh * E + i] += ranks[r].g_router[(int64_t)hl * dh * E + i];
            for (int el = 0; el < Eq; el++)
                for (int64_t i = 0; i < ex; i++) {
                    const int64_t at = ((int64_t)h * E + q * Eq + el) * ex + i, mine = (int64_t)(hl * Eq + el) * ex + i;
                    run.grads[g_in + at] = ranks[r].g_in[mine] / R;
                    run.grads[g_out + at] = ranks[r].g_out[mine] / R;
                }
        }
    }
    for (int64_t i = 0; i < (int64_t)c.H * dh * E; i++) run.grads[g_router + i] /= R;
    run.within = run.across = std::vector<int64_t>(R, 0);
    for (int r = 0; r < R; r++) {
        run.within[r] = hr.hp.within[r] + hr.ep.within[r];
        run.across[r] = hr.hp.across[r] + hr.ep.across[r];
    }
    run.meta_bytes = meta;
    return hr;
}

// The hybrid's bytes against an independent count: the head exchange's equal blocks hop by hop to
// each same-shard peer, and SPEC §3's closed form when every rank is its own node; the expert
// exchange's copy by copy from the routing; the counts, (Q − 1)·(H/P)·(E/Q) integers per rank.
void expect_hybrid_bytes(const std::string& what, const lmoe::Config& c, const HybridRun& hr,
                         const lmoe::HybridGrid grid, int N, int node_size) {
    const int R = grid.world(), Nr = N / R;
    Wire hp(R, node_size), ep(R, node_size);
    const int64_t block = (int64_t)Nr * (c.H / grid.P) * c.dh * kBf16Bytes;
    for (int r = 0; r < R; r++)
        for (int p2 = 0; p2 < grid.P; p2++)
            for (int times = 0; times < 4; times++) add_hop(hp, r, grid.rank(p2, grid.shard(r)), block);
    expect_wire(what + " head exchange", hr.hp.within, hr.hp.across, hp, "its equal blocks imply");
    if (node_size == 1)
        for (int r = 0; r < R; r++)
            CHECK_MSG(hr.hp.within[r] == 0 && hr.hp.across[r] == lmoe::hybrid_head_bytes(Nr, c.H, c.dh, grid.P, kBf16Bytes),
                      what + ": the head exchange differs from SPEC §3's HP bytes with P for R");
    for (int r = 0; r < R; r++)
        for (int o : hr.owner[r]) add_round_trips(ep, r, o, (int64_t)c.dh * kBf16Bytes);
    expect_wire(what + " expert exchange", hr.ep.within, hr.ep.across, ep, "its routing implies");
    for (int r = 0; r < R; r++)
        CHECK_MSG(hr.run.meta_bytes[r] == (int64_t)(grid.Q - 1) * (c.H / grid.P) * (c.E / grid.Q) * kCountBytes,
                  what + ": the counts exchange is (H/P)·(E/Q) integers to each other rank of the group");
}

// Every (P, Q) of R = 2 … 16 ranks with P | H and Q | E, for a preset's H, E and k (narrower widths,
// so the grid runs fast): --expert-shards must accept exactly these, and each must match one rank.
void test_hybrid(const char* preset, lmoe::Rng& rng) {
    lmoe::Config c;
    lmoe::apply_preset(c, preset);
    for (int P = 1; P <= 16; P++)
        for (int Q = 1; P * Q <= 16; Q++) {
            lmoe::Config v = c;
            v.expert_shards = Q;
            bool accepted = true;
            try {
                lmoe::validate(v, P * Q);
            } catch (const lmoe::ConfigError&) {
                accepted = false;
            }
            CHECK_MSG(accepted == (c.H % P == 0 && c.E % Q == 0),
                      std::string(preset) + ": --expert-shards " + std::to_string(Q) + " on " + std::to_string(P * Q) +
                          " ranks is " + (accepted ? "accepted" : "refused"));
        }
    c.L = 1;
    c.d = 16; c.dh = 4; c.fe = 6;
    const int N = 64;
    const double scale = 25.0;
    Vec x((size_t)N * c.d), dout((size_t)N * c.d);
    for (double& v : x) v = rng.normal();
    for (double& v : dout) v = rng.normal();
    std::vector<float> bias((size_t)c.H * c.E);
    for (float& b : bias) b = float(0.3 * rng.normal());
    const LayerRun one = run_single(c, x, dout, bias, N, scale);
    int configs = 0;
    for (int P = 1; P <= c.H; P++)
        for (int Q = 1; Q <= c.E; Q++) {
            const int R = P * Q;
            if (c.H % P || c.E % Q || R < 2 || R > 16) continue;
            configs++;
            for (int node_size : {1, 2, 4}) {
                if (node_size > R) continue;
                const std::string what = std::string("HPxEP ") + preset + " P=" + std::to_string(P) + " Q=" +
                                         std::to_string(Q) + " node size " + std::to_string(node_size);
                const HybridRun hr = run_hybrid(c, x, dout, bias, N, {P, Q}, node_size, scale);
                compare_runs(what, c, one, hr.run, Q == 1);
                expect_hybrid_bytes(what, c, hr, {P, Q}, N, node_size);
                if (Q == 1) {  // plain Head Parallel: the same bytes as its own simulation
                    const LayerRun hp = run_head_parallel(c, x, dout, bias, N, R, node_size, scale);
                    CHECK_MSG(hp.within == hr.run.within && hp.across == hr.run.across,
                              what + ": bytes differ from Head Parallel's on R = P ranks");
                }
                print_bytes(what, hr.run);
            }
        }
    CHECK_MSG(configs == (std::string(preset) == "tiny" ? 10 : 13), std::string(preset) + ": (P, Q) grid size");
}

int main() {
    lmoe::Rng rng(7);
    const int N = 64;           // global tokens; each of R ranks holds N/R of them
    const double scale = 25.0;  // weights ~N(0, 0.5²)
    for (lmoe::FfnKind kind : {lmoe::FfnKind::LatentMoE, lmoe::FfnKind::MoE}) {
        const bool hp = kind == lmoe::FfnKind::LatentMoE;
        lmoe::Config c = layer_config(kind);
        Vec x((size_t)N * c.d), dout((size_t)N * c.d);
        for (double& v : x) v = rng.normal();
        for (double& v : dout) v = rng.normal();
        std::vector<float> bias((size_t)c.H * c.E);
        for (float& b : bias) b = float(0.3 * rng.normal());
        LayerRun one = run_single(c, x, dout, bias, N, scale);
        TopKRouter topk(c, bias);
        for (int R : {1, 2, 4, 8})
            for (int node_size : {1, 2, 4}) {
                if (node_size > R) continue;
                const int Nr = N / R;
                std::string what = std::string(hp ? "HP" : "EP") + " R=" + std::to_string(R) + " node size " +
                                   std::to_string(node_size);
                LayerRun many = hp ? run_head_parallel(c, x, dout, bias, N, R, node_size, scale)
                                   : run_expert_parallel(c, x, dout, topk, N, R, node_size, scale);
                compare_runs(what, c, one, many);
                print_bytes(what, many);
                if (hp) {
                    // 4 exchanges of a block of Nr·(H/R)·dh bf16 elements to every other rank: (ns − 1)·R/ns
                    // blocks within the node (direct, or to the relay), R − ns blocks across (from the
                    // relays); with one rank per node that is SPEC §3's 4·Nr·H·dh·(R−1)/R·2, all across
                    const int64_t block = 4LL * Nr * (c.H / R) * c.dh * kBf16Bytes;
                    const int64_t within = (int64_t)(node_size - 1) * (R / node_size) * block;
                    const int64_t across = (int64_t)(R - node_size) * block;
                    if (node_size == 1) CHECK(across == 4LL * Nr * c.H * c.dh * (R - 1) / R * kBf16Bytes);
                    for (int r = 0; r < R; r++)
                        CHECK_MSG(many.within[r] == within && many.across[r] == across,
                                  what + " rank " + std::to_string(r) + " sent " + std::to_string(many.within[r]) +
                                      " + " + std::to_string(many.across[r]) + " bytes, expected " +
                                      std::to_string(within) + " + " + std::to_string(across));
                } else {
                    expect_ep_bytes(what, c, many, R, node_size);
                    for (int r = 0; r < R; r++)
                        CHECK_MSG(many.meta_bytes[r] == (int64_t)(R - 1) * c.E * kCountBytes,
                                  what + ": the count table's all-gather sends E integers to each other rank");
                }
            }
    }

    // LocMoE (SPEC §2.6): GrAP groups of 2 features, top-3, capacity factor 1 (C = 2 rows per expert
    // on 8 ranks: copies are dropped), the losses' gradient scaled by 0.5. The target of each rank
    // depends on R and the node size, so the one-rank result is computed for each.
    {
        lmoe::Config c = layer_config(lmoe::FfnKind::MoE);
        c.router = "locmoe";
        c.d = 32;
        c.dh = c.d;
        c.capacity_factor = 1;
        c.aux_loss_weight = 0.3f;
        c.loc_loss_weight = 0.5f;
        const double loss_scale = 0.5;
        Vec x((size_t)N * c.d), dout((size_t)N * c.d);
        for (double& v : x) v = rng.normal();
        for (double& v : dout) v = rng.normal();
        for (int R : {1, 2, 4, 8})
            for (int node_size : {1, 2, 4}) {
                if (node_size > R) continue;
                const std::string what = "LocMoE R=" + std::to_string(R) + " node size " + std::to_string(node_size);
                const LayerRun one = run_single_locmoe(c, x, dout, N, R, node_size, scale, loss_scale);
                LocMoeRouter locmoe(c, R, node_size, loss_scale);
                const LayerRun many = run_expert_parallel(c, x, dout, locmoe, N, R, node_size, scale);
                compare_runs(what, c, one, many);
                int64_t dropped = 0;
                for (int r = 0; r < R; r++) {
                    CHECK_MSG(locmoe.losses[r].aux == one.aux[r] && locmoe.losses[r].loc == one.loc[r],
                              what + ": rank " + std::to_string(r) + "'s L_aux or L_loc differs");
                    for (char k : many.kept[r]) dropped += !k;
                }
                if (R == 8) CHECK_MSG(dropped > 0, what + ": the capacity should drop copies here");
                expect_ep_bytes(what, c, many, R, node_size);
                print_bytes(what + " (" + std::to_string(dropped) + " copies dropped)", many);
            }
    }

    // EP's traffic under balanced routing equals SPEC §3's 4·N·k·d·(R−1)/R·2. Balanced by construction:
    // a router that copies x's first E features, and token t whose features (t·k + j) mod E are large,
    // so t picks exactly those k experts and every expert gets Nr·k/E copies from every rank.
    {
        const int N = 128;  // Nr·k a multiple of E for every R below
        lmoe::Config c = layer_config(lmoe::FfnKind::MoE);
        Vec router((size_t)c.d * c.E, 0.0), x((size_t)N * c.d, 0.0), dout((size_t)N * c.d);
        for (int e = 0; e < c.E; e++) router[(size_t)e * c.E + e] = 1.0;
        for (int t = 0; t < N; t++)
            for (int j = 0; j < c.k; j++) x[(size_t)t * c.d + (t * c.k + j) % c.E] = 3.0 - 0.5 * j;
        for (double& v : dout) v = rng.normal();
        std::vector<float> bias(c.E, 0.f);
        TopKRouter topk(c, bias);
        for (int R : {2, 4, 8}) {
            LayerRun many = run_expert_parallel(c, x, dout, topk, N, R, 1, 25.0, &router);
            int64_t expected = 4LL * (N / R) * c.k * c.d * (R - 1) / R * kBf16Bytes;
            for (int r = 0; r < R; r++)
                CHECK_MSG(many.within[r] == 0 && many.across[r] == expected,
                          "EP balanced R=" + std::to_string(R) + " rank " + std::to_string(r) + " sent " +
                              std::to_string(many.across[r]) + " bytes, SPEC says " + std::to_string(expected));
            std::printf("EP R=%d balanced routing: %lld bytes per rank (SPEC formula %lld)\n", R,
                        (long long)many.across[0], (long long)expected);
        }
    }
    test_hybrid("tiny", rng);
    test_hybrid("small", rng);
    return check::summary();
}
