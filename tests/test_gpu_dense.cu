// GPU tests of the dense per-token kernels (SPEC §8.3): token embedding, RMSNorm (plain and fused
// with the residual add) and rotary embedding, forward and backward, each against the CPU reference in
// double on exactly the rounded inputs the GPU sees, with outputs poisoned before every launch.
// Sizes: the tiny preset, odd ones (N and d not multiples of 32, runs of one id across the embedding
// sort's chunks) and realistic ones (N = 2048, d = 1024, T = 1024, 8 heads of 128, Vp = 50304).
// The backward kernels must be bitwise reproducible; the embedding's must also equal a sequential fp32
// sum bit for bit. Ends with timings (median of 20) at N = 2048 and N = 65536.
#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "dense/embedding.cuh"
#include "cpu/reference.h"
#include "dense/rmsnorm.cuh"
#include "dense/rope.cuh"
#include "tests/gpu_test_utils.cuh"

using gpu_test::expect_close;
using gpu_test::random_normal;
using gpu_test::rounded;
using gpu_test::to_device_type;
using gpu_test::to_double;
using gpu_test::upload;
using lmoe::DeviceBuffer;

namespace {

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Uniform in (−1, 1): cheaper than normal draws for the 50M-element embedding tables.
std::vector<double> random_uniform(lmoe::Rng& rng, size_t n) {
    std::vector<double> v(n);
    for (double& x : v) x = rng.uniform(-1.0, 1.0);
    return v;
}

// Token ids with many repeats: half of them among the first few ids (long runs of one id that cross
// the embedding sort's 1024-token chunks), the rest anywhere in [0, Vp); the last id occurs too.
std::vector<int> repeated_tokens(lmoe::Rng& rng, int N, int Vp) {
    std::vector<int> tokens(N);
    for (int& t : tokens) t = rng.uniform() < 0.5 ? rng.below(std::min(Vp, 5)) : rng.below(Vp);
    tokens[N / 2] = Vp - 1;
    return tokens;
}

// The rows of `table` (rows of width d) whose `keep` flag is `want`, one after another.
template <class T>
std::vector<T> select_rows(const std::vector<T>& table, const std::vector<char>& keep, bool want, int d) {
    std::vector<T> out;
    for (size_t v = 0; v < keep.size(); v++)
        if ((keep[v] != 0) == want) out.insert(out.end(), table.begin() + v * d, table.begin() + (v + 1) * d);
    return out;
}

// ---------------------------------------------------------------------------------------------

void test_embedding(const std::string& name, int N, int d, int Vp, uint64_t seed) {
    std::printf("embedding %s: N=%d d=%d Vp=%d\n", name.c_str(), N, d, Vp);
    lmoe::Rng rng(seed);
    const std::vector<int> tokens = repeated_tokens(rng, N, Vp);
    DeviceBuffer<int> tokens_d(N);
    tokens_d.upload(tokens);

    // Forward: a gather, so the result must be exact.
    const std::vector<double> wte = rounded<floatX>(random_uniform(rng, (size_t)Vp * d));
    DeviceBuffer<floatX> wte_d = upload<floatX>(wte), x_d(N * d);
    x_d.poison();
    lmoe::embedding_forward(x_d.get(), tokens_d.get(), wte_d.get(), N, d, 0);
    std::vector<double> x_ref((size_t)N * d);
    ref::embedding_forward(x_ref.data(), tokens.data(), wte.data(), N, d);
    expect_close(name + " embedding_forward", x_d, x_ref, 0.0);

    // Backward: accumulates into a random dwte.
    const std::vector<double> dx = rounded<floatX>(random_normal(rng, (size_t)N * d));
    const std::vector<double> dwte0 = rounded<float>(random_uniform(rng, (size_t)Vp * d));
    const std::vector<float> dwte0_f = to_device_type<float>(dwte0);
    DeviceBuffer<floatX> dx_d = upload<floatX>(dx);
    DeviceBuffer<float> dwte_d((size_t)Vp * d);
    DeviceBuffer<char> scratch(lmoe::embedding_backward_scratch_bytes(N, Vp));
    auto run_backward = [&] {
        dwte_d.upload(dwte0_f);
        scratch.poison();
        lmoe::embedding_backward(dwte_d.get(), dx_d.get(), tokens_d.get(), N, d, Vp, scratch.get(), 0);
        return dwte_d.download();
    };
    const std::vector<float> dwte = run_backward();

    std::vector<double> dwte_ref = dwte0;
    ref::embedding_backward(dwte_ref.data(), dx.data(), tokens.data(), N, d);
    std::vector<char> hit(Vp, 0);
    for (int t : tokens) hit[t] = 1;
    expect_close(name + " embedding_backward (rows of ids present)", select_rows(to_double(dwte), hit, true, d),
                 select_rows(dwte_ref, hit, true, d));
    CHECK_MSG(same_bytes(select_rows(dwte, hit, false, d), select_rows(dwte0_f, hit, false, d)),
              name + ": embedding_backward changed rows of ids absent from the batch");

    // The same loop as the reference, in fp32: dwte[v] += dx[t] for t in increasing order.
    std::vector<float> sequential = dwte0_f;
    for (int t = 0; t < N; t++)
        for (int i = 0; i < d; i++) sequential[(size_t)tokens[t] * d + i] += float(dx[(size_t)t * d + i]);
    CHECK_MSG(same_bytes(dwte, sequential), name + ": embedding_backward differs from the sequential fp32 sum");
    CHECK_MSG(same_bytes(dwte, run_backward()), name + ": embedding_backward is not bitwise reproducible");
}

// ---------------------------------------------------------------------------------------------

void test_rmsnorm(const std::string& name, int N, int d, uint64_t seed) {
    std::printf("rmsnorm %s: N=%d d=%d\n", name.c_str(), N, d);
    lmoe::Rng rng(seed);
    const size_t n = (size_t)N * d;
    const std::vector<double> x = rounded<floatX>(random_normal(rng, n));
    std::vector<double> g_raw = random_normal(rng, d, 0.1);
    for (double& v : g_raw) v += 1.0;
    const std::vector<double> g = rounded<floatX>(g_raw);
    DeviceBuffer<floatX> x_d = upload<floatX>(x), g_d = upload<floatX>(g), y_d(n);
    DeviceBuffer<float> rstd_d(N);

    // Forward.
    std::vector<double> y_ref(n), rstd_ref(N);
    ref::rmsnorm_forward(y_ref.data(), rstd_ref.data(), x.data(), g.data(), N, d);
    y_d.poison();
    rstd_d.poison();
    lmoe::rmsnorm_forward(y_d.get(), rstd_d.get(), x_d.get(), g_d.get(), N, d, 0);
    expect_close(name + " rmsnorm_forward y", y_d, y_ref);
    expect_close(name + " rmsnorm_forward rstd", rstd_d, rstd_ref);

    // Fused residual: reference = the sum rounded to floatX, then the norm of that.
    const std::vector<double> x_in = rounded<floatX>(random_normal(rng, n));
    const std::vector<double> delta = rounded<floatX>(random_normal(rng, n, 0.5));
    std::vector<double> sum(n);
    for (size_t i = 0; i < n; i++) sum[i] = x_in[i] + delta[i];
    sum = rounded<floatX>(sum);
    std::vector<double> ys_ref(n), rstds_ref(N);
    ref::rmsnorm_forward(ys_ref.data(), rstds_ref.data(), sum.data(), g.data(), N, d);
    DeviceBuffer<floatX> x_in_d = upload<floatX>(x_in), delta_d = upload<floatX>(delta), x_out_d(n);
    for (bool in_place : {false, true}) {
        const std::string how = in_place ? " (x_out = x_in)" : "";
        floatX* x_out = in_place ? x_in_d.get() : x_out_d.get();
        if (!in_place) x_out_d.poison();
        y_d.poison();
        rstd_d.poison();
        lmoe::residual_rmsnorm_forward(x_out, y_d.get(), rstd_d.get(), x_in_d.get(), delta_d.get(), g_d.get(), N, d,
                                       0);
        expect_close(name + " residual_rmsnorm x_out" + how, in_place ? x_in_d : x_out_d, sum);
        expect_close(name + " residual_rmsnorm y" + how, y_d, ys_ref);
        expect_close(name + " residual_rmsnorm rstd" + how, rstd_d, rstds_ref);
    }

    // Backward, accumulating into random dx and dg, with the forward's rstd as fp32.
    const std::vector<double> rstd = rounded<float>(rstd_ref);
    const std::vector<double> dy = rounded<floatX>(random_normal(rng, n));
    const std::vector<double> dx0 = rounded<floatX>(random_normal(rng, n));
    const std::vector<double> dg0 = rounded<float>(random_normal(rng, d));
    std::vector<double> dx_ref = dx0, dg_ref = dg0;
    ref::rmsnorm_backward(dx_ref.data(), dg_ref.data(), dy.data(), x.data(), g.data(), rstd.data(), N, d);
    DeviceBuffer<floatX> dy_d = upload<floatX>(dy), dx_d(n);
    DeviceBuffer<float> dg_d(d), rstd_in_d = upload<float>(rstd);
    DeviceBuffer<float> scratch(lmoe::rmsnorm_backward_scratch_floats(N, d));
    auto run_backward = [&] {
        dx_d.upload(to_device_type<floatX>(dx0));
        dg_d.upload(to_device_type<float>(dg0));
        scratch.poison();
        lmoe::rmsnorm_backward(dx_d.get(), dg_d.get(), dy_d.get(), x_d.get(), g_d.get(), rstd_in_d.get(), N, d,
                               scratch.get(), 0);
        return std::make_pair(dx_d.download(), dg_d.download());
    };
    const auto first = run_backward();
    expect_close(name + " rmsnorm_backward dx (accumulated)", to_double(first.first), dx_ref);
    expect_close(name + " rmsnorm_backward dg (accumulated)", to_double(first.second), dg_ref);
    const auto second = run_backward();
    CHECK_MSG(same_bytes(first.first, second.first) && same_bytes(first.second, second.second),
              name + ": rmsnorm_backward is not bitwise reproducible");
}

// ---------------------------------------------------------------------------------------------

void test_rope(const std::string& name, int B, int T, int n_head, int d_attn, uint64_t seed) {
    std::printf("rope %s: B=%d T=%d n_head=%d d_attn=%d\n", name.c_str(), B, T, n_head, d_attn);
    lmoe::Rng rng(seed);
    const int width = 3 * n_head * d_attn, N = B * T;
    const size_t n = (size_t)N * width;
    for (int direction : {+1, -1}) {
        const std::string what = direction > 0 ? "rope_forward" : "rope_backward";
        const std::vector<double> qkv = rounded<floatX>(random_normal(rng, n));
        DeviceBuffer<floatX> qkv_d = upload<floatX>(qkv);
        std::vector<double> ref_out = qkv;
        if (direction > 0) {
            lmoe::rope_forward(qkv_d.get(), B, T, n_head, d_attn, 0);
            ref::rope_forward(ref_out.data(), B, T, n_head, d_attn);
        } else {
            lmoe::rope_backward(qkv_d.get(), B, T, n_head, d_attn, 0);
            ref::rope_backward(ref_out.data(), B, T, n_head, d_attn);
        }
        const std::vector<double> got = to_double(qkv_d.download());
        expect_close(name + " " + what, got, ref_out);
        bool v_untouched = true;
        for (int t = 0; t < N; t++)
            for (int c = 2 * n_head * d_attn; c < width; c++)
                v_untouched &= got[(size_t)t * width + c] == qkv[(size_t)t * width + c];
        CHECK_MSG(v_untouched, name + ": " + what + " changed v");
    }
}

// ---------------------------------------------------------------------------------------------
// Timings: every input filled with the bytes 0x3F (about 0.75 in bf16 and fp32; the kernels have no
// data-dependent paths except the embedding backward's, which gets real repeated ids).

float median_ms(const std::function<void()>& launch) {
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    launch();  // warm-up
    std::vector<float> ms(20);
    for (float& m : ms) {
        CUDA_CHECK(cudaEventRecord(start, 0));
        launch();
        CUDA_CHECK(cudaEventRecord(stop, 0));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return 0.5f * (ms[9] + ms[10]);
}

void report(const char* what, float ms, double bytes) {
    std::printf("  %-46s %8.4f ms  %7.1f GB/s\n", what, ms, bytes / (ms * 1e-3) / 1e9);
}

template <class T>
DeviceBuffer<T> filled(size_t n) {
    DeviceBuffer<T> b(n);
    CUDA_CHECK(cudaMemset(b.get(), 0x3F, n * sizeof(T)));
    return b;
}

void time_kernels(int B, int T) {
    const int N = B * T, d = 1024, Vp = 50304, n_head = 8, d_attn = 128;
    const size_t n = (size_t)N * d, s = sizeof(floatX);
    std::printf("timings, N=%d (B=%d, T=%d), d=%d, %s:\n", N, B, T, d, gpu_test::kPrecision);
    lmoe::Rng rng(7);
    DeviceBuffer<int> tokens_d(N), same_d(N);
    tokens_d.upload(repeated_tokens(rng, N, Vp));
    same_d.upload(std::vector<int>(N, 11));
    auto wte = filled<floatX>((size_t)Vp * d), x = filled<floatX>(n), y = filled<floatX>(n), x2 = filled<floatX>(n);
    auto delta = filled<floatX>(n), dx = filled<floatX>(n), dy = filled<floatX>(n), g = filled<floatX>(d);
    auto dwte = filled<float>((size_t)Vp * d), dg = filled<float>(d), rstd = filled<float>(N);
    auto qkv = filled<floatX>((size_t)N * 3 * n_head * d_attn);
    DeviceBuffer<char> embed_scratch(lmoe::embedding_backward_scratch_bytes(N, Vp));
    DeviceBuffer<float> norm_scratch(lmoe::rmsnorm_backward_scratch_floats(N, d));

    report("embedding_forward", median_ms([&] { lmoe::embedding_forward(x.get(), tokens_d.get(), wte.get(), N, d, 0); }),
           2.0 * n * s);
    report("embedding_backward (half the ids among 5)", median_ms([&] {
               lmoe::embedding_backward(dwte.get(), dx.get(), tokens_d.get(), N, d, Vp, embed_scratch.get(), 0);
           }),
           n * s);
    report("embedding_backward (all ids equal: worst case)", median_ms([&] {
               lmoe::embedding_backward(dwte.get(), dx.get(), same_d.get(), N, d, Vp, embed_scratch.get(), 0);
           }),
           n * s);
    report("rmsnorm_forward",
           median_ms([&] { lmoe::rmsnorm_forward(y.get(), rstd.get(), x.get(), g.get(), N, d, 0); }), 2.0 * n * s);
    report("residual_rmsnorm_forward", median_ms([&] {
               lmoe::residual_rmsnorm_forward(x2.get(), y.get(), rstd.get(), x.get(), delta.get(), g.get(), N, d, 0);
           }),
           4.0 * n * s);
    report("rmsnorm_backward", median_ms([&] {
               lmoe::rmsnorm_backward(dx.get(), dg.get(), dy.get(), x.get(), g.get(), rstd.get(), N, d,
                                      norm_scratch.get(), 0);
           }),
           4.0 * n * s);
    const double rope_bytes = 2.0 * N * 2 * n_head * d_attn * s;  // q and k read and written
    report("rope_forward (n_head=8, d_attn=128)",
           median_ms([&] { lmoe::rope_forward(qkv.get(), B, T, n_head, d_attn, 0); }), rope_bytes);
    report("rope_backward", median_ms([&] { lmoe::rope_backward(qkv.get(), B, T, n_head, d_attn, 0); }), rope_bytes);
}

}  // namespace

int main() {
    gpu_test::skip_without_gpu();

    test_embedding("tiny", 64, 64, 256, 1);
    test_embedding("odd", 3000, 200, 7, 2);  // runs of one id across three sort chunks
    test_embedding("realistic", 2048, 1024, 50304, 3);
    test_embedding("realistic odd N", 2021, 1024, 50304, 4);

    test_rmsnorm("tiny", 64, 64, 5);
    test_rmsnorm("odd", 77, 200, 6);
    test_rmsnorm("odd, 2 rows per warp", 5003, 200, 11);
    test_rmsnorm("realistic", 2048, 1024, 7);

    test_rope("tiny", 2, 32, 4, 16, 8);
    test_rope("odd", 3, 37, 3, 24, 9);
    test_rope("realistic", 2, 1024, 8, 128, 10);

    time_kernels(2, 1024);
    time_kernels(64, 1024);
    return check::summary();
}
