// Text generation on the GPU (train/sample.h over GpuModel::logits_at) against the CPU reference, for
// both trainers on the tiny preset with routing biases set: the logits of one context, and greedy
// generation past the context length, where every token the GPU picks must be the reference's argmax
// on the same context or within the tolerance of it (a near-tie may round either way). Tight in the
// fp32 build (-DLMOE_FP32=ON); in bf16 it shows how far mixed precision moves the logits.
#define LMOE_NO_MAIN
#include "moe_ep_baseline.cu"
#include "train_latentmoe.cu"
#include "tests/gpu_test_utils.cuh"

using namespace lmoe;

#ifdef LMOE_FP32
constexpr double kLogitTolerance = 1e-4;  // as test_gpu_model's whole-model tolerance
#else
constexpr double kLogitTolerance = 5e-2;
#endif

template <class Ffn>
void check_greedy(FfnKind ffn) {
    Config c;
    c.ffn = ffn;
    apply_preset(c, "tiny");
    c.B = 4;
    c.sample = c.T + 16;
    c.temperature = 0;
    c.prompt = "In the beginning";
    validate(c, 1);
    lmoe::check_gpu_supported<Ffn>(c);
    std::printf("%s: tiny, B %d, %d greedy tokens from a %zu-token prompt, T %d\n", ffn_name(ffn), c.B, c.sample,
                c.prompt.size(), c.T);

    GpuModel<Ffn> gpu(c, Comm{});
    TrainingState s = gpu.state(0);
    Rng rng(11);
    for (float& b : s.routing_bias) b = (float)rng.uniform(-0.5, 0.5);
    gpu.load_state(s);
    // the reference computes with the weights the GPU computes with (bf16-rounded in the bf16 build)
    for (float& p : s.params) p = to_float(from_float<floatX>(p));
    CpuModel cpu(c);
    cpu.load_state(s);

    std::vector<int32_t> row(c.T);
    const std::vector<int32_t> prompt = prompt_tokens(c);
    const int pos = window_row(prompt, row);
    const std::vector<float> got = gpu.logits_at(row, pos), want = cpu.logits_at(row, pos);
    gpu_test::expect_close("logits at the prompt's last position", std::vector<double>(got.begin(), got.end()),
                           std::vector<double>(want.begin(), want.end()), kLogitTolerance);

    const std::vector<int32_t> tokens = generate(gpu, c);
    std::vector<int32_t> context = prompt;
    int exact = 0, near_ties = 0;
    for (int32_t token : tokens) {
        const std::vector<float> ref = cpu.logits_at(row, window_row(context, row));
        const int best = sample_token(ref, 0.f, 0, 0.5);
        double scale = 1;
        for (float z : ref) scale = std::max(scale, (double)std::fabs(z));
        if (token == best) exact++;
        else if (ref[best] - ref[token] <= kLogitTolerance * scale) near_ties++;
        else CHECK_MSG(false, std::string(ffn_name(ffn)) + ": after " + std::to_string(context.size()) +
                                  " tokens the GPU picked " + std::to_string(token) + ", the reference's argmax is " +
                                  std::to_string(best) + " (logits " + std::to_string(ref[token]) + " and " +
                                  std::to_string(ref[best]) + ")");
        context.push_back(token);
    }
    std::printf("  greedy tokens: %d the reference's argmax, %d near-ties within %.0e, of %zu\n", exact, near_ties,
                kLogitTolerance, tokens.size());
    CHECK((int)tokens.size() == c.sample);
}

int main() {
    gpu_test::skip_without_gpu();
    check_greedy<LatentMoeFfn>(FfnKind::LatentMoE);
    check_greedy<MoeFfn>(FfnKind::MoE);
    return check::summary();
}
