// moe_ep_baseline: the same language model with standard MoE FFN layers (SPEC §2.2), trained with
// Expert Parallel (SPEC §3): the baseline Multi-Head LatentMoE is compared against. Everything dense
// is the shared skeleton in common/trainer.cuh; this file is the FFN layer, as the named stages of
// Expert Parallel:
//
//   route -> group -> exchange -> compute -> exchange back -> weight + merge
//
// Each token x (d) picks its top-k experts; its k copies are grouped by expert; each expert runs
// its rows through W1, GELU and W2 as grouped GEMMs (common/grouped_gemm.cuh); the outputs are
// weighted by the gates and summed per token. On one GPU the two exchanges are the identity; with
// R ranks (Expert Parallel) they become variable-size all-to-alls after a count exchange.
#include "common/grouped_gemm.cuh"
#include "common/io_router.cuh"
#include "common/moe_permute.cuh"
#include "common/trainer.cuh"

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

    MoeFfn(const Config& c, int N, int world)
        : c_(c), N_(N), copies_((int64_t)N * c.k), max_tiles_((int)routing_max_tiles(N, 1, c.E, c.k)) {
        if (world != 1)
            throw ConfigError("moe_ep_baseline runs on one GPU so far: its Expert Parallel exchange is not written yet");
        const size_t L = c.L;
        o_.resize(L * copies_ * c.d); pre_.resize(L * copies_ * c.fe); h_.resize(L * copies_ * c.fe);
        sel_.resize(L * copies_); gate_.resize(L * copies_); copy_pos_.resize(L * copies_); copy_row_.resize(L * copies_);
        group_offset_.resize(L * (c.E + 1));
        tile_group_.resize(L * max_tiles_); tile_start_.resize(L * max_tiles_); num_tiles_.resize(L);
        chunk_counts_.resize((size_t)routing_chunks(N) * c.E);
        d_o_.resize(copies_ * c.d); dpre_.resize(copies_ * c.fe); dx_copy_.resize(copies_ * c.d); ds_copy_.resize(copies_);
    }

    // out (N, d) = FFN_l(x (N, d)).
    void forward(int l, floatX* out, const floatX* x, const Layer& w, const float* bias, Ctx& ctx) {
        const Config& c = c_;
        const RoutingPlan p = plan(l);
        floatX *o = o_.get() + (size_t)l * copies_ * c.d, *pre = pre_.get() + (size_t)l * copies_ * c.fe;
        floatX* h = h_.get() + (size_t)l * copies_ * c.fe;
        // route:    sel, gate (N, k) = top-k of x R + b                     int32, fp32
        router_forward(p.sel, p.gate, x, c.d, w.router, bias, N_, 1, c.d, c.E, c.k, ctx.stream);
        // group:    copies sorted by expert, tiles of one expert
        group_copies(p, N_, 1, c.E, c.k, ctx.stream);
        // exchange: one GPU owns every expert (Expert Parallel sends each copy to its expert's rank)
        // compute:  pre, h (N·k, f) = X_e W1_e^T, GELU(pre)                  floatX, group order
        expert_up_forward(pre, h, x, c.d, w.expert_in, p, max_tiles_, c.d, c.fe, ctx.stream);
        //           o (N·k, d) = h W2_e^T
        expert_down_forward(o, h, w.expert_out, p, max_tiles_, c.d, c.fe, ctx.stream);
        // exchange back: nothing to return on one GPU
        // weight + merge: out[t] (d) = Σ_j gate · o[copy (t, j)]           floatX (N, d)
        combine_forward(out, c.d, o, p, N_, 1, c.d, c.k, ctx.stream);
    }

    // dx (N, d) from dout (N, d); weight gradients accumulated into g.
    void backward(int l, floatX* dx, const floatX* dout, const floatX* x, const Layer& w, const GradLayer& g, Ctx& ctx) {
        const Config& c = c_;
        const RoutingPlan p = plan(l);
        const floatX *o = o_.get() + (size_t)l * copies_ * c.d, *pre = pre_.get() + (size_t)l * copies_ * c.fe;
        const floatX* h = h_.get() + (size_t)l * copies_ * c.fe;
        // weight + merge: d_o (N·k, d) = gate · dout;  ds (N·k) = gate-softmax backward of dout · o
        combine_backward(d_o_.get(), ds_copy_.get(), dout, c.d, o, p, N_, 1, c.d, c.k, ctx.stream);
        // exchange back: (Expert Parallel sends d_o to the experts' ranks)
        // compute:  dpre (N·k, f) = (d_o W2_e) ⊙ GELU'(pre);  dW2_e += d_o^T h
        expert_down_backward(dpre_.get(), g.expert_out, d_o_.get(), h, pre, w.expert_out, p, max_tiles_, c.d, c.fe, c.E,
                             ctx.stream);
        //           dx_copy (N·k, d) = dpre W1_e;  dW1_e += dpre^T X_e
        expert_up_backward(dx_copy_.get(), g.expert_in, dpre_.get(), x, c.d, w.expert_in, p, max_tiles_, c.d, c.fe, c.E,
                           ctx.stream);
        // exchange: (Expert Parallel returns dx_copy to the tokens' ranks)
        // route:    dR[:, e] += Σ_{copies of e} x · ds   (k chosen columns only)
        router_weight_backward(g.router, x, c.d, ds_copy_.get(), p.copy_row, p.group_offset, 1, c.d, c.E, ctx.stream);
        // group:    dx[t] = Σ_j dx_copy + Σ_j R[:, e_j] ds_j                  floatX (N, d)
        gather_input_grad(dx, c.d, dx_copy_.get(), ds_copy_.get(), w.router, p, N_, 1, c.d, c.E, c.k, ctx.stream);
    }

    void add_expert_counts(int l, int* counts, Ctx& ctx) { add_group_sizes(counts, plan(l).group_offset, c_.E, ctx.stream); }

    // Bytes sent to other ranks since the last call: none on one GPU.
    int64_t take_bytes_sent() { return 0; }

    // Layer l's choices in its last forward, (N, k): tests hold the reference to them.
    std::vector<int> selection(int l) const {
        std::vector<int> all = sel_.download();
        return std::vector<int>(all.begin() + l * copies_, all.begin() + (l + 1) * copies_);
    }

  private:
    const Config c_;
    const int N_;
    const int64_t copies_;
    const int max_tiles_;
    // per layer, kept for the backward
    DeviceBuffer<floatX> o_, pre_, h_;
    DeviceBuffer<int> sel_, copy_pos_, copy_row_, group_offset_, tile_group_, tile_start_, num_tiles_;
    DeviceBuffer<float> gate_;
    // scratch shared by all layers
    DeviceBuffer<int> chunk_counts_;
    DeviceBuffer<floatX> d_o_, dpre_, dx_copy_;
    DeviceBuffer<float> ds_copy_;

    RoutingPlan plan(int l) {
        const size_t G = c_.E;
        return {sel_.get() + l * copies_, gate_.get() + l * copies_, group_offset_.get() + l * (G + 1),
                copy_row_.get() + l * copies_, copy_pos_.get() + l * copies_, tile_group_.get() + (size_t)l * max_tiles_,
                tile_start_.get() + (size_t)l * max_tiles_, num_tiles_.get() + l, chunk_counts_.get()};
    }
};

}  // namespace lmoe

#ifndef LMOE_NO_MAIN
int main(int argc, char** argv) { return lmoe::trainer_main<lmoe::MoeFfn>(argc, argv); }
#endif
