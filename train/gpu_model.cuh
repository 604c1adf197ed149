// The dense model on one GPU, shared by both trainers: embedding, attention blocks, norms, LM head
// and loss, the data-parallel gradient sync and the optimizer, with the trainer's FFN layer plugged
// in. The training loop (train/loop.h) and text generation (train/sample.h) drive it through the
// interface it shares with the CPU reference (train/cpu_model.h); the GPU tests drive forward() and
// backward() directly. Each trainer supplies only its FFN layer, a class with this shape (see
// train_latentmoe.cu, moe_ep_baseline.cu):
//
//   struct Ffn {
//       static constexpr FfnKind kind;
//       static const char* summary();                  // for --help
//       static void check_supported(const Config&);    // throws ConfigError for shapes the kernels lack
//       static double forward_macs_per_token(const Config&);  // for the FLOP count
//       static int local_heads(const Config&, int world);     // routing groups (heads) on this rank
//       static constexpr bool kLoadsAreGlobal;         // false: sum the expert loads over the ranks
//       static double predicted_bytes_per_layer(const Config&, int N, int world);  // SPEC §3, per step
//       Ffn(const Config&, int N, const Comm&);        // N tokens per micro-batch; allocates activations
//       void forward(int l, floatX* out, const floatX* x, const Layer& w, const float* bias, Ctx&);
//       void backward(int l, floatX* dx, const floatX* dout, const floatX* x, const Layer& w, const GradLayer& g,
//                     Ctx&);                         // dx written; weight gradients accumulated (the
//                                                    // expert ones written: !ctx.accumulate_expert_grads)
//       RoutingPlan plan(int l) const;                 // layer l's routing plan of its last forward
//       int64_t take_bytes_sent(cudaStream_t);         // bytes sent to other ranks since the last call
//       RouterStats take_router_stats(const Comm&, cudaStream_t);  // LocMoE's (zero for top-k routers)
//   };
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu/reference.h"
#include "dense/adamw.cuh"
#include "dense/attention.cuh"
#include "dense/cross_entropy.cuh"
#include "dense/embedding.cuh"
#include "dense/global_norm.cuh"
#include "dense/matmul.cuh"
#include "dense/rmsnorm.cuh"
#include "dense/rope.cuh"
#include "io/dataloader.h"
#include "model/config.h"
#include "model/params.h"
#include "moe/load_balance.cuh"
#include "parallel/comm.cuh"
#include "parallel/gradient_buckets.cuh"
#include "train/checkpoint.h"
#include "train/flops.h"
#include "train/gpu_memory.cuh"
#include "train/step_log.h"
#include "util/cuda_utils.cuh"
#include "util/step_profile.cuh"

namespace lmoe {

// What every layer's kernels run with.
struct Ctx {
    cublasHandle_t cublas;
    cudaStream_t stream;
    const Comm* comm;
    StepProfile* profile = nullptr;  // null: no timing
    float loss_scale = 1;            // d(objective)/d(loss) of this micro-batch: 1/grad_accum in training
    // false: the expert weight gradients are written, not added to (the first micro-batch of a step,
    // whose zero_grad does not clear them)
    bool accumulate_expert_grads = true;
};

using Layer = ModelTensors<floatX>::Layer;
using GradLayer = ModelTensors<float>::Layer;

// Throws ConfigError for shapes the GPU kernels lack: the dense ones here, the FFN's in Ffn.
template <class Ffn>
void check_gpu_supported(const Config& c) {
    if (const std::string why = gpu_architecture_mismatch(); !why.empty()) throw ConfigError(why);
    if ((int64_t)c.B * c.n_head > 65535)
        throw ConfigError("the GPU attention kernels need batch · attn-heads <= 65535 (one grid row each), not " +
                          std::to_string((int64_t)c.B * c.n_head));
    if (!attention_head_size_supported(c.d_attn()))
        throw ConfigError("the GPU attention kernels need an attention head size d/n_head of 16, 32, 64 or 128 (got " +
                          std::to_string(c.d_attn()) + ")");
    Ffn::check_supported(c);
}

// AdamW's weight decay per tensor of the flat buffer (SPEC §2.4: matrices only).
inline DecayTable decay_table(const ParamLayout& layout, float weight_decay) {
    std::vector<int64_t> end;
    std::vector<float> decay;
    for (const TensorSpec& t : layout.tensors) {
        if (t.offset != (end.empty() ? 0 : end.back())) throw std::logic_error("the parameter layout has a gap");
        end.push_back(t.offset + t.numel);
        decay.push_back(t.decay ? weight_decay : 0.f);
    }
    return DecayTable(end, decay);
}

// The forward reads the weights in blocks, in this order: 0 the embedding, 1 + l layer l (its dense
// and its FFN tensors), L + 1 the final norm and the LM head. The optimizer updates them block by
// block in the same order, so that the next forward can start on the first block while it updates
// the others.
inline int forward_block(const std::string& tensor, int L) {
    if (tensor == "wte") return 0;
    if (tensor == "lnf" || tensor == "lm_head") return L + 1;
    if (tensor.rfind("layer", 0) == 0) return 1 + std::stoi(tensor.substr(5));
    throw std::logic_error("no forward block reads the tensor " + tensor);
}

// The tensors `keep` picks, as runs per forward block (adjacent tensors of a block merged).
template <class Keep>
std::vector<Runs> runs_by_block(const ParamLayout& layout, int L, Keep keep) {
    std::vector<Runs> blocks(L + 2);
    for (const TensorSpec& t : layout.tensors) {
        if (!keep(t)) continue;
        Runs& runs = blocks[forward_block(t.name, L)];
        if (!runs.empty() && runs.back().first + runs.back().second == t.offset) runs.back().second += t.numel;
        else runs.push_back({t.offset, t.numel});
    }
    return blocks;
}

// The model on one GPU: fp32 master weights, their floatX working copy, fp32 gradients and AdamW
// moments, all in flat buffers laid out by build_param_layout; the activations of one micro-batch.
// Two streams: the main one runs the step; AdamW runs on a stream of lower priority, block by block
// (forward_block), and the next forward waits for a block's update just before it reads the block,
// so that the update of the later blocks overlaps the forward of the first ones.
template <class Ffn>
class GpuModel {
    // cudaMemGetInfo's free bytes before any member allocates: declared first, so initialised first
    const int64_t free_before_model_ = device_free_bytes();

  public:
    const Config cfg;
    const Comm comm;
    const int N;       // tokens per micro-batch on this rank
    const int heads;   // routing groups on this rank (LatentMoE: H / R; MoE: 1)
    const ParamLayout layout;
    Ctx ctx;
    DeviceBuffer<float> master, grads, m, v;
    DeviceBuffer<floatX> params;
    ModelTensors<floatX> w;
    ModelTensors<float> g;
    // Aux-loss-free balancing (SPEC §2.3): forward reads the biases, backward counts the copies,
    // sync_gradients sums the counts where loads are not global, optimizer_step updates the biases.
    LoadBalance balance;  // (L, heads, E)
    const DecayTable decay;  // AdamW's weight decay of each tensor

    // Every device buffer allocated here has its term in train/gpu_memory.cuh (the start-up estimate).
    GpuModel(const Config& c, const Comm& comm_)
        : cfg(c), comm(comm_), N(c.B * c.T), heads(Ffn::local_heads(c, comm_.world)),
          layout(build_param_layout(c, comm_.rank, comm_.world)), balance(c.L, heads, c.E),
          decay(decay_table(layout, c.weight_decay)),
          ffn_(c, c.B * c.T, comm_) {
        int least = 0, greatest = 0;  // numerically: the greatest priority is the least number
        CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
        CUDA_CHECK(cudaStreamCreateWithPriority(&ctx.stream, cudaStreamDefault, greatest));
        CUDA_CHECK(cudaStreamCreateWithPriority(&optimizer_stream_, cudaStreamDefault, least));
        CUDA_CHECK(cudaEventCreateWithFlags(&clip_ready_, cudaEventDisableTiming));
        for (cudaEvent_t& e : updated_) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        ctx.cublas = make_cublas_handle();
        ctx.comm = &comm;
        profile_ = std::make_unique<StepProfile>(ctx.stream);
        ctx.profile = profile_.get();
        const int64_t P = layout.total, d = c.d, C = c.n_head * c.d_attn();
        master.resize(P); grads.resize(P); m.resize(P); v.resize(P); params.resize(P);
        std::vector<float> host(P);
        init_params(host.data(), layout, c.seed);
        master.upload(host);
        copy_master_to_param(params.get(), master.get(), P, ctx.stream);
        for (auto* b : {&grads, &m, &v}) CUDA_CHECK(cudaMemsetAsync(b->get(), 0, P * sizeof(float), ctx.stream));
        w = bind_tensors(layout, params.get(), c.L, c.ffn);
        g = bind_tensors(layout, grads.get(), c.L, c.ffn);

        tokens_.resize(N); targets_.resize(N);
        for (int s = 0; s < 2; s++) {
            CUDA_CHECK(cudaMallocHost(&host_tokens_[s], 2 * N * sizeof(int)));
            CUDA_CHECK(cudaEventCreateWithFlags(&staged_[s], cudaEventDisableTiming));
        }
        resid_.resize((size_t)(c.L + 1) * N * d);
        resid_mid_.resize((size_t)c.L * N * d);
        xn1_.resize((size_t)c.L * N * d); xn2_.resize((size_t)c.L * N * d);
        rstd1_.resize((size_t)c.L * N); rstd2_.resize((size_t)c.L * N);
        qkv_.resize((size_t)c.L * N * 3 * C); lse_.resize((size_t)c.L * c.B * c.n_head * c.T);
        atty_.resize((size_t)c.L * N * C);
        xf_.resize((size_t)N * d); rstdf_.resize(N);
        logits_.resize((size_t)N * c.Vp()); losses_.resize(N); mean_loss_.resize(1);
        branch_.resize((size_t)N * d); dresid_.resize((size_t)N * d); dxn_.resize((size_t)N * d);
        dqkv_.resize((size_t)N * 3 * C); datty_.resize((size_t)N * C);
        attention_scratch_.resize(attention_scratch_bytes(c.B, c.T, c.n_head));
        norm_scratch_.resize(std::max(rmsnorm_backward_scratch_floats(N, c.d), global_norm_scratch_size()));
        embedding_scratch_.resize(embedding_backward_scratch_bytes(N, c.Vp()));
        clip_.resize(3);  // norm² of the replicated and of the sharded gradients, scale
        loss_norm_.resize(2);
    }
    ~GpuModel() {
        cudaStreamSynchronize(ctx.stream);  // a failed step may leave copies reading the staging buffers
        cudaStreamSynchronize(optimizer_stream_);
        for (int s = 0; s < 2; s++) {
            cudaEventDestroy(staged_[s]);
            cudaFreeHost(host_tokens_[s]);
        }
        for (cudaEvent_t e : updated_) cudaEventDestroy(e);
        cudaEventDestroy(clip_ready_);
        cublasDestroy(ctx.cublas);
        cudaStreamDestroy(optimizer_stream_);
        cudaStreamDestroy(ctx.stream);
    }

    // Forward pass on one micro-batch; returns nothing (the mean loss stays on the device, see
    // mean_loss_device). With `dloss` > 0 the loss kernel also writes d(loss·dloss)/dlogits, ready
    // for backward(); with dloss = 0 (evaluation) it does not.
    void forward(const int32_t* tokens, const int32_t* targets, float dloss) {
        const Config& c = cfg;
        const int d = c.d, C = c.n_head * c.d_attn();
        cudaStream_t st = ctx.stream;
        ctx.loss_scale = dloss;
        // The host does not wait for a training micro-batch, so the stream may still be copying from
        // the other staging buffer; this one is refilled once its own last copies are done.
        const int s = next_staging_;
        next_staging_ = 1 - s;
        CUDA_CHECK(cudaEventSynchronize(staged_[s]));
        int* staging = host_tokens_[s];
        std::copy(tokens, tokens + N, staging);
        std::copy(targets, targets + N, staging + N);
        CUDA_CHECK(cudaMemcpyAsync(tokens_.get(), staging, N * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(targets_.get(), staging + N, N * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaEventRecord(staged_[s], st));

        wait_for_update(0);
        embedding_forward(resid(0), tokens_.get(), w.wte, N, d, st);                     // x (N, d)
        wait_for_update(1);
        rmsnorm_forward(xn1(0), rstd1(0), resid(0), w.layers[0].ln1, N, d, st);
        for (int l = 0; l < c.L; l++) {
            const Layer& wl = w.layers[l];
            {
                ProfileScope timed(ctx.profile, Section::Attention);
                matmul_forward(ctx.cublas, qkv(l), xn1(l), wl.qkv, N, d, 3 * C, st);    // (N, 3C)
                rope_forward(qkv(l), c.B, c.T, c.n_head, c.d_attn(), st);
                attention_forward(atty(l), lse(l), qkv(l), c.B, c.T, c.n_head, c.d_attn(), st);  // (N, C)
                matmul_forward(ctx.cublas, branch_.get(), atty(l), wl.attn_out, N, C, d, st);  // (N, d)
            }
            residual_rmsnorm_forward(resid_mid(l), xn2(l), rstd2(l), resid(l), branch_.get(), wl.ln2, N, d, st);
            {
                ProfileScope timed(ctx.profile, Section::Ffn);
                ffn_.forward(l, branch_.get(), xn2(l), wl, balance.bias(l), ctx);                     // (N, d)
            }
            const bool last = l == c.L - 1;
            wait_for_update(l + 2);  // the next layer's, or the final norm's and LM head's
            residual_rmsnorm_forward(resid(l + 1), last ? xf_.get() : xn1(l + 1), last ? rstdf_.get() : rstd1(l + 1),
                                     resid_mid(l), branch_.get(), last ? w.lnf : w.layers[l + 1].ln1, N, d, st);
        }
        matmul_forward(ctx.cublas, logits_.get(), xf_.get(), w.lm_head, N, d, c.Vp(), st);  // (N, Vp)
        cross_entropy_forward_backward(logits_.get(), losses_.get(), targets_.get(), N, c.V, c.Vp(), dloss,
                                       dloss > 0, st);
        mean_loss(mean_loss_.get(), losses_.get(), N, st);
    }
    const float* mean_loss_device() const { return mean_loss_.get(); }

    // Backward of the last forward (which must have had dloss > 0); accumulates into grads (the first
    // after zero_grad writes the expert weights') and adds the micro-batch's routed slots to
    // expert_counts.
    void backward() {
        const Config& c = cfg;
        const int d = c.d, C = c.n_head * c.d_attn();
        cudaStream_t st = ctx.stream;
        // The step's last micro-batch: each forward block's replicated gradients are averaged over the
        // ranks as soon as this backward has finished them (a no-op on one rank).
        const bool last = ++micro_batches_ == c.grad_accum;
        if (!comm.single() && micro_batches_ > c.grad_accum)
            throw std::logic_error("a backward after the step's last micro-batch: its gradients were already averaged");
        reduced_in_backward_ = last;
        CUDA_CHECK(cudaMemsetAsync(dresid_.get(), 0, (size_t)N * d * sizeof(floatX), st));
        matmul_backward(ctx.cublas, dxn_.get(), g.lm_head, logits_.get(), xf_.get(), w.lm_head, N, d, c.Vp(), false, st);
        rmsnorm_backward(dresid_.get(), g.lnf, dxn_.get(), resid(c.L), w.lnf, rstdf_.get(), N, d, norm_scratch_.get(), st);
        if (last) buckets_.reduce(c.L + 1, grads.get(), st);
        for (int l = c.L - 1; l >= 0; l--) {  // dresid: d loss / d (residual stream after layer l)
            const Layer& wl = w.layers[l];
            const GradLayer& gl = g.layers[l];
            {
                ProfileScope timed(ctx.profile, Section::Ffn);
                ffn_.backward(l, dxn_.get(), dresid_.get(), xn2(l), wl, gl, ctx);
            }
            rmsnorm_backward(dresid_.get(), gl.ln2, dxn_.get(), resid_mid(l), wl.ln2, rstd2(l), N, d,
                             norm_scratch_.get(), st);
            {
                ProfileScope timed(ctx.profile, Section::Attention);
                matmul_backward(ctx.cublas, datty_.get(), gl.attn_out, dresid_.get(), atty(l), wl.attn_out, N, C, d,
                                false, st);
                attention_backward(dqkv_.get(), attention_scratch_.get(), datty_.get(), atty(l), lse(l), qkv(l), c.B,
                                   c.T, c.n_head, c.d_attn(), st);
                rope_backward(dqkv_.get(), c.B, c.T, c.n_head, c.d_attn(), st);
                matmul_backward(ctx.cublas, dxn_.get(), gl.qkv, dqkv_.get(), xn1(l), wl.qkv, N, d, 3 * C, false, st);
            }
            rmsnorm_backward(dresid_.get(), gl.ln1, dxn_.get(), resid(l), wl.ln1, rstd1(l), N, d, norm_scratch_.get(), st);
            balance.count(l, ffn_.plan(l), st);
            if (last) buckets_.reduce(1 + l, grads.get(), st);
        }
        embedding_backward(g.wte, dresid_.get(), tokens_.get(), N, d, c.Vp(), embedding_scratch_.get(), st);
        if (last) buckets_.reduce(0, grads.get(), st);
        ctx.accumulate_expert_grads = true;  // the step's later micro-batches add
        grads_cleared_ = false;
    }

    // A step begins: its gradients and its loss start from zero. The expert weights' gradients
    // (`*.expert_in`, `*.expert_out`: most of the buffer) are not cleared but written by the step's
    // first backward; the others are cleared here unless the optimizer_step before cleared them (block
    // by block, after their update) and no backward came since.
    void zero_grad() {
        if (!grads_cleared_)
            for (const Runs& runs : cleared_grads_) clear_gradients(runs, ctx.stream);
        grads_cleared_ = true;
        CUDA_CHECK(cudaMemsetAsync(loss_norm_.get(), 0, sizeof(float), ctx.stream));
        ctx.accumulate_expert_grads = false;
        micro_batches_ = 0;
        reduced_in_backward_ = false;
    }

    // Data parallel: average the step's loss and the replicated gradients over the ranks (the
    // gradients in buckets during the step's last backward, GradientBuckets; in one all-reduce if
    // fewer micro-batches than --grad-accum ran); the sharded expert gradients already hold every
    // rank's tokens, each rank's loss being its own mean, so they are divided by R to be gradients
    // of the global mean.
    void sync_gradients() {
        if (comm.single()) return;
        ProfileScope timed(ctx.profile, Section::AllReduce);
        all_reduce_average(loss_norm_.get(), 1, comm, ctx.stream);
        if (reduced_in_backward_) buckets_.wait(ctx.stream);
        else all_reduce_average(grads.get(), layout.replicated, comm, ctx.stream);
        const int sharded = (int)(layout.total - layout.replicated);
        const float inv_world = 1.f / comm.world;
        CUBLAS_CHECK(cublasSetStream(ctx.cublas, ctx.stream));
        CUBLAS_CHECK(cublasSscal(ctx.cublas, sharded, &inv_world, grads.get() + layout.replicated, 1));
        if (!Ffn::kLoadsAreGlobal) all_reduce_sum_int(balance.counts(), balance.size(), comm, ctx.stream);
    }

    // Clip by the global norm (replicated gradients once, shards summed over the ranks) and the
    // aux-free bias update from the accumulated counts on the main stream, then AdamW (step is 0-based)
    // on the optimizer's stream, block by block, each block's cleared gradients zeroed after its update.
    // Returns the step's loss (over the ranks after sync_gradients) and the gradient norm before
    // clipping, read back in one copy, which waits for the main stream but not for AdamW: the host goes
    // on to the next step while the update runs.
    StepResult optimizer_step(double lr, int step) {
        const Config& c = cfg;
        cudaStream_t st = ctx.stream;
        {
            ProfileScope timed(ctx.profile, Section::Optimizer);  // closed before the wait below, so it has completed
            global_norm_squared(clip_.get(), grads.get(), layout.replicated, norm_scratch_.get(), st);
            global_norm_squared(clip_.get() + 1, grads.get() + layout.replicated, layout.total - layout.replicated,
                                norm_scratch_.get(), st);
            all_reduce_sum(clip_.get() + 1, 1, comm, st);
            clip_scale(clip_.get() + 2, loss_norm_.get() + 1, clip_.get(), c.grad_clip, st, 2);
            balance.update(c.bias_rate, st);
        }
        CUDA_CHECK(cudaEventRecord(clip_ready_, st));
        CUDA_CHECK(cudaStreamWaitEvent(optimizer_stream_, clip_ready_));
        const ref::AdamW hp;
        const float bc1 = float(1 - std::pow(hp.beta1, step + 1)), bc2 = float(1 - std::pow(hp.beta2, step + 1));
        for (int j = 0; j < c.L + 2; j++) {
            for (const auto& [offset, count] : updated_runs_[j])
                adamw_update(master.get(), params.get(), m.get(), v.get(), grads.get(), offset, offset + count,
                             (float)lr, (float)hp.beta1, (float)hp.beta2, (float)hp.eps, decay.segments(), bc1, bc2,
                             clip_.get() + 2, optimizer_stream_);
            clear_gradients(cleared_grads_[j], optimizer_stream_);
            CUDA_CHECK(cudaEventRecord(updated_[j], optimizer_stream_));
        }
        grads_cleared_ = true;
        float loss_norm[2];
        CUDA_CHECK(cudaMemcpyAsync(loss_norm, loss_norm_.get(), sizeof loss_norm, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaStreamSynchronize(st));
        return {loss_norm[0], loss_norm[1]};
    }

    // The last forward's mean loss averaged over the ranks, on the host (this synchronises).
    float mean_loss_global() {
        all_reduce_average(mean_loss_.get(), 1, comm, ctx.stream);
        float loss;
        CUDA_CHECK(cudaMemcpyAsync(&loss, mean_loss_.get(), sizeof(float), cudaMemcpyDeviceToHost, ctx.stream));
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        return loss;
    }
    int64_t take_bytes_sent() { return ffn_.take_bytes_sent(ctx.stream); }

    // Host copies for checkpoints and logs (these synchronise).
    TrainingState state(int step) const {
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        CUDA_CHECK(cudaStreamSynchronize(optimizer_stream_));
        return {step, master.download(), m.download(), v.download(), balance.download_bias()};
    }
    void load_state(const TrainingState& s) {
        CUDA_CHECK(cudaStreamSynchronize(optimizer_stream_));  // an update in flight would overwrite the state
        master.upload(s.params); m.upload(s.m); v.upload(s.v); balance.upload_bias(s.routing_bias);
        copy_master_to_param(params.get(), master.get(), layout.total, ctx.stream);
    }
    std::vector<int64_t> take_expert_counts() { return balance.take_counts(ctx.stream); }
    // LocMoE's losses and drops since the last call, over the ranks; zero for the other routers.
    RouterStats take_router_stats() { return ffn_.take_router_stats(comm, ctx.stream); }

    const Ffn& ffn() const { return ffn_; }
    // The stream AdamW runs on (test_gpu_model holds it back to check that the next step waits for it).
    cudaStream_t optimizer_stream() const { return optimizer_stream_; }

    // ---- The interface the training loop (train/loop.h) drives, shared with train/cpu_model.h ----
    static constexpr bool kOnGpu = true;  // it reports MFU, bytes sent and the time breakdown

    void print_banner(const DataLoader&, double tokens_per_step) const {
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
        std::printf("%d x GPU %s: %lld parameters on rank 0, %.0f tokens per step, %.3g FLOPs per token; train %s, "
                    "val %s\n", comm.world, prop.name, (long long)layout.total, tokens_per_step,
                    flops_per_token<Ffn>(cfg), cfg.train_data.c_str(), cfg.val_data.c_str());
    }
    int64_t num_params() const { return layout.total; }
    int64_t num_routing_biases() const { return (int64_t)balance.size(); }
    // What the model and its first step took from the device against train/gpu_memory.cuh's estimate,
    // which counts cudaMalloc's rounding, cuBLAS and NCCL as a fixed allowance and so should be larger.
    void print_memory_use() const {
        const double used = (free_before_model_ - device_free_bytes()) / kGiB;
        std::printf("memory (GPU): %.2f GiB taken by the model and its first step (estimated %.2f GiB)\n", used,
                    gpu_memory_estimate(cfg, comm.world).total() / kGiB);
    }

    // One micro-batch of a training step, its loss scaled for the accumulation. Its mean loss, divided
    // by grad_accum, is added to the step's loss on the device (in float, in micro-batch order), so
    // nothing here waits for the device.
    void train_micro_batch(const int32_t* tokens, const int32_t* targets) {
        forward(tokens, targets, 1.f / cfg.grad_accum);
        backward();
        add_micro_batch_loss(loss_norm_.get(), mean_loss_.get(), cfg.grad_accum, ctx.stream);
    }
    // Forward only. Its timed sections are dropped: evaluation is not part of any step's breakdown.
    float eval_micro_batch(const int32_t* tokens, const int32_t* targets) {
        forward(tokens, targets, 0.f);
        const float loss = mean_loss_global();
        profile_->take();
        return loss;
    }

    // For text generation (train/sample.h): a forward of the whole micro-batch with `row` as its
    // first sequence and token 0 elsewhere (the kernels are built for B·T tokens; a sequence's logits
    // do not depend on the others'), then the V logits of that sequence at `pos`. Its timed sections
    // are dropped, as evaluation's are.
    std::vector<float> logits_at(const std::vector<int32_t>& row, int pos) {
        std::vector<int32_t> tokens(N, 0), targets(N, 0);  // the loss is not used
        std::copy(row.begin(), row.end(), tokens.begin());
        forward(tokens.data(), targets.data(), 0.f);
        std::vector<floatX> at(cfg.V);
        CUDA_CHECK(cudaMemcpyAsync(at.data(), logits_.get() + (size_t)pos * cfg.Vp(), cfg.V * sizeof(floatX),
                                   cudaMemcpyDeviceToHost, ctx.stream));
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        profile_->take();
        std::vector<float> logits(cfg.V);
        std::transform(at.begin(), at.end(), logits.begin(), [](floatX x) { return to_float(x); });
        return logits;
    }
    int from_lead(int value) const {
        if (!comm.single()) MPI_CHECK(MPI_Bcast(&value, 1, MPI_INT, 0, MPI_COMM_WORLD));
        return value;
    }

    // The least and the greatest `here` over all ranks, in one all-reduce: whether the ranks agree
    // (the step each resumed), and on what (the signal that stops them).
    std::pair<int, int> min_max_over_ranks(int here) const {
        int v[2] = {-here, here};
        if (!comm.single()) MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
        return {-v[0], v[1]};
    }

    // Model FLOPs utilisation per GPU against the H100's dense bf16 peak, for `tokens_per_second`
    // over all ranks.
    double mfu_percent(double tokens_per_second) const {
        return 100 * tokens_per_second * flops_per_token<Ffn>(cfg) / kPeakBf16Flops / comm.world;
    }
    // What SPEC §3 predicts this rank sends per optimizer step, to print next to take_bytes_sent().
    double predicted_bytes_per_step() const {
        return cfg.L * cfg.grad_accum * Ffn::predicted_bytes_per_layer(cfg, N, comm.world);
    }
    // Milliseconds per section since the last call (the stream must have been synchronised).
    StepTimes take_step_times() {
        const std::vector<double> t = profile_->take();
        return {t[(int)Section::Attention], t[(int)Section::Ffn], t[(int)Section::AllToAll], t[(int)Section::AllReduce],
                t[(int)Section::Optimizer]};
    }

  private:
    // The main stream waits until AdamW has updated forward block j (a no-op before the first step).
    void wait_for_update(int j) { CUDA_CHECK(cudaStreamWaitEvent(ctx.stream, updated_[j])); }
    void clear_gradients(const Runs& runs, cudaStream_t stream) {
        for (const auto& [offset, count] : runs)
            CUDA_CHECK(cudaMemsetAsync(grads.get() + offset, 0, count * sizeof(float), stream));
    }

    std::unique_ptr<StepProfile> profile_;
    // Per forward block: the runs AdamW updates (all of the block), and the gradients cleared after
    // the update (all but the expert weights', which a step's first backward writes whole:
    // TensorSpec::gradient_written, Ctx::accumulate_expert_grads).
    const std::vector<Runs> updated_runs_ = runs_by_block(layout, cfg.L, [](const TensorSpec&) { return true; });
    const std::vector<Runs> cleared_grads_ =
        runs_by_block(layout, cfg.L, [](const TensorSpec& t) { return !t.gradient_written; });
    // the replicated gradients of each forward block, averaged over the ranks during the backward
    GradientBuckets buckets_{comm, runs_by_block(layout, cfg.L, [](const TensorSpec& t) { return !t.expert; })};
    int micro_batches_ = 0;             // backwards since zero_grad
    bool reduced_in_backward_ = false;  // the last backward sent the buckets
    cudaStream_t optimizer_stream_ = nullptr;
    cudaEvent_t clip_ready_ = nullptr;                                // the clip scale AdamW reads
    std::vector<cudaEvent_t> updated_ = std::vector<cudaEvent_t>(cfg.L + 2);  // per forward block
    // The gradients zero_grad clears are zero, or will be once queued work runs. Only this class's own
    // writes are tracked: a caller that writes `grads` itself (a test's poison) does so before zero_grad.
    bool grads_cleared_ = false;
    Ffn ffn_;
    DeviceBuffer<int> tokens_, targets_;
    // Two pinned staging buffers (inputs then targets), used in turn, each with an event recorded after
    // its copies to the device: forward() waits on a buffer's event before refilling it.
    int* host_tokens_[2] = {};
    cudaEvent_t staged_[2] = {};
    int next_staging_ = 0;
    DeviceBuffer<floatX> resid_, resid_mid_, xn1_, xn2_, qkv_, atty_, xf_, logits_;  // per layer where needed
    DeviceBuffer<float> rstd1_, rstd2_, lse_, rstdf_, losses_, mean_loss_;
    DeviceBuffer<floatX> branch_, dresid_, dxn_, dqkv_, datty_;  // one micro-batch's worth, reused per layer
    DeviceBuffer<unsigned char> attention_scratch_, embedding_scratch_;
    DeviceBuffer<float> norm_scratch_, clip_;
    DeviceBuffer<float> loss_norm_;  // (2): the step's loss and gradient norm, side by side for one read-back

    floatX* resid(int l) { return resid_.get() + (size_t)l * N * cfg.d; }
    floatX* resid_mid(int l) { return resid_mid_.get() + (size_t)l * N * cfg.d; }
    floatX* xn1(int l) { return xn1_.get() + (size_t)l * N * cfg.d; }
    floatX* xn2(int l) { return xn2_.get() + (size_t)l * N * cfg.d; }
    float* rstd1(int l) { return rstd1_.get() + (size_t)l * N; }
    float* rstd2(int l) { return rstd2_.get() + (size_t)l * N; }
    floatX* qkv(int l) { return qkv_.get() + (size_t)l * N * 3 * cfg.n_head * cfg.d_attn(); }
    float* lse(int l) { return lse_.get() + (size_t)l * cfg.B * cfg.n_head * cfg.T; }
    floatX* atty(int l) { return atty_.get() + (size_t)l * N * cfg.n_head * cfg.d_attn(); }
};

}  // namespace lmoe
