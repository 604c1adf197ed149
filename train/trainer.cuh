// The skeleton both trainers share: the dense model on the GPU (embedding, attention blocks, norms,
// LM head and loss), one training step, the loop with evaluation, logging and checkpoints, and the
// choice between the GPU and the CPU reference. Each trainer supplies only its FFN layer, a class
// with this shape (see train_latentmoe.cu):
//
//   struct Ffn {
//       static constexpr FfnKind kind;
//       static constexpr bool kHasGpuPath;             // false: the trainer runs the CPU reference only
//       static const char* summary();                  // for --help
//       static void check_supported(const Config&);    // throws ConfigError for shapes the kernels lack
//       static double forward_macs_per_token(const Config&);  // for the FLOP count
//       static int local_heads(const Config&, int world);     // routing groups (heads) on this rank
//       static constexpr bool kLoadsAreGlobal;         // false: sum the expert loads over the ranks
//       static double predicted_bytes_per_layer(const Config&, int N, int world);  // SPEC §3, per step
//       Ffn(const Config&, int N, int world);          // N tokens per micro-batch; allocates activations
//       void forward(int l, floatX* out, const floatX* x, const Layer& w, const float* bias, Ctx&);
//       void backward(int l, floatX* dx, const floatX* dout, const floatX* x, const Layer& w, const GradLayer& g,
//                     Ctx&);                         // dx written; weight gradients accumulated
//       void add_expert_counts(int l, int* counts, Ctx&);  // (heads here, E) routed slots of layer l's last forward
//       int64_t take_bytes_sent();                     // bytes sent to other ranks since the last call
//   };
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "dense/adamw.cuh"
#include "dense/attention.cuh"
#include "train/checkpoint.h"
#include "parallel/comm.cuh"
#include "model/config.h"
#include "cpu/cpu_train.h"
#include "dense/cross_entropy.cuh"
#include "util/cuda_utils.cuh"
#include "io/dataloader.h"
#include "dense/embedding.cuh"
#include "dense/global_norm.cuh"
#include "moe/router.cuh"
#include "train/log.h"
#include "dense/matmul.cuh"
#include "model/params.h"
#include "dense/rmsnorm.cuh"
#include "dense/rope.cuh"
#include "train/schedule.h"
#include "util/step_profile.cuh"

namespace lmoe {

// What every layer's kernels run with.
struct Ctx {
    cublasHandle_t cublas;
    cudaStream_t stream;
    const Comm* comm;
    StepProfile* profile = nullptr;  // null: no timing
};

using Layer = ModelTensors<floatX>::Layer;
using GradLayer = ModelTensors<float>::Layer;

// Number of usable CUDA devices; 0 when there is no GPU or no working driver.
inline int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no device / no driver" error
        return 0;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------
// The model on one GPU: fp32 master weights, their floatX working copy, fp32 gradients and AdamW
// moments, all in flat buffers laid out by build_param_layout; the activations of one micro-batch.

template <class Ffn>
class GpuModel {
  public:
    const Config cfg;
    const Comm comm;
    const int N;       // tokens per micro-batch on this rank
    const int heads;   // routing groups on this rank (LatentMoE: H / R; MoE: 1)
    const ParamLayout layout;
    Ctx ctx;
    DeviceBuffer<float> master, grads, m, v;
    DeviceBuffer<floatX> params;
    DeviceBuffer<float> routing_bias;  // (L, heads, E): steers selection only
    DeviceBuffer<int> expert_counts;   // (L, heads, E): routed slots since the last optimizer step
    ModelTensors<floatX> w;
    ModelTensors<float> g;

    GpuModel(const Config& c, const Comm& comm_)
        : cfg(c), comm(comm_), N(c.B * c.T), heads(Ffn::local_heads(c, comm_.world)),
          layout(build_param_layout(c, comm_.rank, comm_.world)), ffn_(c, c.B * c.T, comm_.world) {
        CUDA_CHECK(cudaStreamCreate(&ctx.stream));
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
        routing_bias.resize((size_t)c.L * heads * c.E);
        expert_counts.resize(routing_bias.size());
        CUDA_CHECK(cudaMemsetAsync(routing_bias.get(), 0, routing_bias.size() * sizeof(float), ctx.stream));
        CUDA_CHECK(cudaMemsetAsync(expert_counts.get(), 0, expert_counts.size() * sizeof(int), ctx.stream));
        w = bind_tensors(layout, params.get(), c.L, c.ffn);
        g = bind_tensors(layout, grads.get(), c.L, c.ffn);

        tokens_.resize(N); targets_.resize(N);
        CUDA_CHECK(cudaMallocHost(&host_tokens_, 2 * N * sizeof(int)));
        resid_.resize((size_t)(c.L + 1) * N * d);
        resid_mid_.resize((size_t)c.L * N * d);
        xn1_.resize((size_t)c.L * N * d); xn2_.resize((size_t)c.L * N * d);
        rstd1_.resize((size_t)c.L * N); rstd2_.resize((size_t)c.L * N);
        qkv_.resize((size_t)N * 3 * C); qkvr_.resize((size_t)c.L * N * 3 * C);
        probs_.resize((size_t)c.L * c.B * c.n_head * c.T * c.T);
        atty_.resize((size_t)c.L * N * C);
        xf_.resize((size_t)N * d); rstdf_.resize(N);
        logits_.resize((size_t)N * c.Vp()); losses_.resize(N); mean_loss_.resize(1);
        branch_.resize((size_t)N * d); dresid_.resize((size_t)N * d); dxn_.resize((size_t)N * d);
        dqkv_.resize((size_t)N * 3 * C); datty_.resize((size_t)N * C);
        attention_scratch_.resize(attention_scratch_bytes(c.B, c.T, c.n_head, c.d_attn()));
        norm_scratch_.resize(std::max(rmsnorm_backward_scratch_floats(N, c.d), global_norm_scratch_size()));
        embedding_scratch_.resize(embedding_backward_scratch_bytes(N, c.Vp()));
        clip_.resize(4);  // norm² of the replicated and of the sharded gradients, norm, scale
    }
    ~GpuModel() {
        cudaFreeHost(host_tokens_);
        cublasDestroy(ctx.cublas);
        cudaStreamDestroy(ctx.stream);
    }

    // Forward pass on one micro-batch; returns nothing (the mean loss stays on the device, see
    // mean_loss_device). With `dloss` > 0 the loss kernel also writes d(loss·dloss)/dlogits, ready
    // for backward(); with dloss = 0 (evaluation) it does not.
    void forward(const int32_t* tokens, const int32_t* targets, float dloss) {
        const Config& c = cfg;
        const int d = c.d, C = c.n_head * c.d_attn();
        cudaStream_t st = ctx.stream;
        std::copy(tokens, tokens + N, host_tokens_);
        std::copy(targets, targets + N, host_tokens_ + N);
        CUDA_CHECK(cudaMemcpyAsync(tokens_.get(), host_tokens_, N * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(targets_.get(), host_tokens_ + N, N * sizeof(int), cudaMemcpyHostToDevice, st));

        embedding_forward(resid(0), tokens_.get(), w.wte, N, d, st);                     // x (N, d)
        rmsnorm_forward(xn1(0), rstd1(0), resid(0), w.layers[0].ln1, N, d, st);
        for (int l = 0; l < c.L; l++) {
            const Layer& wl = w.layers[l];
            {
                ProfileScope timed(ctx.profile, Section::Attention);
                matmul_forward(ctx.cublas, qkv_.get(), xn1(l), wl.qkv, N, d, 3 * C, st);    // (N, 3C)
                rope_forward(qkv_.get(), c.B, c.T, c.n_head, c.d_attn(), st);
                attention_forward(ctx.cublas, atty(l), probs(l), qkvr(l), attention_scratch_.get(), qkv_.get(), c.B,
                                  c.T, c.n_head, c.d_attn(), st);  // (N, C); keeps q, k, v per head in qkvr
                matmul_forward(ctx.cublas, branch_.get(), atty(l), wl.attn_out, N, C, d, st);  // (N, d)
            }
            residual_rmsnorm_forward(resid_mid(l), xn2(l), rstd2(l), resid(l), branch_.get(), wl.ln2, N, d, st);
            {
                ProfileScope timed(ctx.profile, Section::Ffn);
                ffn_.forward(l, branch_.get(), xn2(l), wl, bias(l), ctx);                     // (N, d)
            }
            const bool last = l == c.L - 1;
            residual_rmsnorm_forward(resid(l + 1), last ? xf_.get() : xn1(l + 1), last ? rstdf_.get() : rstd1(l + 1),
                                     resid_mid(l), branch_.get(), last ? w.lnf : w.layers[l + 1].ln1, N, d, st);
        }
        matmul_forward(ctx.cublas, logits_.get(), xf_.get(), w.lm_head, N, d, c.Vp(), st);  // (N, Vp)
        cross_entropy_forward_backward(logits_.get(), losses_.get(), targets_.get(), N, c.V, c.Vp(), dloss,
                                       dloss > 0, st);
        mean_loss(mean_loss_.get(), losses_.get(), N, st);
    }
    const float* mean_loss_device() const { return mean_loss_.get(); }

    // Backward of the last forward (which must have had dloss > 0); accumulates into grads and
    // adds the micro-batch's routed slots to expert_counts.
    void backward() {
        const Config& c = cfg;
        const int d = c.d, C = c.n_head * c.d_attn();
        cudaStream_t st = ctx.stream;
        CUDA_CHECK(cudaMemsetAsync(dresid_.get(), 0, (size_t)N * d * sizeof(floatX), st));
        matmul_backward(ctx.cublas, dxn_.get(), g.lm_head, logits_.get(), xf_.get(), w.lm_head, N, d, c.Vp(), false, st);
        rmsnorm_backward(dresid_.get(), g.lnf, dxn_.get(), resid(c.L), w.lnf, rstdf_.get(), N, d, norm_scratch_.get(), st);
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
                attention_backward(ctx.cublas, dqkv_.get(), datty_.get(), qkvr(l), probs(l), attention_scratch_.get(),
                                   c.B, c.T, c.n_head, c.d_attn(), st);
                rope_backward(dqkv_.get(), c.B, c.T, c.n_head, c.d_attn(), st);
                matmul_backward(ctx.cublas, dxn_.get(), gl.qkv, dqkv_.get(), xn1(l), wl.qkv, N, d, 3 * C, false, st);
            }
            rmsnorm_backward(dresid_.get(), gl.ln1, dxn_.get(), resid(l), wl.ln1, rstd1(l), N, d, norm_scratch_.get(), st);
            ffn_.add_expert_counts(l, expert_counts.get() + (size_t)l * heads * c.E, ctx);
        }
        embedding_backward(g.wte, dresid_.get(), tokens_.get(), N, d, c.Vp(), embedding_scratch_.get(), st);
    }

    void zero_grad() { CUDA_CHECK(cudaMemsetAsync(grads.get(), 0, grads.size() * sizeof(float), ctx.stream)); }

    // Data parallel: average the replicated gradients over the ranks (one all-reduce: they are laid
    // out first); the sharded expert gradients already hold every rank's tokens, each rank's loss
    // being its own mean, so they are divided by R to be gradients of the global mean.
    void sync_gradients() {
        if (comm.single()) return;
        ProfileScope timed(ctx.profile, Section::AllReduce);
        all_reduce_average(grads.get(), layout.replicated, comm, ctx.stream);
        const int sharded = (int)(layout.total - layout.replicated);
        const float inv_world = 1.f / comm.world;
        CUBLAS_CHECK(cublasSetStream(ctx.cublas, ctx.stream));
        CUBLAS_CHECK(cublasSscal(ctx.cublas, sharded, &inv_world, grads.get() + layout.replicated, 1));
        if (!Ffn::kLoadsAreGlobal) all_reduce_sum_int(expert_counts.get(), expert_counts.size(), comm, ctx.stream);
    }

    // Clip by the global norm (replicated gradients once, shards summed over the ranks), AdamW (step
    // is 0-based), then the aux-free bias update from the accumulated counts. Returns the device
    // address of the gradient norm before clipping.
    const float* optimizer_step(double lr, int step) {
        const Config& c = cfg;
        cudaStream_t st = ctx.stream;
        ProfileScope timed(ctx.profile, Section::Optimizer);
        global_norm_squared(clip_.get(), grads.get(), layout.replicated, norm_scratch_.get(), st);
        global_norm_squared(clip_.get() + 1, grads.get() + layout.replicated, layout.total - layout.replicated,
                            norm_scratch_.get(), st);
        all_reduce_sum(clip_.get() + 1, 1, comm, st);
        clip_scale(clip_.get() + 3, clip_.get() + 2, clip_.get(), c.grad_clip, st, 2);
        const ref::AdamW hp;
        const float bc1 = float(1 - std::pow(hp.beta1, step + 1)), bc2 = float(1 - std::pow(hp.beta2, step + 1));
        for (const TensorSpec& t : layout.tensors)
            adamw_update(master.get() + t.offset, params.get() + t.offset, m.get() + t.offset, v.get() + t.offset,
                         grads.get() + t.offset, t.numel, (float)lr, (float)hp.beta1, (float)hp.beta2, (float)hp.eps,
                         t.decay ? c.weight_decay : 0.f, bc1, bc2, clip_.get() + 3, st);
        update_routing_bias(routing_bias.get(), expert_counts.get(), c.L * heads, c.E, c.bias_rate, st);
        return clip_.get() + 2;
    }

    // The micro-batch's mean loss averaged over the ranks, on the host (this synchronises).
    float mean_loss_global() {
        all_reduce_average(mean_loss_.get(), 1, comm, ctx.stream);
        float loss;
        CUDA_CHECK(cudaMemcpyAsync(&loss, mean_loss_.get(), sizeof(float), cudaMemcpyDeviceToHost, ctx.stream));
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        return loss;
    }
    int64_t take_bytes_sent() { return ffn_.take_bytes_sent(); }
    // Milliseconds per Section since the last call (after a synchronisation).
    std::vector<double> take_profile() { return profile_->take(); }

    // Host copies for checkpoints and logs (these synchronise).
    TrainingState state(int step) const {
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        return {step, master.download(), m.download(), v.download(), routing_bias.download()};
    }
    void load_state(const TrainingState& s) {
        master.upload(s.params); m.upload(s.m); v.upload(s.v); routing_bias.upload(s.routing_bias);
        copy_master_to_param(params.get(), master.get(), layout.total, ctx.stream);
    }
    std::vector<int64_t> take_expert_counts() {
        std::vector<int> c = expert_counts.download();
        CUDA_CHECK(cudaMemsetAsync(expert_counts.get(), 0, expert_counts.size() * sizeof(int), ctx.stream));
        return std::vector<int64_t>(c.begin(), c.end());
    }

    const Ffn& ffn() const { return ffn_; }

  private:
    std::unique_ptr<StepProfile> profile_;
    Ffn ffn_;
    DeviceBuffer<int> tokens_, targets_;
    int* host_tokens_ = nullptr;  // pinned: inputs then targets
    DeviceBuffer<floatX> resid_, resid_mid_, xn1_, xn2_, qkvr_, probs_, atty_, xf_, logits_;  // per layer where needed
    DeviceBuffer<float> rstd1_, rstd2_, rstdf_, losses_, mean_loss_;
    DeviceBuffer<floatX> qkv_, branch_, dresid_, dxn_, dqkv_, datty_;  // one micro-batch's worth, reused per layer
    DeviceBuffer<unsigned char> attention_scratch_, embedding_scratch_;
    DeviceBuffer<float> norm_scratch_, clip_;

    const float* bias(int l) const { return routing_bias.get() + (size_t)l * heads * cfg.E; }
    floatX* resid(int l) { return resid_.get() + (size_t)l * N * cfg.d; }
    floatX* resid_mid(int l) { return resid_mid_.get() + (size_t)l * N * cfg.d; }
    floatX* xn1(int l) { return xn1_.get() + (size_t)l * N * cfg.d; }
    floatX* xn2(int l) { return xn2_.get() + (size_t)l * N * cfg.d; }
    float* rstd1(int l) { return rstd1_.get() + (size_t)l * N; }
    float* rstd2(int l) { return rstd2_.get() + (size_t)l * N; }
    floatX* qkvr(int l) { return qkvr_.get() + (size_t)l * N * 3 * cfg.n_head * cfg.d_attn(); }
    floatX* probs(int l) { return probs_.get() + (size_t)l * cfg.B * cfg.n_head * cfg.T * cfg.T; }
    floatX* atty(int l) { return atty_.get() + (size_t)l * N * cfg.n_head * cfg.d_attn(); }
};

// ---------------------------------------------------------------------------------------------
// FLOPs, counted the usual way (2 per multiply-add, backward twice the forward: 6 per MAC per
// token), for the model's own arithmetic only: the expert recomputation of the IO-aware kernels
// is not counted. Attention counts the full T×T products, as llm.c does.
template <class Ffn>
double flops_per_token(const Config& c) {
    const double C = c.n_head * c.d_attn();
    const double dense = c.L * (3.0 * c.d * C + C * c.d + 2.0 * c.T * C) + (double)c.d * c.V;
    return 6.0 * (dense + c.L * Ffn::forward_macs_per_token(c));
}
constexpr double kPeakBf16Flops = 989.4e12;  // H100 SXM dense bf16, the MFU denominator

// ---------------------------------------------------------------------------------------------
// The training loop on the GPU.

template <class Ffn>
double gpu_validation_loss(GpuModel<Ffn>& model, DataLoader& val, int batches) {
    std::vector<int32_t> x(model.N), y(model.N);
    val.reset();
    double sum = 0;
    for (int i = 0; i < batches; i++) {
        val.next_batch(x.data(), y.data());
        model.forward(x.data(), y.data(), 0.f);
        sum += model.mean_loss_global();
    }
    model.take_profile();  // evaluation is not part of any step's breakdown
    return sum / batches;
}

// Rank r of R > 1 keeps its own checkpoint file (its expert shard), PATH.rank<r>.
inline std::string rank_path(const std::string& path, const Comm& comm) {
    return comm.single() ? path : path + ".rank" + std::to_string(comm.rank);
}

template <class Ffn>
int train_on_gpu(const Config& c, const Comm& comm) {
    const bool lead = comm.rank == 0;  // rank 0 prints and writes the log
    DataLoader train(c.train_data, c.B, c.T, comm.rank, comm.world, c.V),
        val(c.val_data, c.B, c.T, comm.rank, comm.world, c.V);
    const double baseline = unigram_entropy_nats(read_shard(train.files()[0], c.V), c.V);
    const int eval_batches = (int)std::min<int64_t>(c.eval_batches, val.batches_in_current_shard());
    GpuModel<Ffn> model(c, comm);
    std::vector<int32_t> x(model.N), y(model.N);
    int first_step = 0;
    if (!c.resume.empty()) {
        TrainingState s = load_checkpoint(rank_path(c.resume, comm), c, model.layout.total, (int64_t)model.routing_bias.size());
        model.load_state(s);
        first_step = s.step;
        for (int64_t i = 0; i < (int64_t)first_step * c.grad_accum; i++) train.next_batch(x.data(), y.data());
        if (lead) std::printf("resumed from %s at step %d\n", c.resume.c_str(), first_step);
    }
    const double tokens_per_step = (double)model.N * c.grad_accum * comm.world, flops = flops_per_token<Ffn>(c);
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    if (lead) {
        std::printf("%d x GPU %s: %lld parameters on rank 0, %.0f tokens per step, %.3g FLOPs per token; train %s, "
                    "val %s\n", comm.world, prop.name, (long long)model.layout.total, tokens_per_step, flops,
                    c.train_data.c_str(), c.val_data.c_str());
        std::printf("unigram baseline (entropy of the train shard's token frequencies): %.4f nats\n", baseline);
    }
    StepLog log(lead ? c.log_file : "", first_step > 0);
    auto save = [&](int steps_done) {
        std::filesystem::path dir = std::filesystem::path(c.checkpoint).parent_path();
        if (!dir.empty()) std::filesystem::create_directories(dir);
        save_checkpoint(rank_path(c.checkpoint, comm), c, model.state(steps_done));
        if (lead) std::printf("saved checkpoint %s%s (step %d)\n", c.checkpoint.c_str(), comm.single() ? "" : ".rank*",
                              steps_done);
    };

    install_stop_handler();
    double last_val = NAN, first_loss = NAN, last_loss = NAN;
    std::vector<double> step_ms;
    int step = first_step;
    for (; step < c.steps; step++) {
        // every rank must agree to stop (a signal may reach only some of them)
        int stop = stop_requested;
        if (!comm.single()) MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &stop, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
        if (stop) break;
        cudaStream_t st = model.ctx.stream;
        Timer timer;
        model.zero_grad();
        float loss = 0.f;
        for (int micro = 0; micro < c.grad_accum; micro++) {
            train.next_batch(x.data(), y.data());
            model.forward(x.data(), y.data(), 1.f / c.grad_accum);
            model.backward();
            loss += model.mean_loss_global() / c.grad_accum;
        }
        model.sync_gradients();
        const double lr = lr_at(step, c.steps, c.lr, c.warmup, c.lr_floor);
        const float* norm_device = model.optimizer_step(lr, step);
        float norm;
        CUDA_CHECK(cudaMemcpyAsync(&norm, norm_device, sizeof(float), cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaStreamSynchronize(st));
        const double ms = timer.ms();
        if (!std::isfinite(loss) || !std::isfinite(norm))
            throw std::runtime_error("step " + std::to_string(step + 1) + ": loss " + std::to_string(loss) +
                                     ", gradient norm " + std::to_string(norm) +
                                     " is not finite (learning rate too high?); the checkpoint was not overwritten");
        if (step == first_step) first_loss = loss;
        last_loss = loss;
        if (step > first_step) step_ms.push_back(ms);  // the first step pays for warm-up
        const bool last = step == c.steps - 1;
        const std::vector<int64_t> counts = model.take_expert_counts();
        const int64_t bytes = model.take_bytes_sent();
        const std::vector<double> t = model.take_profile();
        if (lead && (step % c.log_every == 0 || last)) {
            const double tok_s = tokens_per_step / (ms / 1000);
            std::printf("step %5d/%d | loss %.6f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%%", step + 1,
                        c.steps, loss, lr, norm, ms, tok_s, 100 * tok_s * flops / kPeakBf16Flops / comm.world);
            if (!comm.single())
                std::printf(" | sent %.1f MiB (SPEC §3: %.1f)", bytes / 1048576.0,
                            c.L * c.grad_accum * Ffn::predicted_bytes_per_layer(c, model.N, comm.world) / 1048576.0);
            std::printf("\n");
            const double a2a = t[(int)Section::AllToAll], ffn = t[(int)Section::Ffn];
            std::printf("    time (ms): attention %.2f | FFN compute %.2f | all-to-all %.2f | all-reduce %.2f | "
                        "optimizer %.2f | rest %.2f\n", t[(int)Section::Attention], ffn - a2a, a2a,
                        t[(int)Section::AllReduce], t[(int)Section::Optimizer],
                        ms - t[(int)Section::Attention] - ffn - t[(int)Section::AllReduce] - t[(int)Section::Optimizer]);
            print_loads(counts, c.L, model.heads, c.E);
        }
        if ((c.eval_every > 0 && (step + 1) % c.eval_every == 0) || last) {
            last_val = gpu_validation_loss(model, val, eval_batches);
            if (lead) std::printf("step %5d | val loss %.4f (unigram baseline %.4f)\n", step + 1, last_val, baseline);
        }
        log.row(step + 1, loss, norm, last ? last_val : NAN, ms);
        if (c.checkpoint_every > 0 && (step + 1) % c.checkpoint_every == 0 && !last) save(step + 1);
        std::fflush(stdout);
    }
    save(step);
    if (step < c.steps) {
        if (lead) std::printf("interrupted after step %d: resume with --resume %s\n", step, c.checkpoint.c_str());
        return 130;
    }
    std::sort(step_ms.begin(), step_ms.end());
    const double median_ms = step_ms.empty() ? NAN : step_ms[step_ms.size() / 2];
    const double tok_s = tokens_per_step / (median_ms / 1000);
    if (lead)
        std::printf("done: train loss %.4f -> %.4f, val loss %.4f (unigram baseline %.4f: %s); median step %.2f ms, "
                    "%.0f tok/s, MFU %.1f%%\n",
                    first_loss, last_loss, last_val, baseline, last_val < baseline ? "below" : "NOT below", median_ms,
                    tok_s, 100 * tok_s * flops / kPeakBf16Flops / comm.world);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// The layer benchmark (SPEC §6, §9): forward + backward of one FFN layer on B·T random tokens with
// freshly initialised weights, median of 20 after 3 warm-ups; FLOP rate by the model's own count
// (recomputation not counted); memory = what the layer's weights, gradients, activations and
// scratch hold on the device.
template <class Ffn>
int bench_ffn_layer(const Config& config) {
    Config c = config;
    c.L = 1;
    const int N = c.B * c.T, reps = 20;
    size_t free_before, free_after, total;
    CUDA_CHECK(cudaMemGetInfo(&free_before, &total));
    const ParamLayout layout = build_param_layout(c);
    std::vector<float> host(layout.total);
    init_params(host.data(), layout, c.seed);
    DeviceBuffer<float> master(layout.total), grads(layout.total), bias((size_t)c.H * c.E);
    master.upload(host);
    DeviceBuffer<floatX> params(layout.total), x((size_t)N * c.d), dout((size_t)N * c.d), out((size_t)N * c.d),
        dx((size_t)N * c.d);
    const Comm one_rank;
    Ctx ctx;
    CUDA_CHECK(cudaStreamCreate(&ctx.stream));
    ctx.cublas = make_cublas_handle();
    ctx.comm = &one_rank;
    copy_master_to_param(params.get(), master.get(), layout.total, ctx.stream);
    lmoe::Rng rng(c.seed);
    std::vector<floatX> xs((size_t)N * c.d);
    for (auto& v : xs) v = from_float<floatX>((float)rng.normal());
    x.upload(xs);
    for (auto& v : xs) v = from_float<floatX>((float)(0.01 * rng.normal()));
    dout.upload(xs);
    CUDA_CHECK(cudaMemset(bias.get(), 0, bias.size() * sizeof(float)));
    CUDA_CHECK(cudaMemset(grads.get(), 0, grads.size() * sizeof(float)));
    const Layer w = bind_tensors(layout, params.get(), 1, c.ffn).layers[0];
    const GradLayer g = bind_tensors(layout, grads.get(), 1, c.ffn).layers[0];
    Ffn ffn(c, N, 1);
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemGetInfo(&free_after, &total));
    cudaEvent_t start, mid, stop;
    CUDA_CHECK(cudaEventCreate(&start)); CUDA_CHECK(cudaEventCreate(&mid)); CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> fwd, all;
    for (int rep = -3; rep < reps; rep++) {
        CUDA_CHECK(cudaEventRecord(start, ctx.stream));
        ffn.forward(0, out.get(), x.get(), w, bias.get(), ctx);
        CUDA_CHECK(cudaEventRecord(mid, ctx.stream));
        ffn.backward(0, dx.get(), dout.get(), x.get(), w, g, ctx);
        CUDA_CHECK(cudaEventRecord(stop, ctx.stream));
        CUDA_CHECK(cudaEventSynchronize(stop));
        if (rep < 0) continue;
        float a, b;
        CUDA_CHECK(cudaEventElapsedTime(&a, start, mid));
        CUDA_CHECK(cudaEventElapsedTime(&b, start, stop));
        fwd.push_back(a);
        all.push_back(b);
    }
    std::sort(fwd.begin(), fwd.end());
    std::sort(all.begin(), all.end());
    const double flops = 6.0 * N * Ffn::forward_macs_per_token(c), ms = all[reps / 2];
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("layer bench | %s | %s | N %d tokens | forward %.3f ms | forward+backward %.3f ms | %.1f TFLOP/s | "
                "%.2f GiB on the device\n",
                prop.name, ffn_name(c.ffn), N, fwd[reps / 2], ms, flops / (ms * 1e-3) / 1e12,
                (free_before - free_after) / 1073741824.0);
    CUDA_CHECK(cudaEventDestroy(start)); CUDA_CHECK(cudaEventDestroy(mid)); CUDA_CHECK(cudaEventDestroy(stop));
    cublasDestroy(ctx.cublas);
    cudaStreamDestroy(ctx.stream);
    return 0;
}

// ---------------------------------------------------------------------------------------------

// True when a launcher (mpirun, srun) started this process: only then is MPI initialised, so a
// one-GPU or CPU run needs no MPI at all.
inline bool launched_by_mpi() {
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
        if (std::getenv(v)) return true;
    return false;
}

template <class Ffn>
int run_trainer(int argc, char** argv, const Comm& comm) {
    Config c;
    const bool lead = comm.rank == 0;
    const int gpus = cuda_device_count();
    if (!parse_flags(c, Ffn::kind, argc, argv)) {
        if (lead) print_help(argv[0], Ffn::kind, Ffn::summary());
        return 0;
    }
    validate(c, comm.world);
    if (c.device == "gpu" && gpus == 0) throw ConfigError("--device gpu, but no GPU was found");
    if (c.device == "gpu" && !Ffn::kHasGpuPath)
        throw ConfigError("--device gpu: this trainer's CUDA path is not written yet; use --device cpu");
    const bool on_gpu = Ffn::kHasGpuPath && c.device != "cpu" && gpus > 0;
    if (!comm.single() && !on_gpu) throw ConfigError("several ranks need the GPU path (one GPU per rank)");
    if (lead) print_config(c);
    if constexpr (Ffn::kHasGpuPath) {
        if (on_gpu) {
            Ffn::check_supported(c);
            if (c.bench_layer) {
                if (!comm.single()) throw ConfigError("--bench-layer runs on one GPU; start it without mpirun");
                return bench_ffn_layer<Ffn>(c);
            }
            return train_on_gpu<Ffn>(c, comm);
        }
    }
    if (c.bench_layer) throw ConfigError("--bench-layer needs a GPU and a trainer with a CUDA path");
    if (gpus == 0) std::printf("no GPU found: training the CPU reference model (slow; tiny models only)\n");
    else if (c.device == "cpu") std::printf("--device cpu: training the CPU reference model (slow; tiny models only)\n");
    else std::printf("this trainer's CUDA path is not written yet: training the CPU reference model instead\n");
    return train_on_cpu(c);
}

// Flags and configuration errors exit 2, data and I/O errors 1; under mpirun every rank meets the
// same error, and only rank 0 reports it.
template <class Ffn>
int trainer_main(int argc, char** argv) {
    Comm comm;
    int status;
    try {
        if (launched_by_mpi()) comm = comm_init(&argc, &argv);
        status = run_trainer<Ffn>(argc, argv, comm);
    } catch (const ConfigError& e) {
        if (comm.rank == 0) std::fprintf(stderr, "%s: error: %s\n", argv[0], e.what());
        status = 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error%s: %s\n", argv[0],
                     comm.single() ? "" : (" on rank " + std::to_string(comm.rank)).c_str(), e.what());
        status = 1;
    }
    // A failure on one rank could leave the others waiting in a collective for ever: end them all.
    if (status == 1 && !comm.single()) MPI_Abort(MPI_COMM_WORLD, 1);
    if (launched_by_mpi()) comm_finalize(comm);
    return status;
}

}  // namespace lmoe
