// The whole model of each trainer (train_latentmoe, moe_ep_baseline) on the GPU against the CPU
// reference at step 0 (SPEC §8.3): the same weights (the GPU's fp32 master weights, copied into the
// reference), the same batch, the same expert choices (the GPU's, so a near-tie that rounds the other
// way cannot fail the test): the loss and the gradient of every parameter tensor, from a gradient
// buffer poisoned before zero_grad (which clears all but the expert weights' gradients, the backward
// writing those); then the optimizer step on those gradients and the forward after it
// (check_optimizer_step). Tight in the fp32 build; in bf16 it shows how far mixed precision moves them. With
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

// The optimizer step after the gradient check: AdamW runs on a stream of its own, block by block, and
// the next forward waits for each block (train/gpu_model.cuh). Against ref::adamw_update on the GPU's
// own gradients and weights, each tensor's update (new − old master weights, so a block left out or
// updated twice shows as an error near 1); every gradient but the expert weights' zero after the step;
// and the next forward, issued while the update may still run, giving bitwise the loss of a fresh model
// loaded with the updated state.
constexpr double kStepTolerance = 1e-3;  // fp32 against double; the update, ~lr, is a difference of two weights ~1

template <class Ffn>
void check_optimizer_step(const std::string& name, const Config& c, GpuModel<Ffn>& gpu, const std::vector<float>& master,
                          const std::vector<float>& grads, lmoe::Rng& rng) {
    const double lr = 1e-3;
    const StepResult step = gpu.optimizer_step(lr, 0);
    const int N = c.B * c.T;
    std::vector<int32_t> tokens(N), targets(N);
    for (int i = 0; i < N; i++) { tokens[i] = rng.below(c.V); targets[i] = rng.below(c.V); }
    gpu.forward(tokens.data(), targets.data(), 0.f);
    const float loss_after = gpu.mean_loss_global();
    const TrainingState state = gpu.state(1);  // waits for the update

    std::vector<double> theta(master.begin(), master.end()), g(grads.begin(), grads.end());
    std::vector<double> m(theta.size(), 0.0), v(theta.size(), 0.0);
    const double norm = ref::clip_grad_norm(g.data(), (int64_t)g.size(), c.grad_clip);
    CHECK_MSG(std::abs(step.norm - norm) <= kStepTolerance * norm, name + ": the gradient norm differs from the reference");
    const std::vector<float> grads_after = gpu.grads.download();
    bool cleared = true;
    for (const TensorSpec& t : gpu.layout.tensors) {
        ref::adamw_update(theta.data() + t.offset, m.data() + t.offset, v.data() + t.offset, g.data() + t.offset,
                          t.numel, lr, t.decay ? c.weight_decay : 0.0, 1);
        std::vector<double> got(t.numel), want(t.numel);
        for (int64_t i = 0; i < t.numel; i++) {
            got[i] = double(state.params[t.offset + i]) - master[t.offset + i];
            want[i] = theta[t.offset + i] - master[t.offset + i];
        }
        gpu_test::expect_close(name + " step " + t.name, got, want, kStepTolerance);
        if (!t.gradient_written)
            for (int64_t i = 0; i < t.numel; i++) cleared &= grads_after[t.offset + i] == 0.f;
    }
    CHECK_MSG(cleared, name + ": gradients left uncleared by the optimizer step");

    GpuModel<Ffn> fresh(c, Comm{});
    fresh.load_state(state);
    fresh.forward(tokens.data(), targets.data(), 0.f);
    const float loss_fresh = fresh.mean_loss_global();
    std::printf("  next forward: loss %.7f, a fresh model with the updated state %.7f\n", loss_after, loss_fresh);
    CHECK_MSG(loss_after == loss_fresh, name + ": the forward after the step did not see the updated weights");
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
    check_optimizer_step(name, c, gpu, master, grads, rng);
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
