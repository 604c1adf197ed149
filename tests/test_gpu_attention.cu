// GPU tests of dense/matmul.cuh (the cuBLAS dense matmuls) and dense/attention.cuh (causal flash
// attention), each against the CPU reference in double on exactly the rounded inputs the GPU sees:
// outputs poisoned before every call, odd sizes next to realistic ones, and every result computed
// twice and compared byte for byte (determinism). Prints median timings of the realistic sizes (the
// attention's not in the fp32 check build).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "dense/attention.cuh"
#include "dense/matmul.cuh"
#include "cpu/reference.h"
#include "tests/gpu_test_utils.cuh"

using gpu_test::expect_close;
using gpu_test::random_normal;
using gpu_test::rounded;
using gpu_test::to_double;
using gpu_test::upload;
using lmoe::DeviceBuffer;

template <class T>
void expect_same_bytes(const std::string& what, const DeviceBuffer<T>& a, const DeviceBuffer<T>& b) {
    std::vector<T> ha = a.download(), hb = b.download();
    bool same = ha.size() == hb.size() && std::memcmp(ha.data(), hb.data(), ha.size() * sizeof(T)) == 0;
    std::printf("  %-44s %s\n", (what + ": two runs bitwise equal").c_str(), same ? "yes" : "NO");
    CHECK_MSG(same, what + ": two runs differ");
}

// Median over 20 timed runs (after one warm-up), in milliseconds, measured with CUDA events.
double median_ms(const std::function<void()>& body) {
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    body();
    std::vector<float> ms(20);
    for (float& m : ms) {
        CUDA_CHECK(cudaEventRecord(start));
        body();
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return 0.5 * (ms[9] + ms[10]);
}

// ---------------------------------------------------------------------------------------------
// matmul_forward / matmul_backward

void test_matmul(cublasHandle_t handle, lmoe::Rng& rng, int N, int I, int O, bool accumulate_dx, bool time_it) {
    std::printf("matmul N=%d I=%d O=%d, %s dx\n", N, I, O, accumulate_dx ? "accumulating into" : "writing");
    const std::string tag = "(" + std::to_string(N) + "x" + std::to_string(I) + "x" + std::to_string(O) + ")";
    std::vector<double> x = rounded<floatX>(random_normal(rng, (size_t)N * I));
    std::vector<double> W = rounded<floatX>(random_normal(rng, (size_t)O * I));
    std::vector<double> dout = rounded<floatX>(random_normal(rng, (size_t)N * O));
    // Existing gradients of the size of one product, so an overwrite instead of += shows up.
    std::vector<double> dx0 = rounded<floatX>(random_normal(rng, (size_t)N * I, std::sqrt((double)O)));
    std::vector<double> dW0 = rounded<float>(random_normal(rng, (size_t)O * I, std::sqrt((double)N)));
    DeviceBuffer<floatX> d_x = upload<floatX>(x), d_W = upload<floatX>(W), d_dout = upload<floatX>(dout);

    // Forward.
    std::vector<double> out_ref((size_t)N * O);
    ref::matmul_forward(out_ref.data(), x.data(), W.data(), N, I, O);
    DeviceBuffer<floatX> out((size_t)N * O), out2((size_t)N * O);
    out.poison();
    lmoe::matmul_forward(handle, out.get(), d_x.get(), d_W.get(), N, I, O, 0);
    expect_close("matmul_forward out " + tag, out, out_ref);
    out2.poison();
    lmoe::matmul_forward(handle, out2.get(), d_x.get(), d_W.get(), N, I, O, 0);
    expect_same_bytes("matmul_forward out", out, out2);

    // Backward: dx written or accumulated, dW accumulated onto dW0.
    std::vector<double> dx_ref = accumulate_dx ? dx0 : std::vector<double>((size_t)N * I, 0.0);
    std::vector<double> dW_ref = dW0;
    ref::matmul_backward(dx_ref.data(), dW_ref.data(), dout.data(), x.data(), W.data(), N, I, O);
    auto run_backward = [&](DeviceBuffer<floatX>& dx, DeviceBuffer<float>& dW, bool with_dx) {
        if (accumulate_dx) dx.upload(gpu_test::to_device_type<floatX>(dx0));
        else dx.poison();
        dW.upload(gpu_test::to_device_type<float>(dW0));
        lmoe::matmul_backward(handle, with_dx ? dx.get() : nullptr, dW.get(), d_dout.get(), d_x.get(), d_W.get(), N,
                              I, O, accumulate_dx, 0);
    };
    DeviceBuffer<floatX> dx((size_t)N * I), dx2((size_t)N * I);
    DeviceBuffer<float> dW((size_t)O * I), dW2((size_t)O * I);
    run_backward(dx, dW, true);
    expect_close(std::string("matmul_backward dx ") + (accumulate_dx ? "+= " : "= ") + tag, dx, dx_ref);
    expect_close("matmul_backward dW += " + tag, dW, dW_ref);
    run_backward(dx2, dW2, true);
    expect_same_bytes("matmul_backward dx", dx, dx2);
    expect_same_bytes("matmul_backward dW", dW, dW2);
    run_backward(dx2, dW2, false);  // dx = null: dW alone, the same bits
    expect_same_bytes("matmul_backward dW (dx null) vs with dx", dW, dW2);

    if (time_it) {
        const double fwd = median_ms([&] {
            lmoe::matmul_forward(handle, out.get(), d_x.get(), d_W.get(), N, I, O, 0);
        });
        const double bwd = median_ms([&] {
            lmoe::matmul_backward(handle, dx.get(), dW.get(), d_dout.get(), d_x.get(), d_W.get(), N, I, O,
                                  accumulate_dx, 0);
        });
        const double flop = 2.0 * N * I * O;
        std::printf("  timing %s: forward %.3f ms (%.0f TFLOP/s), backward %.3f ms (%.0f TFLOP/s), median of 20\n",
                    tag.c_str(), fwd, flop / fwd * 1e-9, bwd, 2 * flop / bwd * 1e-9);
    }
}

// ---------------------------------------------------------------------------------------------
// attention_forward / attention_backward

// Columns [part·C, (part+1)·C) of every row of a (rows, 3·C) matrix: one of q, k, v (or dq, dk, dv).
std::vector<double> part_of(const std::vector<double>& qkv, int rows, int C, int part) {
    std::vector<double> out((size_t)rows * C);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < C; c++) out[(size_t)r * C + c] = qkv[(size_t)r * 3 * C + part * C + c];
    return out;
}

// log2 Σ_{s≤t} exp(q_t·k_s / √da) per (b, h, t), in double: the lse attention_forward keeps.
std::vector<double> log2_sum_exp(const std::vector<double>& qkv, int B, int T, int nh, int da) {
    const int C = nh * da;
    std::vector<double> lse((size_t)B * nh * T), scores(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int t = 0; t < T; t++) {
                const double* q = &qkv[((size_t)b * T + t) * 3 * C + h * da];
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s <= t; s++) {
                    const double* k = &qkv[((size_t)b * T + s) * 3 * C + C + h * da];
                    double dot = 0;
                    for (int i = 0; i < da; i++) dot += q[i] * k[i];
                    scores[s] = dot / std::sqrt((double)da);
                    mx = std::max(mx, scores[s]);
                }
                for (int s = 0; s <= t; s++) sum += std::exp(scores[s] - mx);
                lse[((size_t)b * nh + h) * T + t] = (mx + std::log(sum)) / std::log(2.0);
            }
    return lse;
}

// Against the CPU reference (which keeps the (T, T) probabilities; the GPU never does): out, lse,
// and dq, dk, dv judged apart (their scales differ); every output poisoned first and computed twice.
void test_attention(lmoe::Rng& rng, int B, int T, int nh, int da) {
    std::printf("attention B=%d T=%d nh=%d da=%d\n", B, T, nh, da);
    const std::string tag = "(B" + std::to_string(B) + " T" + std::to_string(T) + " da" + std::to_string(da) + ")";
    const int C = nh * da, N = B * T;
    std::vector<double> qkv = rounded<floatX>(random_normal(rng, (size_t)N * 3 * C));
    std::vector<double> dout = rounded<floatX>(random_normal(rng, (size_t)N * C));
    DeviceBuffer<floatX> d_qkv = upload<floatX>(qkv), d_dout = upload<floatX>(dout);

    std::vector<double> out_ref((size_t)N * C), probs_ref((size_t)B * nh * T * T);
    ref::attention_forward(out_ref.data(), probs_ref.data(), qkv.data(), B, T, nh, da);
    DeviceBuffer<floatX> out((size_t)N * C), out2((size_t)N * C);
    DeviceBuffer<float> lse((size_t)B * nh * T), lse2((size_t)B * nh * T);
    auto run_forward = [&](DeviceBuffer<floatX>& o, DeviceBuffer<float>& l) {
        o.poison();
        l.poison();
        lmoe::attention_forward(o.get(), l.get(), d_qkv.get(), B, T, nh, da, 0);
    };
    run_forward(out, lse);
    expect_close("attention_forward out " + tag, out, out_ref);
    expect_close("attention_forward lse " + tag, lse, log2_sum_exp(qkv, B, T, nh, da));
    run_forward(out2, lse2);
    expect_same_bytes("attention_forward out", out, out2);
    expect_same_bytes("attention_forward lse", lse, lse2);

    std::vector<double> dqkv_ref((size_t)N * 3 * C, 0.0);
    ref::attention_backward(dqkv_ref.data(), dout.data(), qkv.data(), probs_ref.data(), B, T, nh, da);
    DeviceBuffer<floatX> dqkv((size_t)N * 3 * C), dqkv2((size_t)N * 3 * C);
    DeviceBuffer<char> scratch(lmoe::attention_scratch_bytes(B, T, nh));
    auto run_backward = [&](DeviceBuffer<floatX>& d) {
        d.poison();
        scratch.poison();
        lmoe::attention_backward(d.get(), scratch.get(), d_dout.get(), out.get(), lse.get(), d_qkv.get(), B, T, nh,
                                 da, 0);
    };
    run_backward(dqkv);
    std::vector<double> dqkv_gpu = to_double(dqkv.download());
    const char* names[3] = {"dq", "dk", "dv"};
    for (int p = 0; p < 3; p++) {
        const std::string what = std::string("attention_backward ") + names[p] + " " + tag;
        if (T == 1 && p < 2) {
            // One key: P = 1 and dS = dP − δ = do·v − do·o = 0, up to the rounding of o; no relative error.
            double largest = 0;
            for (double x : part_of(dqkv_gpu, N, C, p)) largest = std::max(largest, std::fabs(x));
            std::printf("  %-44s max |x| %.2e (zero up to rounding)\n", what.c_str(), largest);
            CHECK_MSG(largest <= 1e-2, what + ": not zero");
        } else {
            expect_close(what, part_of(dqkv_gpu, N, C, p), part_of(dqkv_ref, N, C, p));
        }
    }
    run_backward(dqkv2);
    expect_same_bytes("attention_backward dqkv", dqkv, dqkv2);
}

// Forward and backward timed at B·T = 8192 tokens; the FLOPs count the causal half of each (T × T × da)
// product: two in the forward, five in the backward (the recomputed S and dP not counted).
void time_attention(lmoe::Rng& rng, int B, int T, int nh, int da) {
    const int C = nh * da, N = B * T;
    DeviceBuffer<floatX> qkv = upload<floatX>(random_normal(rng, (size_t)N * 3 * C));
    DeviceBuffer<floatX> dout = upload<floatX>(random_normal(rng, (size_t)N * C));
    DeviceBuffer<floatX> out((size_t)N * C), dqkv((size_t)N * 3 * C);
    DeviceBuffer<float> lse((size_t)B * nh * T);
    DeviceBuffer<char> scratch(lmoe::attention_scratch_bytes(B, T, nh));
    const double fwd = median_ms([&] { lmoe::attention_forward(out.get(), lse.get(), qkv.get(), B, T, nh, da, 0); });
    const double bwd = median_ms([&] {
        lmoe::attention_backward(dqkv.get(), scratch.get(), dout.get(), out.get(), lse.get(), qkv.get(), B, T, nh, da,
                                 0);
    });
    const double product = 2.0 * B * nh * da * (double)T * (T + 1) / 2;
    std::printf("  timing attention B=%d T=%d nh=%d da=%d: forward %.3f ms (%.0f TFLOP/s), backward %.3f ms "
                "(%.0f TFLOP/s), forward+backward %.3f ms, median of 20\n",
                B, T, nh, da, fwd, 2 * product / fwd * 1e-9, bwd, 5 * product / bwd * 1e-9, fwd + bwd);
}

int main() {
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(1234);
    cublasHandle_t handle = lmoe::make_cublas_handle();

    test_matmul(handle, rng, 67, 96, 45, false, false);
    test_matmul(handle, rng, 67, 96, 45, true, false);
    test_matmul(handle, rng, 8192, 1024, 3072, false, true);
    test_attention(rng, 1, 1, 2, 64);      // one token
    test_attention(rng, 2, 37, 3, 16);     // T not a multiple of the 64-row tiles
    test_attention(rng, 3, 130, 2, 32);
    test_attention(rng, 2, 200, 4, 64);
    test_attention(rng, 2, 97, 2, 128);
    test_attention(rng, 1, 4096, 2, 128);
    test_attention(rng, 1, 1000, 3, 64);
    test_attention(rng, 2, 128, 2, 64);    // whole tiles, no tail, at each head size below 128
    // Hopper's 128-query blocks (two warpgroups of 64): tails of one row, of under 64 rows (the second
    // warpgroup past T), of exactly 64, and one token, at both head sizes
    test_attention(rng, 2, 257, 2, 128);
    test_attention(rng, 2, 65, 2, 64);
    test_attention(rng, 2, 150, 2, 128);
    test_attention(rng, 2, 192, 2, 64);
    test_attention(rng, 1, 1, 2, 128);
    test_attention(rng, 2, 64, 2, 128);
    test_attention(rng, 2, 64, 3, 32);
    test_attention(rng, 3, 64, 2, 16);
#ifdef LMOE_FP32
    // the check build's SIMT kernels are not what a run measures, and timing them is slow
    std::printf("  timing attention skipped in the fp32 build\n");
#else
    for (int T : {1024, 4096, 8192}) time_attention(rng, 8192 / T, T, 8, 128);  // the p1 attention, T grown
#endif

    CUBLAS_CHECK(cublasDestroy(handle));
    return check::summary();
}
