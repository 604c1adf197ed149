// moe_ep_baseline: the same language model with standard MoE FFN layers (SPEC §2.2), trained with
// Expert Parallel (SPEC §3): the baseline Multi-Head LatentMoE is compared against. Everything dense
// is the shared skeleton in train/trainer.cuh; this file is the FFN layer, as the named stages of
// Expert Parallel:
//
//   route -> group -> exchange -> compute -> exchange back -> weight + merge
//
// Each token x (d) picks its top-k experts; its k copies are grouped by expert; each expert runs
// its rows through W1, GELU and W2 as grouped GEMMs (moe/grouped/grouped_gemm.cuh); the outputs are
// weighted by the gates and summed per token. On one GPU the two exchanges are the identity; with
// R ranks (Expert Parallel) they become variable-size all-to-alls after a count exchange.
#include <utility>

#include "parallel/expert_dispatch.cuh"
#include "moe/grouped/grouped_gemm.cuh"
#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "train/trainer.cuh"

namespace lmoe {

class MoeFfn {
  public:
    static constexpr FfnKind kind = FfnKind::MoE;
    static constexpr bool kHasGpuPath = true;
    static const char* summary() { return "Trains a standard MoE language model (Expert Parallel baseline)."; }
    static void check_supported(const Config& c) {
        if (!grouped_gemm_shape_supported(c.d, c.fe))
            throw ConfigError("the GPU expert GEMMs need the width and expert-dim to be multiples of 8 (got width " +
                              std::to_string(c.d) + ", expert-dim " + std::to_string(c.fe) + ")");
        if (c.k > kMaxTopK || c.E > kMaxRouterExperts)
            throw ConfigError("the GPU router supports k <= 32 and E <= 256");
    }
    // router + k experts (two d×f matmuls each), per token
    static double forward_macs_per_token(const Config& c) {
        return (double)c.d * c.E + (double)c.k * 2 * c.d * c.fe;
    }

    // One routing group (the MoE routes whole tokens); each rank routes only its own tokens, so the
    // expert loads are summed over the ranks.
    static int local_heads(const Config&, int) { return 1; }
    static constexpr bool kLoadsAreGlobal = false;
    // SPEC §3: about 4·N·k·d·(R−1)/R elements per layer and step when the routing is balanced
    static double predicted_bytes_per_layer(const Config& c, int N, int world) {
        return 4.0 * N * c.k * c.d * (world - 1) / world * sizeof(floatX);
    }

    MoeFfn(const Config& c, int N, int world)
        : c_(c), N_(N), world_(world), Er_(c.E / world), copies_((int64_t)N * c.k),
          capacity_(world == 1 ? copies_ : (int64_t)world * copies_),
          max_tiles_((int)routing_max_tiles(N, 1, c.E, c.k)),
          owner_max_tiles_((int)(ceil_div(capacity_, kExpertTileRows) + c.E / world)), splits_(c.L) {
        const size_t L = c.L;
        o_.resize(L * copies_ * c.d); pre_.resize(L * capacity_ * c.fe); h_.resize(L * capacity_ * c.fe);
        sel_.resize(L * copies_); gate_.resize(L * copies_); copy_pos_.resize(L * copies_); copy_row_.resize(L * copies_);
        group_offset_.resize(L * (c.E + 1));
        tile_group_.resize(L * max_tiles_); tile_start_.resize(L * max_tiles_); num_tiles_.resize(L);
        chunk_counts_.resize((size_t)routing_chunks(N) * c.E);
        d_o_.resize(copies_ * c.d); dx_copy_.resize(copies_ * c.d); ds_copy_.resize(copies_);
        dpre_.resize(capacity_ * c.fe);
        router_grad_scratch_.resize(router_grad_scratch_size(c.E, c.d));
        if (world > 1) {  // Expert Parallel: received rows, the owner plans, and room for any routing (dropless)
            x_received_.resize(L * capacity_ * c.d);
            owner_group_offset_.resize(L * (Er_ + 1)); owner_copy_row_.resize(L * capacity_);
            owner_tile_group_.resize(L * owner_max_tiles_); owner_tile_start_.resize(L * owner_max_tiles_);
            owner_num_tiles_.resize(L);
            send_counts_.resize(c.E); recv_counts_.resize(c.E);
            for (auto* b : {&rows_a_, &rows_b_}) b->resize(capacity_ * c.d);
        }
    }

    // out (N, d) = FFN_l(x (N, d)).
    void forward(int l, floatX* out, const floatX* x, const Layer& w, const float* bias, Ctx& ctx) {
        const Config& c = c_;
        const bool single = world_ == 1;  // one rank owns every expert: the exchanges vanish
        const RoutingPlan p = plan(l), ep = single ? p : owner_plan(l);
        floatX *o = o_.get() + (size_t)l * copies_ * c.d, *pre = pre_.get() + (size_t)l * capacity_ * c.fe;
        floatX* h = h_.get() + (size_t)l * capacity_ * c.fe;
        floatX* x_received = single ? nullptr : x_received_.get() + (size_t)l * capacity_ * c.d;
        const floatX* xe = single ? x : x_received;  // the rows the experts see
        // route:    sel, gate (N, k) = top-k of x R + b                     int32, fp32
        router_forward(p.sel, p.gate, x, c.d, w.router, bias, N_, 1, c.d, c.E, c.k, ctx.stream);
        // group:    copies sorted by expert, tiles of one expert
        group_copies(p, N_, 1, c.E, c.k, ctx.stream);
        // exchange: counts to the experts' owners, then each copy's row; regroup by owned expert
        if (!single) {
            ProfileScope timed(ctx.profile, Section::AllToAll);
            splits_[l] = exchange_expert_counts(recv_counts_.get(), send_counts_.get(), p.group_offset, c.E, *ctx.comm,
                                                ctx.stream, &bytes_sent_);
            permute_rows(rows_a_.get(), x, p.copy_row, copies_, c.d, true, ctx.stream);  // (N·k, d) group order
            bytes_sent_ += exchange_rows(x_received, splits_[l].recv, rows_a_.get(), splits_[l].send, c.d, *ctx.comm,
                                         ctx.stream);
            build_owner_plan(ep, recv_counts_.get(), world_, Er_, ctx.stream);
        }
        // compute:  pre, h (rows, f) = X_e W1_e^T, GELU(pre)                 floatX, group order
        expert_up_forward(pre, h, xe, c.d, w.expert_in, ep, single ? max_tiles_ : owner_max_tiles_, c.d, c.fe,
                          ctx.stream);
        //           o (rows, d) = h W2_e^T
        floatX* o_experts = single ? o : rows_b_.get();
        expert_down_forward(o_experts, h, w.expert_out, ep, single ? max_tiles_ : owner_max_tiles_, c.d, c.fe,
                            ctx.stream);
        // exchange back: each result to its token's rank, in the order the copies left
        if (!single) {
            ProfileScope timed(ctx.profile, Section::AllToAll);
            permute_rows(rows_a_.get(), o_experts, ep.copy_row, splits_[l].received, c.d, false, ctx.stream);
            bytes_sent_ += exchange_rows(o, splits_[l].send, rows_a_.get(), splits_[l].recv, c.d, *ctx.comm, ctx.stream);
        }
        // weight + merge: out[t] (d) = Σ_j gate · o[copy (t, j)]           floatX (N, d)
        combine_forward(out, c.d, o, p, N_, 1, c.d, c.k, ctx.stream);
    }

    // dx (N, d) from dout (N, d); weight gradients accumulated into g (the expert ones from the
    // copies of every rank).
    void backward(int l, floatX* dx, const floatX* dout, const floatX* x, const Layer& w, const GradLayer& g, Ctx& ctx) {
        const Config& c = c_;
        const bool single = world_ == 1;
        const RoutingPlan p = plan(l), ep = single ? p : owner_plan(l);
        const floatX *o = o_.get() + (size_t)l * copies_ * c.d, *pre = pre_.get() + (size_t)l * capacity_ * c.fe;
        const floatX* h = h_.get() + (size_t)l * capacity_ * c.fe;
        const floatX* xe = single ? x : x_received_.get() + (size_t)l * capacity_ * c.d;
        const int tiles = single ? max_tiles_ : owner_max_tiles_, experts = single ? c.E : Er_;
        // weight + merge: d_o (N·k, d) = gate · dout;  ds (N·k) = gate-softmax backward of dout · o
        combine_backward(d_o_.get(), ds_copy_.get(), dout, c.d, o, p, N_, 1, c.d, c.k, ctx.stream);
        // exchange back: d_o to the experts' owners, regrouped by owned expert
        const floatX* d_o_experts = d_o_.get();
        if (!single) {
            ProfileScope timed(ctx.profile, Section::AllToAll);
            bytes_sent_ += exchange_rows(rows_a_.get(), splits_[l].recv, d_o_.get(), splits_[l].send, c.d, *ctx.comm,
                                         ctx.stream);
            permute_rows(rows_b_.get(), rows_a_.get(), ep.copy_row, splits_[l].received, c.d, true, ctx.stream);
            d_o_experts = rows_b_.get();
        }
        // compute:  dpre (rows, f) = (d_o W2_e) ⊙ GELU'(pre);  dW2_e += d_o^T h
        expert_down_backward(dpre_.get(), g.expert_out, d_o_experts, h, pre, w.expert_out, ep, tiles, c.d, c.fe,
                             experts, ctx.stream);
        //           dx_copy (rows, d) = dpre W1_e;  dW1_e += dpre^T X_e
        floatX* dx_experts = single ? dx_copy_.get() : rows_a_.get();
        expert_up_backward(dx_experts, g.expert_in, dpre_.get(), xe, c.d, w.expert_in, ep, tiles, c.d, c.fe, experts,
                           ctx.stream);
        // exchange: each copy's dx back to its token's rank
        if (!single) {
            ProfileScope timed(ctx.profile, Section::AllToAll);
            permute_rows(rows_b_.get(), dx_experts, ep.copy_row, splits_[l].received, c.d, false, ctx.stream);
            bytes_sent_ += exchange_rows(dx_copy_.get(), splits_[l].send, rows_b_.get(), splits_[l].recv, c.d,
                                         *ctx.comm, ctx.stream);
        }
        // route:    dR[:, e] += Σ_{copies of e} x · ds   (k chosen columns only)
        router_weight_backward(g.router, router_grad_scratch_.get(), x, c.d, ds_copy_.get(), p.copy_row, p.group_offset,
                               1, c.d, c.E, ctx.stream);
        // group:    dx[t] = Σ_j dx_copy + Σ_j R[:, e_j] ds_j                  floatX (N, d)
        gather_input_grad(dx, c.d, dx_copy_.get(), ds_copy_.get(), w.router, p, N_, 1, c.d, c.E, c.k, ctx.stream);
    }

    void add_expert_counts(int l, int* counts, Ctx& ctx) { add_group_sizes(counts, plan(l).group_offset, c_.E, ctx.stream); }

    // Bytes this rank sent to other ranks since the last call: rows (SPEC §3: about 4·N·k·d·(R−1)/R·2
    // per layer when balanced) plus the count metadata.
    int64_t take_bytes_sent() { return std::exchange(bytes_sent_, 0); }

    // Layer l's choices in its last forward, (N, k): tests hold the reference to them.
    std::vector<int> selection(int l) const {
        std::vector<int> all = sel_.download();
        return std::vector<int>(all.begin() + l * copies_, all.begin() + (l + 1) * copies_);
    }

  private:
    const Config c_;
    const int N_, world_, Er_;            // tokens here, ranks, experts owned here
    const int64_t copies_, capacity_;     // N·k copies leave this rank; at most R·N·k arrive (dropless)
    const int max_tiles_, owner_max_tiles_;
    int64_t bytes_sent_ = 0;
    std::vector<ExpertSplits> splits_;    // per layer, learned in the forward, reused by the backward
    // per layer, kept for the backward
    DeviceBuffer<floatX> o_, pre_, h_, x_received_;
    DeviceBuffer<int> sel_, copy_pos_, copy_row_, group_offset_, tile_group_, tile_start_, num_tiles_;
    DeviceBuffer<int> owner_group_offset_, owner_copy_row_, owner_tile_group_, owner_tile_start_, owner_num_tiles_;
    DeviceBuffer<float> gate_;
    // scratch shared by all layers
    DeviceBuffer<int> chunk_counts_, send_counts_, recv_counts_;
    DeviceBuffer<floatX> d_o_, dpre_, dx_copy_, rows_a_, rows_b_;
    DeviceBuffer<float> ds_copy_, router_grad_scratch_;

    RoutingPlan plan(int l) {
        const size_t G = c_.E;
        return {sel_.get() + l * copies_, gate_.get() + l * copies_, group_offset_.get() + l * (G + 1),
                copy_row_.get() + l * copies_, copy_pos_.get() + l * copies_, tile_group_.get() + (size_t)l * max_tiles_,
                tile_start_.get() + (size_t)l * max_tiles_, num_tiles_.get() + l, chunk_counts_.get()};
    }
    // The plan of the rows this rank's experts received (Expert Parallel): groups of owned experts.
    RoutingPlan owner_plan(int l) {
        return {nullptr, nullptr, owner_group_offset_.get() + l * (Er_ + 1), owner_copy_row_.get() + l * capacity_,
                nullptr, owner_tile_group_.get() + (size_t)l * owner_max_tiles_,
                owner_tile_start_.get() + (size_t)l * owner_max_tiles_, owner_num_tiles_.get() + l, nullptr};
    }
};

}  // namespace lmoe

#ifndef LMOE_NO_MAIN
int main(int argc, char** argv) { return lmoe::trainer_main<lmoe::MoeFfn>(argc, argv); }
#endif
