// The training loop of both trainers, written once for the GPU model (train/gpu_model.cuh) and the
// CPU reference (train/cpu_model.h), so the two paths cannot drift apart: the CPU run's loss curve is
// what the GPU's should look like. The output paths checked, resume, steps with gradient accumulation,
// progress lines, evaluation, text samples (train/sample.h), checkpoints (an emergency one when a step
// fails), signals and the final summary; under mpirun every rank runs it, rank 0 alone prints and
// writes the log. Host-only: the model does all the arithmetic.
//
// A Model, built as Model(config, extra constructor arguments...), provides:
//
//   static constexpr bool kOnGpu;                  // true: it also reports the figures marked GPU below
//   void print_banner(const DataLoader& train, double tokens_per_step) const;  // rank 0's first line
//   int64_t num_params() const;                    // on this rank: what its checkpoint must hold
//   int64_t num_routing_biases() const;
//   void zero_grad();                              // a step begins: its gradients and loss start from zero
//   void train_micro_batch(const int32_t* tokens, const int32_t* targets);  // forward + backward (the loss
//                                                  // scaled by 1/grad_accum); adds its mean cross-entropy
//                                                  // / grad_accum to the step's loss, the GPU on the device
//                                                  // (LocMoE's auxiliary losses: take_router_stats)
//   float eval_micro_batch(const int32_t* tokens, const int32_t* targets);   // forward only; its mean
//                                                  // cross-entropy over all ranks
//   void sync_gradients();                         // data parallel: the gradients and loss of the global batch
//   StepResult optimizer_step(double lr, int step);  // clip, AdamW, bias update; the step's loss (over all
//                                                  // ranks) and the norm before clipping (train/step_log.h),
//                                                  // which the GPU reads back in one copy
//   std::vector<int64_t> take_expert_counts();     // (L, heads here, E) routed slots of the step; resets them
//   RouterStats take_router_stats();               // LocMoE's losses and drops of the step; resets them
//   std::pair<int, int> min_max_over_ranks(int here);  // the least and the greatest `here` of all ranks
//   TrainingState state(int steps_done) const;     // host copies for a checkpoint
//   void load_state(const TrainingState&);
//   and what text generation needs (train/sample.h): logits_at, from_lead
//   GPU: double mfu_percent(double tokens_per_second) const;
//        double predicted_bytes_per_step() const;  // SPEC §3, for this rank
//        int64_t take_bytes_sent();                // since the last call
//        StepTimes take_step_times();              // since the last call
//        void print_memory_use() const;            // the device memory taken, next to the start-up estimate
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "io/dataloader.h"
#include "model/config.h"
#include "train/checkpoint.h"
#include "train/output_paths.h"
#include "train/sample.h"
#include "train/schedule.h"
#include "train/signals.h"
#include "train/step_log.h"
#include "util/timer.h"

namespace lmoe {

// Mean loss over `batches` micro-batches of N tokens from the start of the validation split.
template <class Model>
double validation_loss(Model& model, DataLoader& val, int batches, int N) {
    std::vector<int32_t> x(N), y(N);
    val.reset();
    double sum = 0;
    for (int i = 0; i < batches; i++) {
        val.next_batch(x.data(), y.data());
        sum += model.eval_micro_batch(x.data(), y.data());
    }
    return sum / batches;
}

// A non-finite loss or gradient norm: the weights are garbage, so no emergency checkpoint is saved.
struct Diverged : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Where a failed run saves its last completed step: beside the checkpoint, never over it.
inline std::string emergency_path(const std::string& checkpoint) { return checkpoint + ".emergency"; }

// Checks what the run will write (train/output_paths.h) against what it reads and creates the missing
// folders, before the model takes any memory. Every rank checks every rank's file names, so on one
// file system all ranks reach the same verdict and none is left waiting for the others.
inline void check_run_paths(const Config& c, int world, const DataLoader& train, const DataLoader& val) {
    std::vector<NamedPath> inputs, outputs;
    for (const std::string& f : train.files()) inputs.push_back({"the train shard", f});
    for (const std::string& f : val.files()) {
        for (const std::string& t : train.files())
            if (same_file(f, t))
                throw ConfigError("the val shard " + f + " is also the train shard " + t +
                                  ": a validation loss on training data says nothing; give --val-data held-out data");
        inputs.push_back({"the val shard", f});
    }
    if (c.keeps_checkpoint()) {
        for (int r = 0; r < world; r++) {
            outputs.push_back({"the checkpoint", rank_path(c.checkpoint, r, world)});
            outputs.push_back({"the emergency checkpoint", rank_path(emergency_path(c.checkpoint), r, world)});
        }
    }
    if (!c.log_file.empty()) {
        outputs.push_back({"the log file", c.log_file});
        // saving may replace the checkpoint resumed from, but the log must not
        for (int r = 0; r < world && !c.resume.empty(); r++)
            if (same_file(c.log_file, rank_path(c.resume, r, world)))
                throw ConfigError("the log file " + c.log_file + " is the checkpoint to resume from");
    }
    check_outputs(outputs, inputs);
    for (const NamedPath& out : outputs) make_parent_folder(out);
}

// Loads --resume's checkpoint into `model` (under mpirun each rank its own file, all of one step);
// returns its step. A run that only generates (--steps 0) may have another batch shape.
template <class Model>
int load_resumed(Model& model, const Config& c, int rank, int world) {
    TrainingState s = load_checkpoint(rank_path(c.resume, rank, world), c, model.num_params(),
                                      model.num_routing_biases(), /*check_run_shape=*/c.steps > 0);
    const auto [least, greatest] = model.min_max_over_ranks(s.step);
    if (least != greatest)
        throw std::runtime_error(c.resume + ".rank*: the ranks' checkpoints hold different steps (" +
                                 std::to_string(least) + " to " + std::to_string(greatest) +
                                 "), so they are not of one run; none trains");
    model.load_state(s);
    if (rank == 0) std::printf("resumed from %s at step %d\n", c.resume.c_str(), s.step);
    return s.step;
}

// The median of the last (at most) `n` entries: the recent step time, for the progress line's ETA.
inline double recent_median(const std::vector<double>& v, size_t n) {
    std::vector<double> recent(v.end() - std::min(n, v.size()), v.end());
    std::nth_element(recent.begin(), recent.begin() + recent.size() / 2, recent.end());
    return recent[recent.size() / 2];
}

// Trains `c.steps` optimizer steps (from a checkpoint's step with --resume) as rank `rank` of
// `world`. Returns 0 when done, 128 + the signal's number when a signal stopped it (after saving a
// checkpoint). When a step fails it saves the last completed one to emergency_path and rethrows.
// With --checkpoint none it saves nothing, at the end, on a signal or on a failure.
// With --steps 0 it trains nothing, reads no data and writes no file: it prints the --sample of the
// --resume checkpoint (or of the initial weights).
template <class Model, class... ModelArgs>
int training_loop(const Config& c, int rank, int world, const ModelArgs&... model_args) {
    const bool lead = rank == 0;
    if (c.steps == 0) {
        Model model(c, model_args...);
        print_sample(model, c, c.resume.empty() ? 0 : load_resumed(model, c, rank, world), lead);
        return 0;
    }
    // the data first: a bad file is reported before the model takes any memory
    DataLoader train(c.train_data, c.B, c.T, rank, world, c.V), val(c.val_data, c.B, c.T, rank, world, c.V);
    check_run_paths(c, world, train, val);
    const double baseline = unigram_entropy_nats(read_shard(train.files()[0], c.V), c.V);
    const int eval_batches = (int)std::min<int64_t>(c.eval_batches, val.batches_in_current_shard());
    Model model(c, model_args...);
    const int N = c.B * c.T;  // tokens per micro-batch on this rank
    std::vector<int32_t> x(N), y(N);
    int first_step = 0;
    if (!c.resume.empty()) {  // continue exactly: weights, moments, biases, and the data position
        first_step = load_resumed(model, c, rank, world);
        for (int64_t i = 0; i < (int64_t)first_step * c.grad_accum; i++) train.next_batch(x.data(), y.data());
    }
    const double tokens_per_step = (double)N * c.grad_accum * world;
    if (lead) {
        model.print_banner(train, tokens_per_step);
        std::printf("unigram baseline (entropy of the train shard's token frequencies): %.4f nats\n", baseline);
    }
    StepLog log(lead ? c.log_file : "", first_step);
    auto save = [&](int steps_done) {
        if (!c.keeps_checkpoint()) return;
        save_checkpoint(rank_path(c.checkpoint, rank, world), c, model.state(steps_done));
        if (lead)
            std::printf("saved checkpoint %s%s (step %d)\n", c.checkpoint.c_str(), world == 1 ? "" : ".rank*",
                        steps_done);
    };

    install_stop_handler();
    double last_val = NAN, first_loss = NAN, last_loss = NAN;
    std::vector<double> step_ms;
    int step = first_step, stop = 0;
    int done = first_step;  // the steps the model's weights hold: what an emergency checkpoint saves
    const Timer run_timer;
    try {
        for (; step < c.steps; step++) {
            // a signal may reach only some ranks: all stop, with the same status
            if ((stop = model.min_max_over_ranks(stop_signal).second) != 0) break;
            Timer timer;
            model.zero_grad();
            for (int micro = 0; micro < c.grad_accum; micro++) {
                train.next_batch(x.data(), y.data());
                model.train_micro_batch(x.data(), y.data());
            }
            model.sync_gradients();
            const double lr = lr_at(step, c.steps, c.lr, c.warmup, c.lr_floor);
            const auto [loss, norm] = model.optimizer_step(lr, step);
            const double ms = timer.ms();
            if (!std::isfinite(loss) || !std::isfinite(norm))  // diverged: stop rather than train on garbage
                throw Diverged("step " + std::to_string(step + 1) + ": loss " + std::to_string(loss) +
                               ", gradient norm " + std::to_string(norm) +
                               " is not finite (learning rate too high?); the checkpoint was not overwritten");
            done = step + 1;
            if (step == first_step) first_loss = loss;
            last_loss = loss;
            if (step > first_step) step_ms.push_back(ms);  // the first step pays for warm-up
            const bool last = step == c.steps - 1;
            // taken every step, printed or not: each covers the step just done
            const std::vector<int64_t> counts = model.take_expert_counts();
            const RouterStats router = model.take_router_stats();
            const std::vector<LayerLoad> loads = layer_loads(counts, c.L, c.E);
            int64_t bytes = 0;
            StepTimes times;
            if constexpr (Model::kOnGpu) {
                bytes = model.take_bytes_sent();
                times = model.take_step_times();
                // by the end of the first step every buffer exists (cuBLAS allocates at its first product)
                if (lead && step == first_step) model.print_memory_use();
            }
            if (lead && (step % c.log_every == 0 || last)) {
                const double tok_s = tokens_per_step / (ms / 1000);
                std::printf("step %5d/%d | loss %.6f", step + 1, c.steps, loss);
                if (c.locmoe())
                    std::printf(" | L_aux %.6f | L_loc %.6f | dropped %lld", router.aux_loss, router.loc_loss,
                                (long long)router.total_dropped());
                std::printf(" | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s", lr, norm, ms, tok_s);
                if constexpr (Model::kOnGpu) std::printf(" | MFU %.1f%%", model.mfu_percent(tok_s));
                // the remaining steps at the recent step time; evaluations and samples not counted
                const double recent_ms = step_ms.empty() ? ms : recent_median(step_ms, 20);
                std::printf(" | eta %s", format_duration((c.steps - step - 1) * recent_ms / 1000).c_str());
                if constexpr (Model::kOnGpu)
                    if (world > 1)
                        std::printf(" | sent %.1f MiB (SPEC §3: %.1f)", bytes / 1048576.0,
                                    model.predicted_bytes_per_step() / 1048576.0);
                std::printf("\n");
                if constexpr (Model::kOnGpu) print_time_breakdown(times, ms);
                print_loads(loads, c.E);
                if (c.locmoe()) print_dropped(router);
            }
            double val_loss = NAN;
            if ((c.eval_every > 0 && (step + 1) % c.eval_every == 0) || last) {
                last_val = val_loss = validation_loss(model, val, eval_batches, N);
                if (lead)
                    std::printf("step %5d | val loss %.4f (unigram baseline %.4f)\n", step + 1, last_val, baseline);
            }
            if (c.sample > 0 && ((c.sample_every > 0 && (step + 1) % c.sample_every == 0) || last))
                print_sample(model, c, step + 1, lead);
            log.row({step + 1, loss, norm, val_loss, ms, lr, (int64_t)((step + 1) * tokens_per_step),
                     run_timer.ms() / 1000, bytes, times, router, loads});
            if (c.checkpoint_every > 0 && (step + 1) % c.checkpoint_every == 0 && !last) save(step + 1);
            std::fflush(stdout);  // may fail on a closed pipe: the run goes on (SIGPIPE is ignored)
        }
        log.close();
        save(step);
    } catch (const Diverged&) {
        throw;
    } catch (const std::exception& failure) {
        // the step failed, not the weights: keep the last completed step, beside the last good checkpoint
        if (done == first_step || !c.keeps_checkpoint()) throw;  // nothing done, or nowhere to keep it
        const std::string path = rank_path(emergency_path(c.checkpoint), rank, world);
        try {
            save_checkpoint(path, c, model.state(done));
        } catch (const std::exception& also) {
            throw std::runtime_error(std::string(failure.what()) +
                                     "; and saving the emergency checkpoint failed too: " + also.what());
        }
        std::fprintf(stderr, "saved an emergency checkpoint of step %d to %s: resume with --resume %s\n", done,
                     path.c_str(), emergency_path(c.checkpoint).c_str());
        throw;
    }
    if (stop) {
        if (lead && c.keeps_checkpoint())
            std::printf("interrupted after step %d by %s: resume with --resume %s\n", step, signal_name(stop),
                        c.checkpoint.c_str());
        else if (lead)
            std::printf("interrupted after step %d by %s (--checkpoint none: nothing saved)\n", step,
                        signal_name(stop));
        return 128 + stop;
    }
    std::sort(step_ms.begin(), step_ms.end());
    const double median_ms = step_ms.empty() ? NAN : step_ms[step_ms.size() / 2];
    const double tok_s = tokens_per_step / (median_ms / 1000);
    if (lead) {
        std::printf("done: train loss %.4f -> %.4f, val loss %.4f (unigram baseline %.4f: %s); median step %.2f ms, "
                    "%.0f tok/s", first_loss, last_loss, last_val, baseline, last_val < baseline ? "below" : "NOT below",
                    median_ms, tok_s);
        if constexpr (Model::kOnGpu) std::printf(", MFU %.1f%%", model.mfu_percent(tok_s));
        std::printf("\n");
    }
    return 0;
}

}  // namespace lmoe
