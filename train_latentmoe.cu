// train_latentmoe: a GPT-style language model whose FFN layers are Multi-Head LatentMoE (SPEC §2.1),
// trained with Head Parallel (SPEC §3). Everything dense is the skeleton both trainers share
// (train/gpu_model.cuh, run by train/loop.h); this file is the FFN layer, as the named stages of the
// method:
//
//   project -> exchange -> route -> group -> compute -> weight -> exchange back -> merge
//
// Each token x (d) is projected into H latent sub-tokens u[t, h] (dh); each head routes its
// sub-tokens among its own E experts (top-k), the experts run as IO-aware tiles, their outputs are
// weighted by the gates, and the heads' outputs are merged back to d. On one GPU the two exchanges
// are the identity; with R ranks (Head Parallel) they become equal-block all-to-alls.
//
// The includes, in the order the stages use them:
#include <utility>

#include "dense/matmul.cuh"            // project, merge: matmul_forward, matmul_backward (cuBLAS)
#include "parallel/head_exchange.cuh"  // exchange: send_to_head_owners, return_from_head_owners
#include "moe/router.cuh"              // route: router_forward, router_weight_backward (IO-aware top-k)
#include "moe/routing_plan.cuh"        // group: RoutingPlan, RoutingPlans, group_copies
#include "moe/latent/io_experts.cuh"   // compute: expert_forward, expert_backward (IO-aware expert tiles)
#include "moe/combine.cuh"             // weight: combine_forward, combine_backward, gather_input_grad
#include "train/main.cuh"              // the trainer around this layer: trainer_main -> training_loop -> GpuModel

namespace lmoe {

class LatentMoeFfn {
  public:
    static constexpr FfnKind kind = FfnKind::LatentMoE;
    static const char* summary() { return "Trains a Multi-Head LatentMoE language model (Head Parallel)."; }
    static void check_supported(const Config& c) {
        if (!expert_shape_supported(c.dh, c.fe))
            throw ConfigError("the GPU expert kernels need head-dim 16, 32, 64 or 128 and expert-dim a multiple of 32 "
                              "(got head-dim " + std::to_string(c.dh) + ", expert-dim " + std::to_string(c.fe) + ")");
        if (c.k > kMaxTopK || c.E > kMaxRouterExperts || c.H * c.E > 4096)
            throw ConfigError("the GPU router supports k <= 32, E <= 256 and H·E <= 4096");
        if ((c.H * c.dh) % 8 != 0) throw ConfigError("H·dh must be a multiple of 8 (16-byte rows)");
    }
    // project + merge + router + k experts (two dh×fe matmuls each), per token
    static double forward_macs_per_token(const Config& c) {
        const double HD = (double)c.H * c.dh;
        return 2 * c.d * HD + HD * c.E + (double)c.H * c.k * 2 * c.dh * c.fe;
    }

    // Routing groups (heads) this rank owns: Head Parallel gives each rank H/R whole heads, and the
    // owner sees every sub-token of its heads, so its expert loads need no exchange.
    static int local_heads(const Config& c, int world) { return c.H / world; }
    static constexpr bool kLoadsAreGlobal = true;
    // SPEC §3: each rank sends 4·N·H·dh·(R−1)/R elements per layer and step, exactly
    static double predicted_bytes_per_layer(const Config& c, int N, int world) {
        return 4.0 * N * c.H * c.dh * (world - 1) / world * sizeof(floatX);
    }

    // Every device buffer allocated here has its term in train/gpu_memory.cuh (the start-up estimate).
    LatentMoeFfn(const Config& c, int N, const Comm& comm)
        : c_(c), N_(N), HD_(c.H * c.dh), world_(comm.world), Hl_(c.H / world_), M_(world_ * N),
          ldU_(c.H / world_ * c.dh), copies_((int64_t)c.H * N * c.k),
          plans_(RoutingPlans::routed(c.L, world_ * N, c.H / world_, c.E, c.k)),
          weight_parts_(world_ * N, c.H / world_, c.E, c.k, c.fe, c.dh) {
        const size_t L = c.L;
        U_.resize(L * N * HD_); y_.resize(L * N * HD_); o_.resize(L * copies_ * c.dh);
        for (auto* b : {&rows_, &heads_, &heads2_, &exchange_}) b->resize((size_t)N * HD_);
        d_o_.resize(copies_ * c.dh); dx_copy_.resize(copies_ * c.dh); ds_copy_.resize(copies_);
        router_grad_scratch_.resize(router_grad_scratch_size(Hl_ * c.E, c.dh));
        router_t_.resize((size_t)Hl_ * c.E * c.dh);
    }

    // out (N, d) = FFN_l(x (N, d)). W = H/R·dh columns per owner; M = R·N rows at the owner.
    void forward(int l, floatX* out, const floatX* x, const Layer& w, const float* bias, Ctx& ctx) {
        const Config& c = c_;
        const RoutingPlan p = plans_[l];
        floatX *U = U_.get() + (size_t)l * N_ * HD_, *y = y_.get() + (size_t)l * N_ * HD_;
        floatX* o = o_.get() + (size_t)l * copies_ * c.dh;
        const bool single = world_ == 1;  // one rank holds every head: the exchanges vanish
        // project:  u (N, H·dh) = x W_mh^T                                   floatX
        matmul_forward(ctx.cublas, single ? U : rows_.get(), x, w.ffn_in, N_, c.d, HD_, ctx.stream);
        // exchange: U (R·N, W): this rank's heads of every rank's tokens     equal blocks, no metadata
        if (!single) to_head_owners(U, rows_.get(), ctx);
        // route:    sel, gate (H/R, R·N, k) = top-k of U_h R_h + b_h          int32, fp32
        router_forward(p, U, ldU_, w.router, bias, c.dh, ctx.stream);
        // group:    copies sorted by (head, expert), tiles of one expert
        group_copies(p, ctx.stream);
        // compute:  o (copies, dh) = V_e^T GELU(K_e U)                         floatX, group order
        expert_forward(o, U, ldU_, w.expert_in, w.expert_out, p, c.dh, c.fe, ctx.stream);
        // weight:   Y[t, h] (dh) = Σ_j gate · o[copy (h, t, j)]                floatX (R·N, W)
        combine_forward(single ? y : heads_.get(), ldU_, o, p, c.dh, ctx.stream);
        // exchange back: y (N, H·dh): every head's output for this rank's tokens
        if (!single) from_head_owners(y, heads_.get(), ctx);
        // merge:    out (N, d) = y W_mg^T
        matmul_forward(ctx.cublas, out, y, w.ffn_out, N_, HD_, c.d, ctx.stream);
    }

    // dx (N, d) from dout (N, d); weight gradients accumulated into g (the expert ones from the
    // tokens of every rank, written instead where !ctx.accumulate_expert_grads).
    void backward(int l, floatX* dx, const floatX* dout, const floatX* x, const Layer& w, const GradLayer& g, Ctx& ctx) {
        const Config& c = c_;
        const RoutingPlan p = plans_[l];
        const floatX *U = U_.get() + (size_t)l * N_ * HD_, *y = y_.get() + (size_t)l * N_ * HD_;
        const floatX* o = o_.get() + (size_t)l * copies_ * c.dh;
        const bool single = world_ == 1;
        floatX *dy = rows_.get(), *dY = single ? dy : heads_.get();
        // merge:    dy (N, H·dh) = dout W_mg;  dW_mg += dout^T y
        matmul_backward(ctx.cublas, dy, g.ffn_out, dout, y, w.ffn_out, N_, HD_, c.d, false, ctx.stream);
        // exchange: dY (R·N, W) at the head owners
        if (!single) to_head_owners(dY, dy, ctx);
        // weight:   d_o (copies, dh) = gate · dY;  ds (copies) = gate-softmax backward of dY · o
        combine_backward(d_o_.get(), ds_copy_.get(), dY, ldU_, o, p, c.dh, ctx.stream);
        // compute:  dx_copy (copies, dh); dK, dV (+)= (hidden recomputed per tile)
        expert_backward(dx_copy_.get(), g.expert_in, g.expert_out, ctx.accumulate_expert_grads, d_o_.get(), U, ldU_,
                        w.expert_in, w.expert_out, p, weight_parts_.view(), c.dh, c.fe, ctx.stream);
        // route:    dR_h[:, e] += Σ_{copies of e} U · ds   (k chosen columns only)
        router_weight_backward(g.router, router_grad_scratch_.get(), U, ldU_, ds_copy_.get(), p, c.dh, ctx.stream);
        // group:    dU[t, h] = Σ_j dx_copy + Σ_j R_h[:, e_j] ds_j                floatX (R·N, W)
        floatX* dU = single ? rows_.get() : heads2_.get();
        gather_input_grad(dU, ldU_, dx_copy_.get(), ds_copy_.get(), w.router, router_t_.get(), p, c.dh, ctx.stream);
        // exchange back: du (N, H·dh) for this rank's tokens
        floatX* du = rows_.get();
        if (!single) from_head_owners(du, dU, ctx);
        // project:  dx (N, d) = du W_mh;  dW_mh += du^T x
        matmul_backward(ctx.cublas, dx, g.ffn_in, du, x, w.ffn_in, N_, c.d, HD_, false, ctx.stream);
    }

    // Layer l's routing plan of its last forward (the routed copies the load balance counts).
    RoutingPlan plan(int l) const { return plans_[l]; }

    // Layer l's choices in its last forward, (H/R, R·N, k): tests hold the reference to them.
    std::vector<int> selection(int l) const { return plans_.selection(l); }

    // No auxiliary losses and no capacity here (RouterStats of LocMoE, moe_ep_baseline.cu).
    RouterStats take_router_stats(const Comm&, cudaStream_t) const { return {0, 0, std::vector<int64_t>(c_.L, 0)}; }

    // Bytes this rank sent to other ranks since the last call (SPEC §3 predicts 4·N·H·dh·(R−1)/R·2
    // per layer and step).
    int64_t take_bytes_sent(cudaStream_t) { return std::exchange(bytes_sent_, 0); }

  private:
    // The two directions of Head Parallel's exchange, each timed as a section of the step and
    // counted in the bytes sent: token rows (N, H·dh) -> head rows (R·N, W) at the owners, and back.
    void to_head_owners(floatX* heads, const floatX* rows, Ctx& ctx) {
        ProfileScope timed(ctx.profile, Section::AllToAll);
        bytes_sent_ += send_to_head_owners(heads, exchange_.get(), rows, N_, HD_, *ctx.comm, ctx.stream);
    }
    void from_head_owners(floatX* rows, const floatX* heads, Ctx& ctx) {
        ProfileScope timed(ctx.profile, Section::AllToAll);
        bytes_sent_ += return_from_head_owners(rows, exchange_.get(), heads, N_, HD_, *ctx.comm, ctx.stream);
    }

    const Config c_;
    const int N_, HD_, world_, Hl_, M_, ldU_;  // tokens here, H·dh, ranks, heads here, rows at the owner, W
    const int64_t copies_;                     // H·N·k = (H/R)·(R·N)·k
    int64_t bytes_sent_ = 0;
    // per layer, kept for the backward
    RoutingPlans plans_;
    DeviceBuffer<floatX> U_, y_, o_;
    WeightGradScratch weight_parts_;  // the expert weight gradient's cut groups, shared by all layers
    // scratch shared by all layers: (N, H·dh) token rows, (R·N, W) head rows, the exchange buffer
    DeviceBuffer<floatX> rows_, heads_, heads2_, exchange_, d_o_, dx_copy_, router_t_;  // router_t_: R transposed
    DeviceBuffer<float> ds_copy_, router_grad_scratch_;
};

}  // namespace lmoe

#ifndef LMOE_NO_MAIN
int main(int argc, char** argv) { return lmoe::trainer_main<lmoe::LatentMoeFfn>(argc, argv); }
#endif
