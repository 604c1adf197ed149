// Stage benchmark of the routed MoE layer of moe_ep_baseline (SPEC §2.2) at SPEC §6's layer sizes,
// N = 8192 tokens: the median time of every stage of forward + backward (as a step's first
// micro-batch: the expert weight gradients written), each grouped GEMM kernel alone with its rate
// (the weight gradients both adding and writing), and for comparison the same products through
// cuBLAS. Arguments name shapes to run alone (all without); without a GPU it exits 77.
#include <algorithm>
#include <cstdint>

#include "bench/bench_shapes.h"
#include "bench/routing_glue.cuh"
#include "dense/matmul.cuh"
#include "tests/moe_fixture.cuh"

using lmoe::DeviceBuffer;

// Inputs are seeded random normals: the timings depend on their sizes and on the routing they
// produce, not on the values.
constexpr uint64_t kSeed = 2027;

// The forward product pre_e = X_e W1_e^T and the weight gradient dW1_e += dpre_e^T X_e of every
// expert through cublasGemmGroupedBatchedEx, one group per expert. cuBLAS needs the per-expert sizes
// on the host (a synchronisation in a real step, left out here) and contiguous rows (X gathered
// into group order beforehand, also left out of the timing).
void bench_cublas(const Shape& s, const MoeLayer& L, const LayerTensors& T, int reps, double unit) {
#ifdef LMOE_FP32
    (void)s; (void)L; (void)T; (void)reps; (void)unit;
#else
    const int E = s.E, d = s.d, f = s.f;
    auto offset = gpu_test::download(L.plan.group_offset, L.plan.groups() + 1), row = gpu_test::download(L.plan.copy_row, L.copies);
    auto x = T.x.download();
    std::vector<floatX> xg((size_t)L.copies * d);
    for (int64_t p = 0; p < L.copies; p++) std::copy(x.begin() + (int64_t)row[p] * d, x.begin() + (int64_t)(row[p] + 1) * d, xg.begin() + p * d);
    DeviceBuffer<floatX> x_grouped(xg.size()), out((size_t)L.copies * f);
    x_grouped.upload(xg);
    DeviceBuffer<float> dW1((size_t)E * f * d);
    CUDA_CHECK(cudaMemset(dW1.get(), 0, dW1.size() * sizeof(float)));
    cublasHandle_t handle = lmoe::make_cublas_handle();
    std::vector<cublasOperation_t> op_t(E, CUBLAS_OP_T), op_n(E, CUBLAS_OP_N);
    std::vector<int> m(E), n(E), k(E), lda(E), ldb(E), ldc(E), ones(E, 1);
    std::vector<float> alpha(E, 1.f), beta(E, 0.f), beta_one(E, 1.f);
    std::vector<const void*> A(E), B(E);
    std::vector<void*> Cp(E);
    DeviceBuffer<const void*> dA(E), dB(E);
    DeviceBuffer<void*> dC(E);
    auto run = [&](const char* name, double units, const std::vector<cublasOperation_t>& ta,
                   const std::vector<cublasOperation_t>& tb, cudaDataType_t ctype, const std::vector<float>& b) {
        dA.upload(A); dB.upload(B); dC.upload(Cp);
        cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
        const float ms = gpu_test::time_ms(reps, [&] {
            status = cublasGemmGroupedBatchedEx(handle, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                                dA.get(), kCudaFloatX, lda.data(), dB.get(), kCudaFloatX, ldb.data(),
                                                b.data(), dC.get(), ctype, ldc.data(), E, ones.data(), CUBLAS_COMPUTE_32F);
        });
        if (status != CUBLAS_STATUS_SUCCESS) std::printf("  cuBLAS grouped %-23s %s\n", name, cublasGetStatusString(status));
        else std::printf("  cuBLAS grouped %-23s %8.3f ms  %6.1f TFLOP/s\n", name, ms, units * unit / (ms * 1e-3) / 1e12);
    };
    // pre_e (rows × f) row-major = column-major (f × rows) = op_T(W1_e as d × f) · X_e^T (d × rows)
    for (int e = 0; e < E; e++) {
        m[e] = f; n[e] = offset[e + 1] - offset[e]; k[e] = d; lda[e] = d; ldb[e] = d; ldc[e] = f;
        A[e] = T.W1.get() + (int64_t)e * f * d; B[e] = x_grouped.get() + (int64_t)offset[e] * d;
        Cp[e] = out.get() + (int64_t)offset[e] * f;
    }
    run("pre = X_e W1_e^T", 1, op_t, op_n, kCudaFloatX, beta);
    // dW1_e (f × d) row-major = column-major (d × f) += X_e^T (d × rows) · op_T(dpre_e as f × rows)
    for (int e = 0; e < E; e++) {
        m[e] = d; n[e] = f; k[e] = offset[e + 1] - offset[e]; lda[e] = d; ldb[e] = f; ldc[e] = d;
        A[e] = x_grouped.get() + (int64_t)offset[e] * d; B[e] = L.dpre.get() + (int64_t)offset[e] * f;
        Cp[e] = dW1.get() + (int64_t)e * f * d;
    }
    run("dW1_e += dpre^T X_e", 1, op_n, op_t, CUDA_R_32F, beta_one);
    // The ceiling: one dense GEMM of all copies through one expert's W1 (same FLOPs, no grouping).
    const float ms = gpu_test::time_ms(reps, [&] {
        lmoe::matmul_forward(handle, out.get(), x_grouped.get(), T.W1.get(), (int)L.copies, d, f, 0);
    });
    std::printf("  cuBLAS dense  %-24s %8.3f ms  %6.1f TFLOP/s\n", "(copies × d) W^T", ms, unit / (ms * 1e-3) / 1e12);
    cublasDestroy(handle);
#endif
}

// Median time of each stage at a benchmark size with the grouped GEMMs' rate, each grouped GEMM
// kernel and each routing-glue kernel alone, then bench_cublas.
void bench_shape(const Shape& s, lmoe::Rng& rng) {
    LayerTensors T = upload_layer(s, random_inputs(s, rng, kBenchScales));
    for (auto* g : {&T.dR, &T.dW1, &T.dW2}) CUDA_CHECK(cudaMemset(g->get(), 0, g->size() * sizeof(float)));
    MoeLayer L(s);
    const int reps = 20;
    const std::vector<float> ms = gpu_test::time_stages(kStages, reps, [&](cudaEvent_t* ev) { routed_layer(L, T, false, ev); });
    auto offset = gpu_test::download(L.plan.group_offset, L.plan.groups() + 1);
    int most = 0;
    for (int e = 0; e < s.E; e++) most = std::max(most, offset[e + 1] - offset[e]);
    const double mean_rows = (double)L.copies / s.E;
    const double unit = 2.0 * L.copies * s.d * s.f;  // FLOPs of one (copies × d × f) product
    const double flops[kStages] = {2.0 * s.M * s.d * s.E, 0, unit, unit, 0, 0, 2 * unit, 2 * unit, 0, 0};
    std::printf("bench %s (N %d tokens, d %d, E %d, f %d, k %d; %s), median of %d; rows per expert: mean %.0f, max %d, "
                "imbalance (max/mean) %.2f\n",
                s.name, s.M, s.d, s.E, s.f, s.k, gpu_test::kPrecision, reps, mean_rows, most, most / mean_rows);
    gpu_test::print_stages(kStages, kStageNames, ms, flops);
    std::printf("  %-30s %8.3f ms  %6.1f TFLOP/s (forward + backward of the routed layer)\n", "total",
                ms[kStages], (3 * flops[0] + 6 * unit) / (ms[kStages] * 1e-3) / 1e12);

    // Each grouped GEMM kernel alone, on the plan of the last run.
    using gpu_test::time_kernel;
    using lmoe::RowsEpilogue;
    const int d = s.d, f = s.f;
    time_kernel("pre, h = X W1^T, GELU", reps, unit, [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::Gelu, true, floatX>(
            {L.pre.get(), L.h.get(), nullptr, {T.x.get(), d, L.plan.copy_row}, T.W1.get(), d, f, L.plan}, 0);
    });
    time_kernel("o = h W2^T", reps, unit, [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::Store, true, floatX>(
            {L.o.get(), nullptr, nullptr, {L.h.get(), f, nullptr}, T.W2.get(), f, d, L.plan}, 0);
    });
    time_kernel("dpre = dO W2 * GELU'", reps, unit, [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::GeluGrad, false, floatX>(
            {L.dpre.get(), nullptr, L.pre.get(), {L.d_o.get(), d, nullptr}, T.W2.get(), d, f, L.plan}, 0);
    });
    time_kernel("dx_copy = dpre W1", reps, unit, [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::Store, false, floatX>(
            {L.dx_copy.get(), nullptr, nullptr, {L.dpre.get(), f, nullptr}, T.W1.get(), f, d, L.plan}, 0);
    });
    for (const bool accumulate : {true, false}) {
        time_kernel(accumulate ? "dW2 += dO^T h" : "dW2 = dO^T h", reps, unit, [&] {
            lmoe::grouped_weight_grad<floatX>({T.dW2.get(), {L.d_o.get(), d, nullptr}, {L.h.get(), f, nullptr}, d, f,
                                               L.plan.group_offset, accumulate}, s.E, 0);
        });
        time_kernel(accumulate ? "dW1 += dpre^T X" : "dW1 = dpre^T X", reps, unit, [&] {
            lmoe::grouped_weight_grad<floatX>({T.dW1.get(), {L.dpre.get(), f, nullptr}, {T.x.get(), d, L.plan.copy_row},
                                               f, d, L.plan.group_offset, accumulate}, s.E, 0);
        });
    }
    time_routing_glue({L.plan, T.x.get(), T.R.get(), T.bias.get(), d, d, L.o.get(), T.y.get(), T.dy.get(), L.d_o.get(),
                       L.dx_copy.get(), T.dx.get(), L.router_t.get(), L.ds_copy.get(), T.dR.get(),
                       L.router_grad_scratch.get()},
                      reps);
    bench_cublas(s, L, T, reps, unit);
}

int main(int argc, char** argv) {
    const std::vector<Shape> shapes = {
        {"p1", 8192, 1024, 64, 512, 8},
        {"p2", 8192, 1024, 128, 256, 16},
        {"p1 crowded", 8192, 1024, 64, 512, 8, false, true},  // the most skewed routing
        // the experts of one rank of Expert Parallel on 8 GPUs, balanced: 8 experts, 8192 copies each
        {"p1 rank of 8", 8192, 1024, 8, 512, 8},
    };
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(kSeed);
    return run_bench_shapes(argc, argv, shapes, [&](const Shape& s) { bench_shape(s, rng); });
}
