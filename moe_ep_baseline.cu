// moe_ep_baseline: the same language model with standard MoE FFN layers (SPEC §2.2), trained with
// Expert Parallel (SPEC §3): the baseline Multi-Head LatentMoE is compared against. Everything dense
// is the skeleton both trainers share (train/gpu_model.cuh, run by train/loop.h); this file is the
// FFN layer, as the named stages of Expert Parallel:
//
//   route -> group -> dispatch -> compute -> combine -> weight + merge
//
// With --router locmoe (SPEC §2.6) route is LocMoE's: the GrAP gate, its two auxiliary losses and the
// capacity drop (moe/locmoe_router.cuh); the stages after it see only the copies the capacity kept.
//
// Each token x (d) picks its top-k experts; its k copies are grouped by expert; dispatch sends each
// copy to its expert's owner; each expert runs its rows through W1, GELU and W2 as grouped GEMMs;
// combine brings the outputs back, where they are weighted by the gates and summed per token. On one
// GPU dispatch and combine are the identity; with R ranks (Expert Parallel) they move variable
// numbers of rows, after an all-gather of the counts, by kernels that store into the owners' memory
// (no host synchronisation) or, across hosts, by NCCL send/recv of sizes read on the host.
//
// The includes, in the order the stages use them:
#include <memory>

#include "model/locmoe.h"                 // route (LocMoE): the capacity and the locality target
#include "moe/router.cuh"                 // route: router_forward, router_weight_backward (IO-aware top-k)
#include "moe/locmoe_router.cuh"          // route (LocMoE): GrAP gate, losses, capacity drop, backward
#include "moe/routing_plan.cuh"           // group: RoutingPlan, RoutingPlans, group_copies
#include "parallel/expert_dispatch.cuh"   // dispatch, combine: ExpertExchange (counts, then rows)
#include "moe/grouped/grouped_gemm.cuh"   // compute: expert_up_forward, expert_down_forward and backwards
#include "moe/combine.cuh"                // weight + merge: combine_forward, combine_backward, gather_input_grad
#include "train/main.cuh"                 // the trainer around this layer: trainer_main -> training_loop -> GpuModel

namespace lmoe {

class MoeFfn {
  public:
    static constexpr FfnKind kind = FfnKind::MoE;
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

    // Every device buffer allocated here has its term in train/gpu_memory.cuh (the start-up estimate).
    MoeFfn(const Config& c, int N, const Comm& comm)
        : c_(c), N_(N), copies_((int64_t)N * c.k), plans_(RoutingPlans::routed(c.L, N, 1, c.E, c.k)) {
        const int world = comm.world;
        if (world > 1) open_exchange(comm);
        if (c.locmoe()) init_locmoe(comm);
        const size_t L = c.L, n = rows();
        o_.resize(L * copies_ * c.d); pre_.resize(L * n * c.fe); h_.resize(L * n * c.fe);
        d_o_.resize(copies_ * c.d); dx_copy_.resize(copies_ * c.d); ds_copy_.resize(copies_);
        dpre_.resize(n * c.fe);
        if (!c.locmoe()) {
            router_grad_scratch_.resize(router_grad_scratch_size(c.E, c.d));
            router_t_.resize((size_t)c.E * c.d);
        }
        if (exchange_) expert_rows_.resize(n * c.d);  // the experts' output rows
    }

    // out (N, d) = FFN_l(x (N, d)).
    void forward(int l, floatX* out, const floatX* x, const Layer& w, const float* bias, Ctx& ctx) {
        const Config& c = c_;
        const RoutingPlan p = plans_[l];
        floatX *o = o_.get() + (size_t)l * copies_ * c.d, *pre = pre_.get() + l * rows() * c.fe;
        floatX* h = h_.get() + l * rows() * c.fe;
        if (c.locmoe()) {
            route_locmoe(l, p, x, w, ctx.stream);
        } else {
            // route:    sel, gate (N, k) = top-k of x R + b                          int32, fp32
            router_forward(p, x, c.d, w.router, bias, c.d, ctx.stream);
            // group:    copies sorted by expert, tiles of one expert
            group_copies(p, ctx.stream);
        }
        // dispatch: each copy's row to its expert's owner (one GPU: the experts read x through p)
        const ExpertRows in = dispatch(l, x, p, ctx);
        // compute:  pre, h (rows, f) = X_e W1_e^T, GELU(pre)                     floatX, owner order
        expert_up_forward(pre, h, in.x, c.d, w.expert_in, in.plan, c.d, c.fe, ctx.stream);
        //           o (rows, d) = h W2_e^T
        floatX* o_experts = expert_output(o);
        expert_down_forward(o_experts, h, w.expert_out, in.plan, c.d, c.fe, ctx.stream);
        // combine:  each result back to its token's rank, in the order the copies left    (N·k, d)
        to_sources(l, o, o_experts, p, ctx);
        // weight + merge: out[t] (d) = Σ_j gate · o[copy (t, j)]               floatX (N, d)
        combine_forward(out, c.d, o, p, c.d, ctx.stream);
    }

    // dx (N, d) from dout (N, d); weight gradients accumulated into g (the expert ones from the
    // copies of every rank, written instead where !ctx.accumulate_expert_grads).
    void backward(int l, floatX* dx, const floatX* dout, const floatX* x, const Layer& w, const GradLayer& g, Ctx& ctx) {
        const Config& c = c_;
        const RoutingPlan p = plans_[l];
        const floatX *o = o_.get() + (size_t)l * copies_ * c.d, *pre = pre_.get() + l * rows() * c.fe;
        const floatX* h = h_.get() + l * rows() * c.fe;
        const ExpertRows in = received(l, x, p);
        // weight + merge: d_o (N·k, d) = gate · dout;  ds (N·k) = gate-softmax backward of dout · o
        //                (LocMoE: dw = dout · o itself, for the backward of the full softmax)
        combine_backward(d_o_.get(), ds_copy_.get(), dout, c.d, o, p, c.d, ctx.stream, !c.locmoe());
        // combine (backward): d_o to the experts' owners
        const floatX* d_o_experts = to_owners(l, d_o_.get(), p, ctx);
        // compute:  dpre (rows, f) = (d_o W2_e) ⊙ GELU'(pre);  dW2_e (+)= d_o^T h
        const bool add = ctx.accumulate_expert_grads;
        expert_down_backward(dpre_.get(), g.expert_out, add, d_o_experts, h, pre, w.expert_out, in.plan, c.d, c.fe,
                             ctx.stream);
        //           dx_copy (rows, d) = dpre W1_e;  dW1_e (+)= dpre^T X_e   (over d_o_experts, read by now)
        floatX* dx_experts = expert_output(dx_copy_.get());
        expert_up_backward(dx_experts, g.expert_in, add, dpre_.get(), in.x, c.d, w.expert_in, in.plan, c.d, c.fe,
                           ctx.stream);
        // dispatch (backward): each copy's dx back to its token's rank            (N·k, d) group order
        to_sources(l, dx_copy_.get(), dx_experts, p, ctx);
        if (c.locmoe()) {
            // group:    dx[t] = Σ_{kept j} dx_copy                                floatX (N, d)
            gather_input_grad(dx, c.d, dx_copy_.get(), ds_copy_.get(), nullptr, nullptr, p, c.d, ctx.stream);
            // route:    dx += GrAP backward of dp = scale · dL/dp + Σ dw;  dε += dz
            locmoe_router_backward(dx, g.router_eps, grap_parts_.get(), x, w.router_eps, layer_stats(l).coef,
                                   ctx.loss_scale, p, ds_copy_.get(), c.d, ctx.stream);
            add_router_stats(step_loss_.get(), step_dropped_.get() + l, layer_stats(l), ctx.loss_scale, ctx.stream);
            return;
        }
        // route:    dR[:, e] += Σ_{copies of e} x · ds   (k chosen columns only)
        router_weight_backward(g.router, router_grad_scratch_.get(), x, c.d, ds_copy_.get(), p, c.d, ctx.stream);
        // group:    dx[t] = Σ_j dx_copy + Σ_j R[:, e_j] ds_j                     floatX (N, d)
        gather_input_grad(dx, c.d, dx_copy_.get(), ds_copy_.get(), w.router, router_t_.get(), p, c.d, ctx.stream);
    }

    // LocMoE's L_aux and L_loc (summed over the layers) and drops per layer since the last call,
    // averaged (losses) or summed (drops) over the ranks; zero for the top-k router.
    RouterStats take_router_stats(const Comm& comm, cudaStream_t stream) {
        RouterStats s{0, 0, std::vector<int64_t>(c_.L, 0)};
        if (!c_.locmoe()) return s;
        all_reduce_average(step_loss_.get(), 2, comm, stream);
        all_reduce_sum_int(step_dropped_.get(), c_.L, comm, stream);
        const std::vector<float> loss = step_loss_.download(stream);
        const std::vector<int> dropped = step_dropped_.download(stream);
        s.aux_loss = loss[0];
        s.loc_loss = loss[1];
        std::copy(dropped.begin(), dropped.end(), s.dropped.begin());
        CUDA_CHECK(cudaMemsetAsync(step_loss_.get(), 0, 2 * sizeof(float), stream));
        CUDA_CHECK(cudaMemsetAsync(step_dropped_.get(), 0, c_.L * sizeof(int), stream));
        return s;
    }

    // Layer l's routing plan of its last forward (the routed copies the load balance counts).
    RoutingPlan plan(int l) const { return plans_[l]; }

    // Bytes this rank sent to other ranks since the last call: rows (SPEC §3: about 4·N·k·d·(R−1)/R·2
    // per layer when balanced) plus the count tables. Synchronises `stream`.
    int64_t take_bytes_sent(cudaStream_t stream) { return exchange_ ? exchange_->take_bytes_sent(stream) : 0; }

    // Layer l's choices in its last forward, (N, k): tests hold the reference to them. LocMoE's are
    // the router's, before the capacity drop (which follows from them).
    std::vector<int> selection(int l) const {
        std::vector<int> sel = plans_.selection(l);
        for (int& e : sel) e = e < 0 ? ~e : e;
        return sel;
    }
    // Layer l's copies (N, k) in its last forward: 1 where LocMoE's capacity kept the copy, 0 where it
    // dropped it (capacity_drop marks it ~e); all 1 for the top-k router.
    std::vector<int> kept(int l) const {
        std::vector<int> kept = plans_.selection(l);
        for (int& e : kept) e = e >= 0;
        return kept;
    }
    // LocMoE's capacity C, rows per expert and micro-batch (0: unlimited).
    int capacity() const { return capacity_; }

  private:
    // Expert Parallel's exchange on R > 1 ranks, by --ep-exchange: device (kernels move the rows
    // through the peers' memory, no host synchronisation), host (split sizes read on the host, NCCL
    // send/recv), or auto (device where every rank reaches every other's memory).
    void open_exchange(const Comm& comm) {
        const Config& c = c_;
        exchange_ = std::make_unique<ExpertExchange>(c.L, N_, c.E, c.k, c.d, comm, c.ep_exchange != "host");
        const ExpertTransport t = exchange_->transport();
        if (c.ep_exchange == "device" && t != ExpertTransport::Device)
            throw ConfigError("--ep-exchange device: NCCL cannot give every rank load/store access to every other "
                              "rank's memory (ranks on several hosts, no peer-to-peer path, or NCCL_CUMEM_ENABLE=0); "
                              "use --ep-exchange host");
        if (comm.rank == 0)
            std::printf("expert exchange: %s (%s); %.2f GiB a GPU for the rows the owners receive (room for R·N·k "
                        "= %d a layer, dropless)\n",
                        transport_name(t),
                        t == ExpertTransport::Device ? "rows stored into the owners' memory, no host synchronisation"
                                                     : "split sizes read on the host each layer, NCCL send/recv",
                        exchange_->row_bytes() / kGiB, exchange_->capacity());
    }
    // LocMoE's capacity, this rank's locality target and the buffers of its losses (SPEC §2.6).
    void init_locmoe(const Comm& comm) {
        const Config& c = c_;
        const int node_size = locmoe_node_size(c, comm.world, comm.local_size);  // checked on every rank at start-up
        const LocMoeSetup s = locmoe_setup(c, N_, comm.rank, comm.world, node_size);
        capacity_ = s.capacity;
        target_.resize(c.E);
        target_.upload(std::vector<float>(s.D.begin(), s.D.end()));
        coef_.resize((size_t)c.L * c.E); layer_loss_.resize(2 * c.L); layer_dropped_.resize(c.L);
        step_loss_.resize(2); step_dropped_.resize(c.L);
        CUDA_CHECK(cudaMemset(step_loss_.get(), 0, 2 * sizeof(float)));
        CUDA_CHECK(cudaMemset(step_dropped_.get(), 0, c.L * sizeof(int)));
        grap_parts_.resize(grap_parts_size(N_, c.E));
    }
    LocMoeLayerStats layer_stats(int l) const {
        return {coef_.get() + (size_t)l * c_.E, layer_loss_.get() + 2 * l, layer_dropped_.get() + l};
    }
    // route (LocMoE): sel, gate (N, k) = top-k of the GrAP gate p and p there; group; the layer's
    // losses (from the routed copies); then the copies over capacity dropped and the kept ones grouped.
    void route_locmoe(int l, const RoutingPlan& p, const floatX* x, const Layer& w, cudaStream_t stream) {
        locmoe_router_forward(p, grap_parts_.get(), x, w.router_eps, c_.d, stream);
        group_copies(p, stream);
        locmoe_losses(layer_stats(l), grap_parts_.get(), p, target_.get(), c_.aux_loss_weight, c_.loc_loss_weight,
                      capacity_, stream);
        if (capacity_ > 0) capacity_drop(p, capacity_, stream);
    }

    // The rows the experts of this rank work on and their plan: the received rows (R > 1), or the
    // token rows read through the routing plan (one GPU).
    struct ExpertRows {
        const floatX* x;
        RoutingPlan plan;
    };
    // Expert Parallel's dispatch and combine, each timed as a section of the step; on one GPU every
    // expert is here and both are the identity (the experts read and write the copies in place).
    ExpertRows dispatch(int l, const floatX* x, const RoutingPlan& p, Ctx& ctx) {
        if (!exchange_) return {x, p};
        ProfileScope timed(ctx.profile, Section::AllToAll);
        const RoutingPlan owner = exchange_->dispatch(l, x, p, *ctx.comm, ctx.stream);
        return {exchange_->received_rows(l), owner};
    }
    ExpertRows received(int l, const floatX* x, const RoutingPlan& p) const {
        if (!exchange_) return {x, p};
        return {exchange_->received_rows(l), exchange_->owner_plan(l)};
    }
    // The copies' output gradients (N·k, d, group order) to their experts' owners, in owner order.
    const floatX* to_owners(int l, const floatX* d_o, const RoutingPlan& p, Ctx& ctx) {
        if (!exchange_) return d_o;
        ProfileScope timed(ctx.profile, Section::AllToAll);
        exchange_->to_owners(l, expert_rows_.get(), d_o, p, *ctx.comm, ctx.stream);
        return expert_rows_.get();
    }
    // Rows the experts computed (owner order) to the ranks their copies came from, in group order.
    void to_sources(int l, floatX* rows, const floatX* expert_rows, const RoutingPlan& p, Ctx& ctx) {
        if (!exchange_) return;
        ProfileScope timed(ctx.profile, Section::AllToAll);
        exchange_->to_sources(l, rows, expert_rows, p, *ctx.comm, ctx.stream);
    }
    // Where the experts write rows meant for `rows` (group order): in place on one GPU, in the owner
    // rows under Expert Parallel (to_sources then moves them).
    floatX* expert_output(floatX* rows) { return exchange_ ? expert_rows_.get() : rows; }
    // Rows the experts of this rank may see per layer: N·k here, R·N·k under Expert Parallel (dropless).
    size_t rows() const { return exchange_ ? exchange_->capacity() : copies_; }

    const Config c_;
    const int N_;                         // tokens here
    const int64_t copies_;                // N·k copies leave this rank
    RoutingPlans plans_;                  // per layer, kept for the backward
    std::unique_ptr<ExpertExchange> exchange_;  // R > 1 only
    // per layer, kept for the backward
    DeviceBuffer<floatX> o_, pre_, h_;
    // scratch shared by all layers
    DeviceBuffer<floatX> d_o_, dpre_, dx_copy_, expert_rows_, router_t_;  // router_t_: R transposed
    DeviceBuffer<float> ds_copy_, router_grad_scratch_;
    // LocMoE only
    int capacity_ = 0;                                   // C; 0: unlimited
    DeviceBuffer<float> target_, coef_, layer_loss_;     // D_l (E); per layer: dL/dp (E), L_aux and L_loc
    DeviceBuffer<int> layer_dropped_;                    // per layer: copies over capacity
    DeviceBuffer<float> step_loss_, grap_parts_;         // L_aux, L_loc since the last take; per-block parts
    DeviceBuffer<int> step_dropped_;                     // per layer, since the last take
};

}  // namespace lmoe

#ifndef LMOE_NO_MAIN
int main(int argc, char** argv) { return lmoe::trainer_main<lmoe::MoeFfn>(argc, argv); }
#endif
