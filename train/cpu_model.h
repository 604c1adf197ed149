// The CPU reference model (cpu/reference.h, float) with the AdamW moments and routed-slot counts a
// training run needs, behind the interface the training loop (train/loop.h) and text generation
// (train/sample.h) drive: the path a machine without a GPU takes, like llm.c's train_gpt2.c, on the
// tiny preset by default. Same data, optimizer, schedule and bias update as the GPU model, so its
// loss curve is what the GPU's should look like. One rank; host-only.
#pragma once
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "cpu/reference.h"
#include "io/dataloader.h"
#include "model/config.h"
#include "model/params.h"
#include "moe/router_stats.h"
#include "train/checkpoint.h"
#include "train/step_log.h"

namespace lmoe {

class CpuModel {
  public:
    static constexpr bool kOnGpu = false;

    explicit CpuModel(const Config& c)
        : model_(c), m_(model_.layout.total, 0.f), v_(model_.layout.total, 0.f),
          counts_((size_t)c.L * c.H * c.E, 0) {}

    void print_banner(const DataLoader& train, double tokens_per_step) const {
        const Config& c = model_.cfg;
        std::printf("CPU reference: %lld parameters, %d tokens per step; train %s (%lld tokens), val %s\n",
                    (long long)model_.layout.total, (int)tokens_per_step, c.train_data.c_str(),
                    (long long)train.tokens_per_epoch(), c.val_data.c_str());
    }
    int64_t num_params() const { return model_.layout.total; }
    int64_t num_routing_biases() const { return (int64_t)model_.routing_bias.size(); }

    void zero_grad() {
        model_.zero_grad();
        loss_ = 0;
    }
    void train_micro_batch(const int32_t* tokens, const int32_t* targets) {
        const Config& c = model_.cfg;
        model_.forward(tokens, targets, c.B);
        model_.backward(1.0f / c.grad_accum);
        loss_ += model_.cross_entropy / c.grad_accum;
        model_.add_expert_counts(counts_);
        router_.aux_loss += model_.aux_loss / c.grad_accum;
        router_.loc_loss += model_.loc_loss / c.grad_accum;
        for (int l = 0; l < c.L; l++) router_.dropped[l] += model_.ffn[l].dropped;
    }
    float eval_micro_batch(const int32_t* tokens, const int32_t* targets) {
        model_.forward(tokens, targets, model_.cfg.B);
        return model_.cross_entropy;
    }
    void sync_gradients() {}  // one rank: its gradients are the global batch's

    // Clip by the global norm, one AdamW step over every tensor (weight decay on matrices only), then
    // the aux-free bias update per (layer, head) from the step's routed-slot counts. Returns the
    // step's loss and the norm before clipping.
    StepResult optimizer_step(double lr, int step) {
        const Config& c = model_.cfg;
        const double norm = ref::clip_grad_norm(model_.grads.data(), model_.layout.total, c.grad_clip);
        for (const TensorSpec& t : model_.layout.tensors)
            ref::adamw_update(model_.params.data() + t.offset, m_.data() + t.offset, v_.data() + t.offset,
                              model_.grads.data() + t.offset, t.numel, lr, t.decay ? c.weight_decay : 0.0, step + 1);
        for (int group = 0; group < c.L * c.H; group++)
            ref::update_routing_bias(model_.routing_bias.data() + (size_t)group * c.E,
                                     counts_.data() + (size_t)group * c.E, c.E, c.bias_rate);
        return {loss_, norm};
    }
    std::vector<int64_t> take_expert_counts() {
        return std::exchange(counts_, std::vector<int64_t>(counts_.size(), 0));
    }
    RouterStats take_router_stats() { return std::exchange(router_, fresh_router_stats()); }
    std::pair<int, int> min_max_over_ranks(int here) const { return {here, here}; }  // one rank

    // For text generation (train/sample.h): one sequence of T tokens, batch 1.
    std::vector<float> logits_at(const std::vector<int32_t>& row, int pos) {
        const std::vector<int32_t> targets(row.size(), 0);  // the loss is not used
        model_.forward(row.data(), targets.data(), 1);
        const float* at = model_.logits.data() + (size_t)pos * model_.cfg.Vp();
        return std::vector<float>(at, at + model_.cfg.V);
    }
    int from_lead(int value) const { return value; }  // one rank

    TrainingState state(int steps_done) const {
        return {steps_done, model_.params, m_, v_, model_.routing_bias};
    }
    // Copied into the existing buffers: the model's tensor views point into them.
    void load_state(const TrainingState& s) {
        model_.params = s.params;
        m_ = s.m;
        v_ = s.v;
        model_.routing_bias = s.routing_bias;
    }

  private:
    ref::Model<float> model_;
    std::vector<float> m_, v_;     // AdamW moments, laid out like the parameters
    std::vector<int64_t> counts_;  // (L, H, E) routed slots since the last optimizer step
    double loss_ = 0;              // the step's loss so far: Σ cross-entropy / grad_accum over its micro-batches
    RouterStats router_ = fresh_router_stats();  // since the last optimizer step

    RouterStats fresh_router_stats() const { return {0, 0, std::vector<int64_t>(model_.cfg.L, 0)}; }
};

}  // namespace lmoe
