// The routed MoE layer of moe_ep_baseline on the GPU against the CPU reference (SPEC §2.2, §8.3):
// the router (H = 1, D = d), the grouping of copies by expert, each grouped expert GEMM on its own
// (fed the GPU's own inputs, so errors do not compound), then the whole routed layer forward and
// backward against ref::routed_forward / routed_backward with the GPU's expert choices held fixed
// (a near-tie may legitimately flip between fp32 and double; those are counted, not failed).
// Outputs are poisoned before every run; weight gradients start from random values (they must be
// accumulated into, not overwritten); a second run must give the same bytes.
//   test_gpu_moe            the checks
//   test_gpu_moe --bench    also times each stage at SPEC §6's layer sizes (N = 8192 tokens)
//   test_gpu_moe --bench-only   the timings without the checks
#include <algorithm>
#include <cstring>
#include <string>

#include "dense/matmul.cuh"
#include "moe/combine.cuh"
#include "moe/grouped/grouped_gemm.cuh"
#include "moe/router.cuh"
#include "moe/routing_plan.cuh"
#include "cpu/reference.h"
#include "tests/gpu_test_utils.cuh"

using lmoe::DeviceBuffer;
using gpu_test::expect_close;
using gpu_test::rounded;
using gpu_test::upload;

struct Shape {
    const char* name;
    int M, d, E, f, k;
    bool starve_last = false;  // a large negative bias keeps every copy away from the last expert
    bool crowded = false;      // a large positive bias sends every token to the first k experts
};

// Device buffers of one routed MoE layer: the plan and the per-copy activations.
struct MoeLayer {
    Shape s;
    int64_t copies, max_tiles;
    DeviceBuffer<float> ds_copy, router_grad_scratch;
    DeviceBuffer<floatX> pre, h, o, d_o, dpre, dx_copy;
    lmoe::RoutingPlans plans;
    lmoe::RoutingPlan plan;
    explicit MoeLayer(const Shape& shape)
        : s(shape), plans(lmoe::RoutingPlans::routed(1, shape.M, 1, shape.E, shape.k)), plan(plans[0]) {
        copies = (int64_t)s.M * s.k;
        max_tiles = plan.max_tiles;
        ds_copy.resize(copies);
        router_grad_scratch.resize(lmoe::router_grad_scratch_size(s.E, s.d));
        pre.resize(copies * s.f); h.resize(copies * s.f); dpre.resize(copies * s.f);
        o.resize(copies * s.d); d_o.resize(copies * s.d); dx_copy.resize(copies * s.d);
    }
    void poison_all() {
        plans.poison();
        ds_copy.poison();
        for (auto* b : {&pre, &h, &o, &d_o, &dpre, &dx_copy}) b->poison();
    }
};

// The layer's tensors: inputs x (the normed tokens), dy and weights R, W1, W2, bias; outputs y, dx
// and gradients dR, dW1, dW2.
struct LayerTensors {
    DeviceBuffer<floatX> x, R, W1, W2, dy, y, dx;
    DeviceBuffer<float> bias, dR, dW1, dW2;
};

constexpr int kStages = 10;
const char* kStageNames[kStages] = {"route",          "group",           "up forward (W1, GELU)", "down forward (W2)",
                                    "weight + merge", "weight backward", "down backward (dpre, dW2)",
                                    "up backward (dX, dW1)", "router backward", "gather input grad"};

// Forward and backward of the routed layer, the stages of MoeFfn; events[i + 1] marks the end of stage i.
void routed_layer(MoeLayer& L, LayerTensors& T, cudaEvent_t* events = nullptr) {
    const Shape& s = L.s;
    cudaStream_t st = 0;
    auto mark = [&](int i) { if (events) CUDA_CHECK(cudaEventRecord(events[i + 1], st)); };
    if (events) CUDA_CHECK(cudaEventRecord(events[0], st));
    lmoe::router_forward(L.plan, T.x.get(), s.d, T.R.get(), T.bias.get(), s.d, st);
    mark(0);
    lmoe::group_copies(L.plan, st);
    mark(1);
    lmoe::expert_up_forward(L.pre.get(), L.h.get(), T.x.get(), s.d, T.W1.get(), L.plan, s.d, s.f, st);
    mark(2);
    lmoe::expert_down_forward(L.o.get(), L.h.get(), T.W2.get(), L.plan, s.d, s.f, st);
    mark(3);
    lmoe::combine_forward(T.y.get(), s.d, L.o.get(), L.plan, s.d, st);
    mark(4);
    lmoe::combine_backward(L.d_o.get(), L.ds_copy.get(), T.dy.get(), s.d, L.o.get(), L.plan, s.d, st);
    mark(5);
    lmoe::expert_down_backward(L.dpre.get(), T.dW2.get(), L.d_o.get(), L.h.get(), L.pre.get(), T.W2.get(), L.plan, s.d,
                               s.f, st);
    mark(6);
    lmoe::expert_up_backward(L.dx_copy.get(), T.dW1.get(), L.dpre.get(), T.x.get(), s.d, T.W1.get(), L.plan, s.d, s.f,
                             st);
    mark(7);
    lmoe::router_weight_backward(T.dR.get(), L.router_grad_scratch.get(), T.x.get(), s.d, L.ds_copy.get(), L.plan, s.d,
                                 st);
    mark(8);
    lmoe::gather_input_grad(T.dx.get(), s.d, L.dx_copy.get(), L.ds_copy.get(), T.R.get(), L.plan, s.d, st);
    mark(9);
}

// The plan must be a stable grouping: every copy once, in its expert's group, rows increasing.
void check_plan(const MoeLayer& L, const std::vector<int>& sel) {
    const Shape& s = L.s;
    auto offset = gpu_test::download(L.plan.group_offset, L.plan.groups() + 1), row = gpu_test::download(L.plan.copy_row, L.copies), pos = gpu_test::download(L.plan.copy_pos, L.copies);
    auto tg = gpu_test::download(L.plan.tile_group, L.max_tiles), ts = gpu_test::download(L.plan.tile_start, L.max_tiles);
    bool ok = offset[0] == 0 && offset[s.E] == L.copies;
    std::vector<int> seen(L.copies, 0);
    for (int t = 0; t < s.M; t++)
        for (int j = 0; j < s.k; j++) {
            const int64_t slot = (int64_t)t * s.k + j;
            const int p = pos[slot], e = sel[slot];
            if (p < 0 || p >= L.copies || e < 0 || e >= s.E) { ok = false; continue; }
            seen[p]++;
            ok &= row[p] == t && offset[e] <= p && p < offset[e + 1];
        }
    for (int64_t p = 0; p < L.copies; p++) ok &= seen[p] == 1;
    for (int e = 0; e < s.E; e++)
        for (int p = offset[e] + 1; p < offset[e + 1]; p++) ok &= row[p - 1] < row[p];
    CHECK_MSG(ok, std::string(s.name) + ": the grouping is not a stable partition of the copies by expert");
    int tiles = gpu_test::download(L.plan.num_tiles, 1)[0], expected = 0;
    for (int e = 0; e < s.E; e++) expected += (int)ceil_div(offset[e + 1] - offset[e], lmoe::kExpertTileRows);
    bool tiles_ok = tiles == expected && tiles <= L.max_tiles;
    for (int i = 0; tiles_ok && i < tiles; i++)
        tiles_ok &= ts[i] >= offset[tg[i]] && ts[i] < offset[tg[i] + 1] &&
                    (ts[i] - offset[tg[i]]) % lmoe::kExpertTileRows == 0;
    CHECK_MSG(tiles_ok, std::string(s.name) + ": the tile list does not cover the groups");
    if (s.starve_last)
        CHECK_MSG(offset[s.E] == offset[s.E - 1], std::string(s.name) + ": the starved expert received copies");
}

// got − start, element by element: what a kernel added to an accumulated gradient.
std::vector<double> increment(const DeviceBuffer<float>& got, const std::vector<float>& start) {
    std::vector<float> g = got.download();
    std::vector<double> out(g.size());
    for (size_t i = 0; i < g.size(); i++) out[i] = (double)g[i] - (double)start[i];
    return out;
}

// Each grouped GEMM against the reference in double, on the GPU's own inputs to that GEMM.
void check_grouped_gemms(const MoeLayer& L, const LayerTensors& T, const std::vector<double>& x,
                         const std::vector<double>& W1, const std::vector<double>& W2, const std::vector<float>& dW1_start,
                         const std::vector<float>& dW2_start) {
    const Shape& s = L.s;
    const int d = s.d, f = s.f;
    const int64_t C = L.copies;
    auto offset = gpu_test::download(L.plan.group_offset, L.plan.groups() + 1), row = gpu_test::download(L.plan.copy_row, L.copies);
    auto pre = gpu_test::to_double(L.pre.download()), h = gpu_test::to_double(L.h.download());
    auto d_o = gpu_test::to_double(L.d_o.download()), dpre = gpu_test::to_double(L.dpre.download());
    std::vector<int> expert(C);
    for (int e = 0; e < s.E; e++)
        for (int p = offset[e]; p < offset[e + 1]; p++) expert[p] = e;
    std::vector<double> ref_pre(C * f), ref_h(C * f), ref_o(C * d), ref_dpre(C * f), ref_dx(C * d);
#pragma omp parallel for
    for (int64_t p = 0; p < C; p++) {
        const double* W1e = W1.data() + (int64_t)expert[p] * f * d;  // (f, d)
        const double* W2e = W2.data() + (int64_t)expert[p] * d * f;  // (d, f)
        const double* xt = x.data() + (int64_t)row[p] * d;
        for (int n = 0; n < f; n++) {
            double acc = 0, dh = 0;
            for (int i = 0; i < d; i++) {
                acc += W1e[(int64_t)n * d + i] * xt[i];
                dh += d_o[p * d + i] * W2e[(int64_t)i * f + n];
            }
            ref_pre[p * f + n] = acc;
            ref_h[p * f + n] = ref::gelu(acc);
            ref_dpre[p * f + n] = dh * ref::gelu_grad(pre[p * f + n]);
        }
        for (int j = 0; j < d; j++) {
            double o = 0, dx = 0;
            for (int n = 0; n < f; n++) {
                o += h[p * f + n] * W2e[(int64_t)j * f + n];
                dx += dpre[p * f + n] * W1e[(int64_t)n * d + j];
            }
            ref_o[p * d + j] = o;
            ref_dx[p * d + j] = dx;
        }
    }
    std::vector<double> ref_dW1((size_t)s.E * f * d, 0.0), ref_dW2((size_t)s.E * d * f, 0.0);
#pragma omp parallel for
    for (int e = 0; e < s.E; e++)
        for (int p = offset[e]; p < offset[e + 1]; p++) {
            const double* xt = x.data() + (int64_t)row[p] * d;
            for (int n = 0; n < f; n++)
                for (int i = 0; i < d; i++) {
                    ref_dW1[((int64_t)e * f + n) * d + i] += dpre[p * f + n] * xt[i];
                    ref_dW2[((int64_t)e * d + i) * f + n] += d_o[p * d + i] * h[p * f + n];
                }
        }
    expect_close("pre = X_e W1_e^T", pre, ref_pre);
    expect_close("h = GELU(pre)", h, ref_h);
    expect_close("o = h W2_e^T", L.o, ref_o);
    expect_close("dpre = (dO W2_e) * GELU'(pre)", dpre, ref_dpre);
    expect_close("dx_copy = dpre W1_e", L.dx_copy, ref_dx);
    expect_close("dW2_e += dO^T h (increment)", increment(T.dW2, dW2_start), ref_dW2);
    expect_close("dW1_e += dpre^T X_e (increment)", increment(T.dW1, dW1_start), ref_dW1);
}

// The routing bias (E): N(0, scale²), then the shape's starved or crowded experts.
std::vector<float> routing_bias(const Shape& s, lmoe::Rng& rng, double scale) {
    std::vector<float> bias(s.E);
    for (float& b : bias) b = float(scale * rng.normal());
    if (s.starve_last) bias[s.E - 1] = -1e4f;
    if (s.crowded)
        for (int e = 0; e < s.k; e++) bias[e] += 100.f;
    return bias;
}

void run_shape(const Shape& s, lmoe::Rng& rng) {
    std::printf("%s: M %d, d %d, E %d, f %d, k %d\n", s.name, s.M, s.d, s.E, s.f, s.k);
    // inputs, rounded to what the GPU holds
    auto x = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.M * s.d));
    auto R = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.d * s.E, 1.0 / std::sqrt(s.d)));
    auto W1 = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.E * s.f * s.d, 1.0 / std::sqrt(s.d)));
    auto W2 = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.E * s.d * s.f, 1.0 / std::sqrt(s.f)));
    auto dy = rounded<floatX>(gpu_test::random_normal(rng, (size_t)s.M * s.d));
    const std::vector<float> bias = routing_bias(s, rng, 0.2);
    // gradients start from random values: the kernels must add to them
    auto start = [&](size_t n) {
        std::vector<float> v(n);
        for (float& g : v) g = float(rng.normal());
        return v;
    };
    const std::vector<float> dR0 = start(R.size()), dW10 = start(W1.size()), dW20 = start(W2.size());
    LayerTensors T{upload<floatX>(x), upload<floatX>(R), upload<floatX>(W1), upload<floatX>(W2), upload<floatX>(dy),
                   DeviceBuffer<floatX>((size_t)s.M * s.d), DeviceBuffer<floatX>((size_t)s.M * s.d),
                   DeviceBuffer<float>(bias.size()), DeviceBuffer<float>(R.size()), DeviceBuffer<float>(W1.size()),
                   DeviceBuffer<float>(W2.size())};
    T.bias.upload(bias);
    MoeLayer L(s);
    auto run_layer = [&] {
        L.poison_all();
        T.y.poison();
        T.dx.poison();
        T.dR.upload(dR0);
        T.dW1.upload(dW10);
        T.dW2.upload(dW20);
        routed_layer(L, T);
        CUDA_CHECK(cudaDeviceSynchronize());
    };
    run_layer();

    // Router: the choices must be the reference's top-k, except where the k-th and (k+1)-th biased
    // scores are within rounding of each other.
    auto sel = gpu_test::download(L.plan.sel, L.copies);
    int mismatched = 0, near_ties = 0;
    std::vector<double> logits(s.E);
    std::vector<int> ref_sel(s.k);
    for (int t = 0; t < s.M; t++) {
        ref::router_logits(logits.data(), x.data() + (int64_t)t * s.d, R.data(), s.d, s.E);
        ref::select_topk(ref_sel.data(), logits.data(), bias.data(), s.E, s.k);
        const int* got = sel.data() + (int64_t)t * s.k;
        if (std::equal(ref_sel.begin(), ref_sel.end(), got)) continue;
        std::vector<double> scores(s.E);
        for (int e = 0; e < s.E; e++) scores[e] = logits[e] + bias[e];
        std::sort(scores.rbegin(), scores.rend());
        bool tie = false;
        for (int j = 0; j < s.k && j + 1 < s.E; j++) tie |= scores[j] - scores[j + 1] < 1e-4 * (1 + std::abs(scores[j]));
        (tie ? near_ties : mismatched)++;
    }
    std::printf("  router: %d of %d choices differ from the reference (%d at near-ties)\n", mismatched + near_ties, s.M,
                near_ties);
    CHECK_MSG(mismatched == 0, std::string(s.name) + ": router top-k differs from the reference away from ties");
    check_plan(L, sel);

    check_grouped_gemms(L, T, x, W1, W2, dW10, dW20);

    // The whole routed layer against the reference, with the GPU's choices.
    std::vector<double> ref_y((size_t)s.M * s.d), ref_dx((size_t)s.M * s.d, 0.0), dR(R.size(), 0.0),
        dW1(W1.size(), 0.0), dW2(W2.size(), 0.0), gates((size_t)s.M * s.k);
    std::vector<int> frozen(sel);
    const ref::ExpertBank<double> bank{R.data(), W1.data(), W2.data(), bias.data(), s.E, s.k,
                                       ref::ExpertLayout{s.d, s.f, false}};
    const ref::ExpertBankGrad<double> grad{dR.data(), dW1.data(), dW2.data()};
    ref::routed_forward(ref_y.data(), s.d, x.data(), s.d, s.M, bank, frozen.data(), gates.data(), true);
    ref::routed_backward(ref_dx.data(), s.d, grad, dy.data(), s.d, x.data(), s.d, s.M, bank, frozen.data(), gates.data());
    auto gate_f = gpu_test::download(L.plan.gate, L.copies);
    expect_close("gates", std::vector<double>(gate_f.begin(), gate_f.end()), gates,
                 gpu_test::kPrecision[0] == 'f' ? 1e-5 : 1e-2);
    expect_close("y = sum_j w_j expert_j(x)", T.y, ref_y);
    expect_close("dx (experts + router)", T.dx, ref_dx);
    expect_close("dR (router, increment)", increment(T.dR, dR0), dR);
    expect_close("dW1 (expert_in, increment)", increment(T.dW1, dW10), dW1);
    expect_close("dW2 (expert_out, increment)", increment(T.dW2, dW20), dW2);

    // Bitwise reproducible: a second run gives the same bytes everywhere.
    auto same = [](const auto& a, const auto& b) {
        return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
    };
    const auto y1 = T.y.download(), dx1 = T.dx.download(), pre1 = L.pre.download(), h1 = L.h.download();
    const auto dpre1 = L.dpre.download(), dxc1 = L.dx_copy.download();
    const auto dR1 = T.dR.download(), dW11 = T.dW1.download(), dW21 = T.dW2.download();
    run_layer();
    CHECK_MSG(same(y1, T.y.download()) && same(dx1, T.dx.download()) && same(pre1, L.pre.download()) &&
                  same(h1, L.h.download()) && same(dpre1, L.dpre.download()) && same(dxc1, L.dx_copy.download()) &&
                  same(dR1, T.dR.download()) && same(dW11, T.dW1.download()) && same(dW21, T.dW2.download()),
              std::string(s.name) + ": a second run is not bitwise identical");
}

// ---------------------------------------------------------------------------------------------
// Benchmark (SPEC §6 layer sizes, N = 8192 tokens): median time of every stage, the expert GEMMs'
// rate, and for comparison the same products through cuBLAS.

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

void bench_shape(const Shape& s, lmoe::Rng& rng) {
    LayerTensors T{upload<floatX>(gpu_test::random_normal(rng, (size_t)s.M * s.d)),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.d * s.E, 0.02)),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.E * s.f * s.d, 0.02)),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.E * s.d * s.f, 0.02)),
                   upload<floatX>(gpu_test::random_normal(rng, (size_t)s.M * s.d)),
                   DeviceBuffer<floatX>((size_t)s.M * s.d), DeviceBuffer<floatX>((size_t)s.M * s.d),
                   DeviceBuffer<float>(s.E), DeviceBuffer<float>((size_t)s.d * s.E),
                   DeviceBuffer<float>((size_t)s.E * s.f * s.d), DeviceBuffer<float>((size_t)s.E * s.d * s.f)};
    T.bias.upload(routing_bias(s, rng, 0.0));
    for (auto* g : {&T.dR, &T.dW1, &T.dW2}) CUDA_CHECK(cudaMemset(g->get(), 0, g->size() * sizeof(float)));
    MoeLayer L(s);
    const int reps = 20;
    const std::vector<float> ms = gpu_test::time_stages(kStages, reps, [&](cudaEvent_t* ev) { routed_layer(L, T, ev); });
    auto offset = gpu_test::download(L.plan.group_offset, L.plan.groups() + 1);
    int most = 0;
    for (int e = 0; e < s.E; e++) most = std::max(most, offset[e + 1] - offset[e]);
    const double mean_rows = (double)L.copies / s.E;
    const double unit = 2.0 * L.copies * s.d * s.f;  // FLOPs of one (copies × d × f) product
    const double flops[kStages] = {2.0 * s.M * s.d * s.E, 0, unit, unit, 0, 0, 2 * unit, 2 * unit, 0, 0};
    std::printf("bench %s (N %d tokens, d %d, E %d, f %d, k %d; %s), median of %d; rows per expert: mean %.0f, max %d, "
                "imbalance (max/mean) %.2f\n",
                s.name, s.M, s.d, s.E, s.f, s.k, gpu_test::kPrecision, reps, mean_rows, most, most / mean_rows);
    for (int i = 0; i < kStages; i++) {
        const double t = ms[i];
        std::printf("  %-30s %8.3f ms", kStageNames[i], t);
        if (flops[i] > 0) std::printf("  %6.1f TFLOP/s", flops[i] / (t * 1e-3) / 1e12);
        std::printf("\n");
    }
    std::printf("  %-30s %8.3f ms  %6.1f TFLOP/s (forward + backward of the routed layer)\n", "total",
                ms[kStages], (3 * flops[0] + 6 * unit) / (ms[kStages] * 1e-3) / 1e12);

    // Each grouped GEMM kernel alone, on the plan of the last run.
    using lmoe::RowsEpilogue;
    const int d = s.d, f = s.f;
    auto kernel = [&](const char* name, auto&& launch) {
        const float t = gpu_test::time_ms(reps, launch);
        std::printf("  kernel %-23s %8.3f ms  %6.1f TFLOP/s\n", name, t, unit / (t * 1e-3) / 1e12);
    };
    kernel("pre, h = X W1^T, GELU", [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::Gelu, true, floatX>(
            {L.pre.get(), L.h.get(), nullptr, {T.x.get(), d, L.plan.copy_row}, T.W1.get(), d, f, L.plan}, 0);
    });
    kernel("o = h W2^T", [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::Store, true, floatX>(
            {L.o.get(), nullptr, nullptr, {L.h.get(), f, nullptr}, T.W2.get(), f, d, L.plan}, 0);
    });
    kernel("dpre = dO W2 * GELU'", [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::GeluGrad, false, floatX>(
            {L.dpre.get(), nullptr, L.pre.get(), {L.d_o.get(), d, nullptr}, T.W2.get(), d, f, L.plan}, 0);
    });
    kernel("dx_copy = dpre W1", [&] {
        lmoe::grouped_rows_gemm<RowsEpilogue::Store, false, floatX>(
            {L.dx_copy.get(), nullptr, nullptr, {L.dpre.get(), f, nullptr}, T.W1.get(), f, d, L.plan}, 0);
    });
    kernel("dW2 += dO^T h", [&] {
        lmoe::grouped_weight_grad<floatX>({T.dW2.get(), {L.d_o.get(), d, nullptr}, {L.h.get(), f, nullptr}, d, f,
                                           L.plan.group_offset}, s.E, 0);
    });
    kernel("dW1 += dpre^T X", [&] {
        lmoe::grouped_weight_grad<floatX>({T.dW1.get(), {L.dpre.get(), f, nullptr}, {T.x.get(), d, L.plan.copy_row}, f,
                                           d, L.plan.group_offset}, s.E, 0);
    });
    bench_cublas(s, L, T, reps, unit);
}

int main(int argc, char** argv) {
    gpu_test::skip_without_gpu();
    lmoe::Rng rng(2027);
    const Shape shapes[] = {
        {"tiny", 64, 64, 8, 32, 2},
        {"odd sizes, starved expert", 300, 200, 6, 72, 3, true},
        {"small", 512, 512, 32, 256, 4},
        {"p1 shape", 128, 1024, 64, 512, 8},
        {"p2 shape", 128, 1024, 128, 256, 16},
        {"crowded", 1024, 512, 32, 256, 4, false, true},
    };
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode != "--bench-only")
        for (const Shape& s : shapes) run_shape(s, rng);
    if (mode == "--bench" || mode == "--bench-only") {  // SPEC §6 layer benchmark sizes, N = 8192
        bench_shape({"p1", 8192, 1024, 64, 512, 8}, rng);
        bench_shape({"p2", 8192, 1024, 128, 256, 16}, rng);
        bench_shape({"p1 crowded", 8192, 1024, 64, 512, 8, false, true}, rng);  // the most skewed routing
        // the experts of one rank of Expert Parallel on 8 GPUs, balanced: 8 experts, 8192 copies each
        bench_shape({"p1 rank of 8", 8192, 1024, 8, 512, 8}, rng);
    }
    return check::summary();
}
