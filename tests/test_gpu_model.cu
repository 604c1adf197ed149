// The whole model of each trainer (train_latentmoe, moe_ep_baseline) on the GPU against the CPU
// reference at step 0 (SPEC §8.3): the same weights (the GPU's fp32 master weights, copied into the
// reference), the same batch, the same expert choices (the GPU's, so a near-tie that rounds the other
// way cannot fail the test): the loss and the gradient of every parameter tensor, from a gradient
// buffer poisoned before zero_grad (which clears all but the expert weights' gradients, the backward
// writing those); then two optimizer steps on fresh models (check_optimizer_step). Tight in the fp32 build; in bf16 it shows how far mixed precision moves them. With
// --dump DIR it also writes the GPU's step as a model dump for the independent PyTorch oracle
// (tests/torch_oracle.py), LocMoE's with its capacity, the copies it kept, L_aux and L_loc.
#define LMOE_NO_MAIN
#include "moe_ep_baseline.cu"
#include "train_latentmoe.cu"
#include "tests/gpu_test_utils.cuh"
#include "tests/model_dump.h"

using namespace lmoe;

#ifdef LMOE_FP32
constexpr double kModelTolerance = 1e-4;  // a dozen fp32 layers deep: sums of ~1e3 terms per element
#else
constexpr double kModelTolerance = 5e-2;
#endif

// The optimizer step, on two fresh models of the configuration fed the same batches (`micro_batches`
// a step). AdamW runs on a stream of its own, block by block, the next forward waiting for each block
// (train/gpu_model.cuh). `synced` waits for every update (state()) before it goes on: its first step
// against ref::adamw_update on its own gradients and weights, each tensor's update (new − old master
// weights, so a block left out or updated twice shows as an error near 1), and every gradient but the
// expert weights' zero after the step. `held` goes on without waiting. Its optimizer stream is held
// back before the first update, so that the next step's zero_grad, forward and backward are queued
// before the update they must wait for (the test checks that the hold still holds once they are); its
// main stream is held back before the second step's clip, which the second update must wait for. Its
// losses, gradient norms, a forward after two steps and its final weights, moments and routing biases
// must equal synced's bitwise.
constexpr double kStepTolerance = 1e-3;  // fp32 against double; the update, ~lr, is a difference of two weights ~1
constexpr uint64_t kHoldNs = 200'000'000;  // far longer than queueing a tiny model's step

// Holds a stream for at least `ns` nanoseconds of the GPU's global timer.
__global__ void hold_stream_kernel(uint64_t ns) {
    uint64_t start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(100000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}

template <class Ffn>
void check_optimizer_step(const std::string& name, Config c, lmoe::Rng& rng, int micro_batches) {
    c.grad_accum = micro_batches;
    const int N = c.B * c.T;
    // the micro-batches of two steps, then one more for a forward: tokens, then targets
    std::vector<std::vector<int32_t>> batches(2 * micro_batches + 1, std::vector<int32_t>(2 * N));
    for (auto& b : batches)
        for (int32_t& t : b) t = rng.below(c.V);
    const auto train_step = [&](GpuModel<Ffn>& model, int step) {
        model.zero_grad();
        for (int m = 0; m < micro_batches; m++) {
            const std::vector<int32_t>& b = batches[step * micro_batches + m];
            model.train_micro_batch(b.data(), b.data() + N);
        }
    };
    const double lr = 1e-3;
    GpuModel<Ffn> synced(c, Comm{}), held(c, Comm{});

    std::vector<StepResult> want;
    std::vector<float> master, grads;
    for (int step = 0; step < 2; step++) {
        train_step(synced, step);
        if (step == 0) {
            master = synced.master.download();
            grads = synced.grads.download();
        }
        want.push_back(synced.optimizer_step(lr, step));
        const TrainingState state = synced.state(step + 1);  // waits for the update
        if (step > 0) continue;
        std::vector<double> theta(master.begin(), master.end()), g(grads.begin(), grads.end());
        std::vector<double> m(theta.size(), 0.0), v(theta.size(), 0.0);
        const double norm = ref::clip_grad_norm(g.data(), (int64_t)g.size(), c.grad_clip);
        CHECK_MSG(std::abs(want[0].norm - norm) <= kStepTolerance * norm,
                  name + ": the gradient norm differs from the reference");
        const std::vector<float> grads_after = synced.grads.download();
        bool cleared = true;
        for (const TensorSpec& t : synced.layout.tensors) {
            ref::adamw_update(theta.data() + t.offset, m.data() + t.offset, v.data() + t.offset, g.data() + t.offset,
                              t.numel, lr, t.decay ? c.weight_decay : 0.0, 1);
            std::vector<double> got(t.numel), ref_update(t.numel);
            for (int64_t i = 0; i < t.numel; i++) {
                got[i] = double(state.params[t.offset + i]) - master[t.offset + i];
                ref_update[i] = theta[t.offset + i] - master[t.offset + i];
            }
            gpu_test::expect_close(name + " step " + t.name, got, ref_update, kStepTolerance);
            if (!t.gradient_written)
                for (int64_t i = 0; i < t.numel; i++) cleared &= grads_after[t.offset + i] == 0.f;
        }
        CHECK_MSG(cleared, name + ": gradients left uncleared by the optimizer step");
    }

    bool same_steps = true, held_back = true;
    for (int step = 0; step < 2; step++) {
        train_step(held, step);  // step 1's waits for step 0's held update
        if (step == 1) held_back = cudaStreamQuery(held.optimizer_stream()) == cudaErrorNotReady;
        hold_stream_kernel<<<1, 1, 0, step == 0 ? held.optimizer_stream() : held.ctx.stream>>>(kHoldNs);
        CUDA_CHECK_LAUNCH();
        const StepResult got = held.optimizer_step(lr, step);
        same_steps &= got.loss == want[step].loss && got.norm == want[step].norm;
    }
    CHECK_MSG(held_back, name + ": the optimizer stream was not held while the next step was queued");
    float loss[2];
    int i = 0;
    for (GpuModel<Ffn>* model : {&synced, &held}) {
        model->forward(batches.back().data(), batches.back().data() + N, 0.f);
        loss[i++] = model->mean_loss_global();
    }
    const TrainingState a = synced.state(2), b = held.state(2);
    std::printf("  after two steps, a forward: loss %.7f (updates awaited), %.7f (updates held back)\n", loss[0],
                loss[1]);
    CHECK_MSG(same_steps && loss[0] == loss[1] && gpu_test::same_bytes(a.params, b.params) &&
                  gpu_test::same_bytes(a.m, b.m) && gpu_test::same_bytes(a.v, b.v) &&
                  gpu_test::same_bytes(a.routing_bias, b.routing_bias),
              name + ": steps whose updates were held back differ from steps that awaited them");
}

template <class Ffn>
void check_model(const char* name, Config c, lmoe::Rng& rng, const std::string& dump_dir, int micro_batches = 1) {
    std::printf("%s (%s): T %d d %d L %d n_head %d | H %d dh %d E %d fe %d k %d | B %d%s\n", name, ffn_name(c.ffn), c.T,
                c.d, c.L, c.n_head, c.H, c.dh, c.E, c.fe, c.k, c.B,
                micro_batches > 1 ? (" | " + std::to_string(micro_batches) + " micro-batches").c_str() : "");
    validate(c, 1);
    lmoe::check_gpu_supported<Ffn>(c);
    const int N = c.B * c.T;
    std::vector<int32_t> tokens(N), targets(N);

    GpuModel<Ffn> gpu(c, Comm{});
    gpu.grads.poison();  // every gradient either cleared by zero_grad or written by the backward, or NaN
    gpu.zero_grad();
    const std::vector<float> master = gpu.master.download();
    ref::Model<double> cpu(c);
    for (size_t i = 0; i < master.size(); i++) cpu.params[i] = to_float(from_float<floatX>(master[i]));
    // Each micro-batch on both, the reference with the GPU's expert choices; the gradients of the
    // step are their sums, each micro-batch's loss weighted 1/micro_batches (the first writes the
    // GPU's expert weight gradients, the others add to them).
    float gpu_loss = 0;
    double cpu_loss = 0;
    RouterStats router;
    for (int m = 0; m < micro_batches; m++) {
        for (int i = 0; i < N; i++) { tokens[i] = rng.below(c.V); targets[i] = rng.below(c.V); }
        gpu.forward(tokens.data(), targets.data(), 1.f / micro_batches);
        gpu.backward();
        CUDA_CHECK(cudaMemcpy(&gpu_loss, gpu.mean_loss_device(), sizeof(float), cudaMemcpyDeviceToHost));
        router = gpu.take_router_stats();  // LocMoE's L_aux, L_loc (over the layers), drops
        cpu.forward(tokens.data(), targets.data(), c.B);  // allocates the routing caches
        for (int l = 0; l < c.L; l++) cpu.ffn[l].sel = gpu.ffn().selection(l);
        cpu.forward(tokens.data(), targets.data(), c.B, true);
        cpu_loss = cpu.cross_entropy;  // the GPU's mean loss is the cross-entropy alone
        cpu.backward(1.0 / micro_batches);
        if (m + 1 < micro_batches) {
            const double err = std::abs(gpu_loss - cpu_loss) / std::abs(cpu_loss);
            CHECK_MSG(err < kModelTolerance, std::string(name) + ": the loss of micro-batch " + std::to_string(m) +
                                                 " differs from the reference");
        }
    }
    const std::vector<float> grads = gpu.grads.download();

    if (!dump_dir.empty() && micro_batches == 1) {
        ModelDump dump;
        dump.cfg = c;
        dump.tensors = gpu.layout.tensors;
        dump.params = master;
        dump.grads.assign(grads.begin(), grads.end());
        dump.tokens = tokens;
        dump.targets = targets;
        for (int l = 0; l < c.L; l++) {
            std::vector<int> sel = gpu.ffn().selection(l);
            dump.sel.insert(dump.sel.end(), sel.begin(), sel.end());
        }
        dump.routing_bias = gpu.balance.download_bias();
        dump.loss = gpu_loss;  // the objective: the cross-entropy, to which LocMoE adds L_aux + L_loc below
        dump.producer = std::string("test_gpu_model (") + gpu_test::kPrecision + " build)";
        if constexpr (Ffn::kind == FfnKind::MoE) {
            if (c.locmoe()) {
                LocMoeDump& loc = dump.locmoe;
                loc.rank = gpu.comm.rank;
                loc.world = gpu.comm.world;
                loc.node_size = locmoe_node_size(c, gpu.comm.world, gpu.comm.local_size);
                const ExpertCapacity cap = expert_capacity(c, N);
                loc.p_delta = cap.p_delta;
                loc.ec_min = cap.ec_min;
                loc.capacity = gpu.ffn().capacity();
                loc.cross_entropy = gpu_loss;
                loc.aux_loss = router.aux_loss;
                loc.loc_loss = router.loc_loss;
                loc.dropped = router.dropped;
                for (int l = 0; l < c.L; l++) {
                    const std::vector<int> kept = gpu.ffn().kept(l);
                    loc.kept.insert(loc.kept.end(), kept.begin(), kept.end());
                }
                dump.loss = double(gpu_loss) + router.aux_loss + router.loc_loss;
            }
        }
        write_model_dump(dump_dir + "/" + name + (c.ffn == FfnKind::MoE ? "_moe" : ""), dump);
    }
    const double loss_err = std::abs(gpu_loss - cpu_loss) / std::abs(cpu_loss);
    std::printf("  loss: GPU %.7f, CPU %.7f, rel err %.2e\n", gpu_loss, cpu_loss, loss_err);
    CHECK_MSG(loss_err < kModelTolerance, std::string(name) + ": loss differs from the reference");
    for (const TensorSpec& t : gpu.layout.tensors) {
        std::vector<double> got(grads.begin() + t.offset, grads.begin() + t.offset + t.numel);
        std::vector<double> want(cpu.grads.begin() + t.offset, cpu.grads.begin() + t.offset + t.numel);
        gpu_test::expect_close(std::string(name) + " d" + t.name, got, want, kModelTolerance);
    }
    check_optimizer_step<Ffn>(name, c, rng, micro_batches);
}

int main(int argc, char** argv) {
    gpu_test::skip_without_gpu();
    const std::string dump_dir = argc == 3 && std::string(argv[1]) == "--dump" ? argv[2] : "";
    lmoe::Rng rng(99);
    Config tiny;
    apply_preset(tiny, "tiny");
    tiny.B = 4;
    check_model<LatentMoeFfn>("tiny", tiny, rng, dump_dir);
    Config wider = tiny;
    wider.d = 128; wider.T = 64; wider.B = 2; wider.n_head = 4; wider.H = 4; wider.dh = 32; wider.E = 16;
    wider.fe = 64; wider.k = 4; wider.V = 300;  // a vocabulary that needs padding
    check_model<LatentMoeFfn>("wider", wider, rng, dump_dir);
    check_model<LatentMoeFfn>("tiny, two micro-batches", tiny, rng, dump_dir, 2);

    Config moe_tiny;
    moe_tiny.ffn = FfnKind::MoE;
    apply_preset(moe_tiny, "tiny");
    moe_tiny.B = 4;
    check_model<MoeFfn>("tiny", moe_tiny, rng, dump_dir);
    Config moe_wider = moe_tiny;
    moe_wider.d = 144; moe_wider.dh = 144; moe_wider.T = 64; moe_wider.B = 2; moe_wider.n_head = 9; moe_wider.E = 12;
    moe_wider.fe = 88; moe_wider.k = 3; moe_wider.V = 300;  // sizes off the 32/128 grid, a padded vocabulary
    check_model<MoeFfn>("wider", moe_wider, rng, dump_dir);
    check_model<MoeFfn>("tiny, two micro-batches", moe_tiny, rng, dump_dir, 2);
    Config locmoe = moe_tiny;  // SPEC §2.6: top-1, a capacity that drops copies, losses weighted up
    locmoe.router = "locmoe";
    locmoe.bias_rate = 0;
    locmoe.k = 1;
    locmoe.capacity_factor = 1;
    locmoe.aux_loss_weight = 0.3f;
    locmoe.loc_loss_weight = 0.5f;
    check_model<MoeFfn>("locmoe", locmoe, rng, dump_dir);
    return check::summary();
}
