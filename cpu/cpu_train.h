// Training on the CPU reference (float), like llm.c's train_gpt2.c: the path a machine without a GPU
// runs, on the tiny preset by default. Same data, optimizer, schedule and bias update as the GPU
// trainers, so its loss curve is what theirs should look like. Host-only.
#pragma once
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "train/checkpoint.h"
#include "model/config.h"
#include "io/dataloader.h"
#include "train/log.h"
#include "cpu/reference.h"
#include "train/schedule.h"

namespace lmoe {

// Mean loss of the reference model over `batches` micro-batches of the validation split.
inline double cpu_validation_loss(ref::Model<float>& model, DataLoader& val, int batches) {
    const Config& c = model.cfg;
    std::vector<int32_t> x(c.B * c.T), y(c.B * c.T);
    val.reset();
    double sum = 0;
    for (int i = 0; i < batches; i++) {
        val.next_batch(x.data(), y.data());
        sum += model.forward(x.data(), y.data(), c.B);
    }
    return sum / batches;
}

// One AdamW step over every tensor (weight decay on matrices only), then the aux-free bias update
// per (layer, head) from the step's routed-slot counts.
inline void cpu_optimizer_step(ref::Model<float>& model, std::vector<float>& m, std::vector<float>& v,
                               const std::vector<int64_t>& counts, double lr, int step) {
    const Config& c = model.cfg;
    for (const TensorSpec& t : model.layout.tensors)
        ref::adamw_update(model.params.data() + t.offset, m.data() + t.offset, v.data() + t.offset,
                          model.grads.data() + t.offset, t.numel, lr, t.decay ? c.weight_decay : 0.0, step + 1);
    for (int group = 0; group < c.L * c.H; group++)
        ref::update_routing_bias(model.routing_bias.data() + (size_t)group * c.E, counts.data() + (size_t)group * c.E,
                                 c.E, c.bias_rate);
}

// Saves weights, moments, biases and the step to c.checkpoint (creating its folder).
inline void save_cpu_checkpoint(const Config& c, const ref::Model<float>& model, const std::vector<float>& m,
                                const std::vector<float>& v, int steps_done) {
    std::filesystem::path dir = std::filesystem::path(c.checkpoint).parent_path();
    if (!dir.empty()) std::filesystem::create_directories(dir);
    save_checkpoint(c.checkpoint, c, {steps_done, model.params, m, v, model.routing_bias});
    std::printf("saved checkpoint %s (step %d)\n", c.checkpoint.c_str(), steps_done);
}

inline int train_on_cpu(const Config& c) {
    DataLoader train(c.train_data, c.B, c.T, 0, 1, c.V), val(c.val_data, c.B, c.T, 0, 1, c.V);
    const double baseline = unigram_entropy_nats(read_shard(train.files()[0], c.V), c.V);
    const int eval_batches = (int)std::min<int64_t>(c.eval_batches, val.batches_in_current_shard());
    ref::Model<float> model(c);
    std::vector<float> m(model.layout.total, 0.f), v(model.layout.total, 0.f);
    std::vector<int32_t> x(c.B * c.T), y(c.B * c.T);
    int first_step = 0;
    if (!c.resume.empty()) {  // continue exactly: weights, moments, biases, and the data position
        TrainingState s = load_checkpoint(c.resume, c, model.layout.total, (int64_t)model.routing_bias.size());
        model.params = s.params;
        m = s.m;
        v = s.v;
        model.routing_bias = s.routing_bias;
        first_step = s.step;
        for (int64_t i = 0; i < (int64_t)first_step * c.grad_accum; i++) train.next_batch(x.data(), y.data());
        std::printf("resumed from %s at step %d\n", c.resume.c_str(), first_step);
    }
    std::printf("CPU reference: %lld parameters, %d tokens per step; train %s (%lld tokens), val %s\n",
                (long long)model.layout.total, c.B * c.T * c.grad_accum, c.train_data.c_str(),
                (long long)train.tokens_per_epoch(), c.val_data.c_str());
    std::printf("unigram baseline (entropy of the train shard's token frequencies): %.4f nats\n", baseline);

    StepLog log(c.log_file, first_step > 0);
    install_stop_handler();
    double first_loss = 0, last_loss = 0, last_val = NAN;
    std::vector<double> step_ms;
    int step = first_step;
    for (; step < c.steps && !stop_requested; step++) {
        Timer timer;
        model.zero_grad();
        std::vector<int64_t> counts((size_t)c.L * c.H * c.E, 0);
        double loss = 0;
        for (int micro = 0; micro < c.grad_accum; micro++) {
            train.next_batch(x.data(), y.data());
            loss += model.forward(x.data(), y.data(), c.B) / c.grad_accum;
            model.backward(1.0f / c.grad_accum);
            model.add_expert_counts(counts);
        }
        double norm = ref::clip_grad_norm(model.grads.data(), model.layout.total, c.grad_clip);
        if (!std::isfinite(loss) || !std::isfinite(norm))  // diverged: stop rather than train on garbage
            throw std::runtime_error("step " + std::to_string(step + 1) + ": loss " + std::to_string(loss) +
                                     ", gradient norm " + std::to_string(norm) +
                                     " is not finite (learning rate too high?); the checkpoint was not overwritten");
        double lr = lr_at(step, c.steps, c.lr, c.warmup, c.lr_floor);
        cpu_optimizer_step(model, m, v, counts, lr, step);
        double ms = timer.ms();
        if (step == first_step) first_loss = loss;
        last_loss = loss;
        step_ms.push_back(ms);
        bool last = step == c.steps - 1;
        if (step % c.log_every == 0 || last) {
            std::printf("step %5d/%d | loss %.6f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s\n", step + 1, c.steps,
                        loss, lr, norm, ms, c.B * c.T * c.grad_accum / (ms / 1000));
            print_loads(counts, c.L, c.H, c.E);
        }
        if ((c.eval_every > 0 && (step + 1) % c.eval_every == 0) || last) {
            last_val = cpu_validation_loss(model, val, eval_batches);
            std::printf("step %5d | val loss %.4f (unigram baseline %.4f)\n", step + 1, last_val, baseline);
        }
        log.row(step + 1, loss, norm, last ? last_val : NAN, ms);
        if (c.checkpoint_every > 0 && (step + 1) % c.checkpoint_every == 0 && !last)
            save_cpu_checkpoint(c, model, m, v, step + 1);
        std::fflush(stdout);
    }
    save_cpu_checkpoint(c, model, m, v, step);
    if (stop_requested) {
        std::printf("interrupted after step %d: resume with --resume %s\n", step, c.checkpoint.c_str());
        return 130;
    }
    std::sort(step_ms.begin(), step_ms.end());
    const double median_ms = step_ms.empty() ? NAN : step_ms[step_ms.size() / 2];
    std::printf("done: train loss %.4f -> %.4f, val loss %.4f (unigram baseline %.4f: %s); median step %.2f ms, "
                "%.0f tok/s\n",
                first_loss, last_loss, last_val, baseline, last_val < baseline ? "below" : "NOT below", median_ms,
                c.B * c.T * c.grad_accum / (median_ms / 1000));
    return 0;
}

}  // namespace lmoe
