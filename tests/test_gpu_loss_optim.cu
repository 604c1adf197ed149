// GPU tests of the training step's tail against the CPU reference (SPEC §8.3): the fused LM-head
// cross-entropy (loss and dlogits, padded columns exactly zero), the mean loss and its sum over a step's
// micro-batches, AdamW with the clip factor, the deterministic global gradient norm and the clip scale;
// each kernel run twice must give the same bytes. Ends with timings of cross-entropy at N = 8192,
// Vp = 50304 and AdamW at n = 10^8.
// Exits 77 (reported by CTest as skipped) when no GPU is present.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "dense/adamw.cuh"
#include "dense/cross_entropy.cuh"
#include "dense/global_norm.cuh"
#include "cpu/reference.h"
#include "tests/gpu_test_utils.cuh"

using gpu_test::expect_close;
using lmoe::DeviceBuffer;

// Quantities that are fp32 in both builds (losses, optimizer state, norms) are held to the fp32 tolerance.
constexpr double kFp32Tolerance = 1e-5;

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Median time in ms of `runs` launches of `body`, each timed alone with CUDA events.
template <class F>
float median_ms(F body, int runs = 20) {
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    body();  // warm-up
    std::vector<float> ms(runs);
    for (float& t : ms) {
        CUDA_CHECK(cudaEventRecord(start));
        body();
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return ms[runs / 2];
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy. Logits uniform in (−6, 6) (cheap to draw at 4·10^8 values), NaN in the padded columns:
// they must neither count nor survive. dlogits are compared on every `row_step`-th row (all rows for the
// small cases; a spread of rows for the 8192 × 50304 one, whose full double reference would need 10 GB),
// the losses and the zero padding on every row.
void check_cross_entropy(lmoe::Rng& rng, int N, int V, int Vp, int row_step) {
    std::printf("cross-entropy N=%d V=%d Vp=%d\n", N, V, Vp);
    const float dloss = 0.25f;  // as with 4 micro-steps of gradient accumulation
    std::vector<floatX> logits((size_t)N * Vp);
    for (size_t i = 0; i < logits.size(); i++)
        logits[i] = from_float<floatX>(int(i % Vp) < V ? float(rng.uniform(-6, 6)) : NAN);
    std::vector<int> targets(N);
    for (int& t : targets) t = rng.below(V);
    targets[0] = 0, targets[N - 1] = V - 1;  // the first and last real columns

    DeviceBuffer<floatX> d_logits(logits.size());
    DeviceBuffer<float> d_losses(N);
    DeviceBuffer<int> d_targets(N);
    d_targets.upload(targets);
    auto run = [&](bool write_grad) {
        d_logits.upload(logits);
        d_losses.poison();
        lmoe::cross_entropy_forward_backward(d_logits.get(), d_losses.get(), d_targets.get(), N, V, Vp, dloss,
                                             write_grad, 0);
        CUDA_CHECK(cudaDeviceSynchronize());
        return std::make_pair(d_losses.download(), d_logits.download());
    };
    const auto [losses, dlogits] = run(true);

    // Reference, one row at a time: per-token loss −log p[target]; dlogits with dloss / N folded in.
    std::vector<double> ref_loss(N), got_dlogits, ref_dlogits;
    std::vector<double> z(Vp), probs(Vp), dz(Vp);
    bool padding_zero = true;
    for (int t = 0; t < N; t++) {
        for (int v = 0; v < Vp; v++) z[v] = to_float(logits[(size_t)t * Vp + v]);
        ref_loss[t] = ref::cross_entropy_forward(probs.data(), z.data(), &targets[t], 1, V, Vp);
        for (int v = V; v < Vp; v++) padding_zero &= to_float(dlogits[(size_t)t * Vp + v]) == 0.f;
        if (t % row_step != 0 && t != N - 1) continue;
        ref::cross_entropy_backward(dz.data(), probs.data(), &targets[t], 1, Vp, double(dloss) / N);
        for (int v = 0; v < Vp; v++) {
            got_dlogits.push_back(to_float(dlogits[(size_t)t * Vp + v]));
            ref_dlogits.push_back(dz[v]);
        }
    }
    expect_close("per-token losses", gpu_test::to_double(losses), ref_loss, kFp32Tolerance);
    expect_close("dlogits", got_dlogits, ref_dlogits);
    CHECK_MSG(padding_zero, "padded dlogits columns must be exactly 0");

    const auto [losses_again, dlogits_again] = run(true);
    CHECK_MSG(same_bytes(losses, losses_again) && same_bytes(dlogits, dlogits_again),
              "cross-entropy is not deterministic at N=" + std::to_string(N));
    // Loss only: the same losses, the logits left as they were.
    const auto [losses_eval, logits_eval] = run(false);
    CHECK_MSG(same_bytes(losses, losses_eval), "write_grad=false changes the losses");
    CHECK_MSG(same_bytes(logits, logits_eval), "write_grad=false must leave the logits unchanged");
}

void check_mean_loss(lmoe::Rng& rng, int N) {
    std::vector<float> losses(N);
    double ref = 0;
    for (float& l : losses) ref += (l = float(rng.uniform(0, 11)));
    ref /= N;
    DeviceBuffer<float> d_losses(N), d_mean(1);
    d_losses.upload(losses);
    d_mean.poison();
    lmoe::mean_loss(d_mean.get(), d_losses.get(), N, 0);
    const std::vector<float> mean = d_mean.download();
    expect_close("mean_loss N=" + std::to_string(N), gpu_test::to_double(mean), {ref}, kFp32Tolerance);
    d_mean.poison();
    lmoe::mean_loss(d_mean.get(), d_losses.get(), N, 0);
    CHECK_MSG(same_bytes(mean, d_mean.download()), "mean_loss is not deterministic");
}

// A step's loss summed on the device one micro-batch at a time: the same bits as a float sum of
// mean / parts on the host in the same order.
void check_micro_batch_loss(lmoe::Rng& rng, int parts) {
    DeviceBuffer<float> d_sum(1), d_mean(1);
    d_sum.upload({0.f});
    float want = 0;
    for (int i = 0; i < parts; i++) {
        const float mean = float(rng.uniform(0, 11));
        d_mean.upload({mean});
        lmoe::add_micro_batch_loss(d_sum.get(), d_mean.get(), parts, 0);
        want += mean / parts;
    }
    const std::vector<float> got = d_sum.download();
    std::printf("  add_micro_batch_loss, %d parts: %.9g (host sum %.9g)\n", parts, got[0], want);
    CHECK_MSG(same_bytes(got, {want}), "add_micro_batch_loss differs from the host's sum over " +
                                           std::to_string(parts) + " micro-batches");
}

// ---------------------------------------------------------------------------------------------
// AdamW: 3 steps on random state against ref::adamw_update in double, gradients scaled by a clip factor
// (the reference gets grad · scale), over segments with their own weight decay as the model's tensors
// have (boundaries inside a 4-wide group, an empty segment; at n < 4 empty ones at the end too).
// `offset` shifts every buffer by that many floats: 1 takes the unaligned, scalar path.
void check_adamw(lmoe::Rng& rng, int64_t n, int offset) {
    std::printf("adamw n=%lld offset=%d\n", (long long)n, offset);
    const std::vector<int64_t> end = {std::min(n / 3 + 1, n), std::min(n / 3 + 1, n), std::min(2 * n / 3 + 2, n), n};
    const std::vector<float> weight_decay = {0.1f, 0.5f, 0.f, 0.25f};
    const lmoe::DecayTable decay(end, weight_decay);
    const ref::AdamW hp;  // β1 0.9, β2 0.95, ε 1e-8 (SPEC §2.4)
    const double lr = 1e-3, scale = 0.37;
    auto draw = [&](double s) { return gpu_test::rounded<float>(gpu_test::random_normal(rng, n, s)); };
    std::vector<double> theta = draw(1.0), m = draw(1e-2), v(n);
    for (double& x : v) x = double(float(1e-4 * rng.uniform()));  // second moments are positive

    DeviceBuffer<float> d_master(n + offset), d_m(n + offset), d_v(n + offset), d_grad(n + offset), d_scale(1);
    DeviceBuffer<floatX> d_param(n + offset);
    auto put = [&](DeviceBuffer<float>& b, const std::vector<double>& x) {
        std::vector<float> h(n + offset, 0.f);
        for (int64_t i = 0; i < n; i++) h[offset + i] = float(x[i]);
        b.upload(h);
    };
    auto get = [&](const auto& b) {
        std::vector<double> all = gpu_test::to_double(b.download());
        return std::vector<double>(all.begin() + offset, all.end());
    };
    put(d_master, theta), put(d_m, m), put(d_v, v);
    d_scale.upload({float(scale)});

    for (int t = 1; t <= 3; t++) {
        const std::vector<double> grad = draw(1e-2);
        std::vector<double> scaled(n);
        for (int64_t i = 0; i < n; i++) scaled[i] = grad[i] * scale;
        put(d_grad, grad);
        d_param.poison();
        // State before the step, to run it a second time for determinism.
        const auto master0 = d_master.download(), m0 = d_m.download(), v0 = d_v.download();
        auto step = [&](int64_t begin, int64_t end) {
            lmoe::adamw_update(d_master.get() + offset, d_param.get() + offset, d_m.get() + offset,
                               d_v.get() + offset, d_grad.get() + offset, begin, end, float(lr), float(hp.beta1),
                               float(hp.beta2), float(hp.eps), decay.segments(), float(1 - std::pow(hp.beta1, t)),
                               float(1 - std::pow(hp.beta2, t)), d_scale.get(), 0);
        };
        step(0, n);
        for (size_t j = 0; j < end.size(); j++) {
            const int64_t begin = j == 0 ? 0 : end[j - 1];
            ref::adamw_update(theta.data() + begin, m.data() + begin, v.data() + begin, scaled.data() + begin,
                              end[j] - begin, lr, double(weight_decay[j]), t, hp);
        }
        const std::string at = " step " + std::to_string(t);
        expect_close("master" + at, get(d_master), theta, kFp32Tolerance);
        expect_close("m" + at, get(d_m), m, kFp32Tolerance);
        expect_close("v" + at, get(d_v), v, kFp32Tolerance);
        // The working copy is exactly the new master rounded to floatX.
        const auto master = d_master.download(), m1 = d_m.download(), v1 = d_v.download();
        const auto param = d_param.download();
        bool param_exact = true;
        for (int64_t i = 0; i < n; i++) {
            const floatX want = from_float<floatX>(master[offset + i]);
            param_exact &= std::memcmp(&param[offset + i], &want, sizeof(floatX)) == 0;
        }
        CHECK_MSG(param_exact, "param != floatX(master) at" + at);

        // Again from the same state, as three ranges out of order with ends inside groups of four (as
        // the model updates its tensors block by block): the same bytes.
        d_master.upload(master0), d_m.upload(m0), d_v.upload(v0);
        d_param.poison();
        const int64_t cut1 = std::min(n, n / 5 + 1), cut2 = std::min(n, std::max(cut1, n / 2 + 2));
        step(cut2, n);
        step(0, cut1);
        step(cut1, cut2);
        CHECK_MSG(same_bytes(master, d_master.download()) && same_bytes(m1, d_m.download()) &&
                      same_bytes(v1, d_v.download()) && same_bytes(param, d_param.download()),
                  "adamw_update over three ranges differs from one range, or is not deterministic, at" + at);
    }

    // copy_master_to_param: exactly the rounded master.
    d_param.poison();
    lmoe::copy_master_to_param(d_param.get() + offset, d_master.get() + offset, n, 0);
    const auto master = d_master.download();
    const auto param = d_param.download();
    bool copy_exact = true;
    for (int64_t i = 0; i < n; i++) {
        const floatX want = from_float<floatX>(master[offset + i]);
        copy_exact &= std::memcmp(&param[offset + i], &want, sizeof(floatX)) == 0;
    }
    CHECK_MSG(copy_exact, "copy_master_to_param != floatX(master)");
}

// ---------------------------------------------------------------------------------------------
// Global norm against ref::clip_grad_norm (with clip 0: the norm only), on grads + offset.
void check_global_norm(const std::vector<float>& values, int offset) {
    const int64_t n = (int64_t)values.size() - offset;
    std::vector<double> grads(values.begin() + offset, values.end());
    const double ref_norm = ref::clip_grad_norm(grads.data(), n, 0.0);

    DeviceBuffer<float> d_grads(values.size()), d_scratch(lmoe::global_norm_scratch_size()), d_out(1);
    d_grads.upload(values);
    d_scratch.poison();
    d_out.poison();
    lmoe::global_norm_squared(d_out.get(), d_grads.get() + offset, n, d_scratch.get(), 0);
    const std::vector<float> out = d_out.download();
    expect_close("global norm n=" + std::to_string(n) + " offset=" + std::to_string(offset),
                 {std::sqrt(double(out[0]))}, {ref_norm}, kFp32Tolerance);
    d_out.poison();
    lmoe::global_norm_squared(d_out.get(), d_grads.get() + offset, n, d_scratch.get(), 0);
    CHECK_MSG(same_bytes(out, d_out.download()), "global_norm_squared is not deterministic");
}

void check_clip_scale(float norm_squared, float clip, float want_scale) {
    DeviceBuffer<float> d_in(1), d_scale(1), d_norm(1);
    d_in.upload({norm_squared});
    d_scale.poison();
    d_norm.poison();
    lmoe::clip_scale(d_scale.get(), d_norm.get(), d_in.get(), clip, 0);
    const float scale = d_scale.download()[0], norm = d_norm.download()[0];
    std::printf("  clip_scale(norm²=%g, clip=%g): norm %g scale %g (want %g)\n", norm_squared, clip, norm, scale,
                want_scale);
    CHECK(norm == std::sqrt(norm_squared));
    CHECK(scale == want_scale);
}

// ---------------------------------------------------------------------------------------------
void report_timings() {
    std::printf("timings (median of 20, cudaEvent)\n");
    {
        const int N = 8192, V = 50257, Vp = 50304;
        DeviceBuffer<floatX> logits((size_t)N * Vp);
        DeviceBuffer<float> losses(N);
        DeviceBuffer<int> targets(N);
        CUDA_CHECK(cudaMemset(logits.get(), 0, logits.size() * sizeof(floatX)));
        CUDA_CHECK(cudaMemset(targets.get(), 0, N * sizeof(int)));
        const float ms = median_ms([&] {
            lmoe::cross_entropy_forward_backward(logits.get(), losses.get(), targets.get(), N, V, Vp, 1.f, true, 0);
        });
        const double bytes = 2.0 * N * Vp * sizeof(floatX);  // the least traffic: read the logits once, write once
        std::printf("  cross_entropy_forward_backward N=%d Vp=%d: %.3f ms, %.0f GB/s (read + write of the logits)\n",
                    N, Vp, ms, bytes / ms / 1e6);
    }
    {
        const int64_t n = 100000000;
        DeviceBuffer<float> master(n), m(n), v(n), grad(n), scale(1), scratch(lmoe::global_norm_scratch_size()),
            norm_sq(1);
        DeviceBuffer<floatX> param(n);
        for (auto* b : {&master, &m, &v, &grad}) CUDA_CHECK(cudaMemset(b->get(), 0, n * sizeof(float)));
        scale.upload({1.f});
        std::vector<int64_t> end(100);  // a hundred tensors, as many as a 12-layer model has
        for (int j = 0; j < 100; j++) end[j] = n * (j + 1) / 100;
        const lmoe::DecayTable decay(end, std::vector<float>(100, 0.1f));
        float ms = median_ms([&] {
            lmoe::adamw_update(master.get(), param.get(), m.get(), v.get(), grad.get(), 0, n, 1e-3f, 0.9f, 0.95f,
                               1e-8f, decay.segments(), 0.1f, 0.05f, scale.get(), 0);
        });
        double bytes = double(n) * (4 * 4 + 3 * 4 + sizeof(floatX));  // read master, m, v, grad; write 3 + param
        std::printf("  adamw_update n=%lld: %.3f ms, %.0f GB/s\n", (long long)n, ms, bytes / ms / 1e6);
        ms = median_ms([&] { lmoe::global_norm_squared(norm_sq.get(), grad.get(), n, scratch.get(), 0); });
        std::printf("  global_norm_squared n=%lld: %.3f ms, %.0f GB/s\n", (long long)n, ms, n * 4.0 / ms / 1e6);
    }
}

int main() {
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(20240520);

    check_cross_entropy(rng, 67, 200, 256, 1);
    check_cross_entropy(rng, 33, 256, 256, 1);
    check_cross_entropy(rng, 8192, 50257, 50304, 37);
    for (int N : {1, 67, 8192}) check_mean_loss(rng, N);
    for (int parts : {1, 3, 8}) check_micro_batch_loss(rng, parts);

    check_adamw(rng, 100003, 0);
    check_adamw(rng, 1001, 1);  // unaligned: the scalar path
    check_adamw(rng, 3, 0);     // fewer elements than one group of 4: the leftovers alone

    std::printf("global norm\n");
    for (int64_t n : {10000000LL, 1001LL, 5LL}) {
        std::vector<float> values(n + 1);
        for (float& x : values) x = float(1e-3 * rng.normal());
        check_global_norm(values, 0);  // 16-byte aligned: the vectorised path with its n % 4 tail
        check_global_norm(values, 1);  // the scalar path
    }
    {  // 10^8 values: the size where a plain fp32 sum would drift from the double reference
        std::vector<float> values(100000000);
        for (float& x : values) x = float(rng.uniform(-1e-3, 1e-3));
        check_global_norm(values, 0);
    }
    check_clip_scale(4.f, 1.f, 0.5f);   // above the clip: scale clip / norm
    check_clip_scale(4.f, 3.f, 1.f);    // below
    check_clip_scale(4.f, 2.f, 1.f);    // exactly at the clip: no scaling
    check_clip_scale(4.f, 0.f, 1.f);    // clip 0: clipping off
    check_clip_scale(0.f, 1.f, 1.f);    // zero gradients

    report_timings();
    return check::summary();
}
