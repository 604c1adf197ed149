// RMSNorm (SPEC §2): y = g ⊙ x · r with r = 1/√(mean(x²) + 1e-5), one gain vector g per norm, and a
// fused variant that first adds a residual branch (llm.c's fused residual + layernorm). Statistics
// and sums are fp32; rows move 16 bytes at a time, so d must be a multiple of 8. The backward's
// dg goes through per-block partial sums and a fixed-order reduction: bitwise reproducible (SPEC §4).
#pragma once
#include <algorithm>
#include <cstdint>

#include "util/cuda_utils.cuh"

namespace lmoe {

namespace rmsnorm_detail {

constexpr float kEps = 1e-5f;
constexpr int kForwardRowsPerBlock = 8;  // one warp per row

// Backward: a block of kBackwardWarps warps handles kBackwardWarps · rows_per_warp consecutive rows and
// writes one dg partial. rows_per_warp grows with N (1 up to N = 4096, 16 from N = 32768) so that
// small batches still fill the GPU (≥ 256 blocks) and large ones leave at most 512 partials to
// reduce. It depends on N alone, never on the hardware, so the reduction order is fixed.
constexpr int kBackwardWarps = 8;
constexpr int kMaxBackwardWidth = 48 * 1024 / (kBackwardWarps * sizeof(float));  // per-warp dg rows in 48 KiB of smem
inline int backward_rows_per_warp(int N) { return (int)std::min<int64_t>(16, std::max<int64_t>(1, N / (kBackwardWarps * 256))); }
inline int backward_blocks(int N) { return (int)ceil_div(N, kBackwardWarps * backward_rows_per_warp(N)); }

// Butterfly sum over the warp: every lane gets the same, reproducible total.
__device__ inline float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// Given a row's Σx² (already reduced over the warp), writes r and y[col] = g[col] · x[col] · r.
// The warp's lane owns columns lane·kPack + 32·kPack·j.
__device__ inline void normalize_row(floatX* y_row, float* rstd_row, const floatX* x_row, const floatX* g,
                                     float sum_squares, int d, int lane) {
    const float r = 1.f / sqrtf(sum_squares / d + kEps);
    if (lane == 0) *rstd_row = r;
    for (int col = lane * kPack; col < d; col += 32 * kPack) {
        const Pack xp = *reinterpret_cast<const Pack*>(x_row + col);
        const Pack gp = *reinterpret_cast<const Pack*>(g + col);
        Pack yp;
#pragma unroll
        for (int k = 0; k < kPack; k++) yp.v[k] = from_float<floatX>(to_float(gp.v[k]) * to_float(xp.v[k]) * r);
        *reinterpret_cast<Pack*>(y_row + col) = yp;
    }
}

inline void check_width(int d, const char* call) {
    if (d <= 0 || d % 8 != 0) die("argument", "RMSNorm width d must be a positive multiple of 8", call, __FILE__, __LINE__);
}

}  // namespace rmsnorm_detail

// y = g ⊙ x · rstd, rstd = 1/√(mean(x²) + ε); one warp per row, x read twice (the second read hits L1).
// y, x: (N, d) floatX; g: (d) floatX; rstd: (N) fp32, kept for the backward.
__global__ void rmsnorm_forward_kernel(floatX* __restrict__ y, float* __restrict__ rstd, const floatX* __restrict__ x,
                                       const floatX* __restrict__ g, int N, int d) {
    using namespace rmsnorm_detail;
    const int lane = threadIdx.x % 32, row = blockIdx.x * kForwardRowsPerBlock + threadIdx.x / 32;
    if (row >= N) return;
    const floatX* x_row = x + (int64_t)row * d;
    float sum_squares = 0.f;
    for (int col = lane * kPack; col < d; col += 32 * kPack) {
        const Pack xp = *reinterpret_cast<const Pack*>(x_row + col);
#pragma unroll
        for (int k = 0; k < kPack; k++) sum_squares += to_float(xp.v[k]) * to_float(xp.v[k]);
    }
    normalize_row(y + (int64_t)row * d, rstd + row, x_row, g, warp_sum(sum_squares), d, lane);
}

inline void rmsnorm_forward(floatX* y, float* rstd, const floatX* x, const floatX* g, int N, int d,
                            cudaStream_t stream) {
    using namespace rmsnorm_detail;
    check_width(d, "rmsnorm_forward");
    if (N == 0) return;
    rmsnorm_forward_kernel<<<ceil_div(N, kForwardRowsPerBlock), 32 * kForwardRowsPerBlock, 0, stream>>>(y, rstd, x,
                                                                                                        g, N, d);
    CUDA_CHECK_LAUNCH();
}

// Residual add fused with the next norm: x_out = x_in + delta (rounded to floatX), then y and rstd are
// the RMSNorm of that rounded x_out, the values the backward will see. x_out may alias x_in (each
// element is read and then written by the same thread), so neither is __restrict__.
// x_out, x_in, delta, y: (N, d) floatX; g: (d) floatX; rstd: (N) fp32.
__global__ void residual_rmsnorm_forward_kernel(floatX* x_out, floatX* __restrict__ y, float* __restrict__ rstd,
                                                const floatX* x_in, const floatX* __restrict__ delta,
                                                const floatX* __restrict__ g, int N, int d) {
    using namespace rmsnorm_detail;
    const int lane = threadIdx.x % 32, row = blockIdx.x * kForwardRowsPerBlock + threadIdx.x / 32;
    if (row >= N) return;
    const int64_t offset = (int64_t)row * d;
    float sum_squares = 0.f;
    for (int col = lane * kPack; col < d; col += 32 * kPack) {
        const Pack xp = *reinterpret_cast<const Pack*>(x_in + offset + col);
        const Pack dp = *reinterpret_cast<const Pack*>(delta + offset + col);
        Pack sp;
#pragma unroll
        for (int k = 0; k < kPack; k++) {
            sp.v[k] = from_float<floatX>(to_float(xp.v[k]) + to_float(dp.v[k]));
            sum_squares += to_float(sp.v[k]) * to_float(sp.v[k]);
        }
        *reinterpret_cast<Pack*>(x_out + offset + col) = sp;
    }
    normalize_row(y + offset, rstd + row, x_out + offset, g, warp_sum(sum_squares), d, lane);
}

inline void residual_rmsnorm_forward(floatX* x_out, floatX* y, float* rstd, const floatX* x_in, const floatX* delta,
                                     const floatX* g, int N, int d, cudaStream_t stream) {
    using namespace rmsnorm_detail;
    check_width(d, "residual_rmsnorm_forward");
    if (N == 0) return;
    residual_rmsnorm_forward_kernel<<<ceil_div(N, kForwardRowsPerBlock), 32 * kForwardRowsPerBlock, 0, stream>>>(
        x_out, y, rstd, x_in, delta, g, N, d);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Backward, with r = rstd[t]:
//   dx[t] += r · (g ⊙ dy[t]) − x[t] · r³ · mean(x[t] ⊙ g ⊙ dy[t])     (accumulates: dx is the residual
//                                                                     stream's gradient)
//   dg    += Σ_t dy[t] ⊙ x[t] · r
// One warp per row. Each warp sums its rows' dg terms into its own row of shared memory (a lane owns
// its columns, so no two threads add to one word), the block adds its warps' rows in warp order and
// writes one partial per block; rmsnorm_dg_reduce_kernel adds the partials in block order.
// dx, dy, x: (N, d) floatX; g: (d) floatX; rstd: (N) fp32; dg_partial: (gridDim.x, d) fp32.
__global__ void __launch_bounds__(32 * rmsnorm_detail::kBackwardWarps)
    rmsnorm_backward_kernel(floatX* __restrict__ dx, float* __restrict__ dg_partial, const floatX* __restrict__ dy,
                            const floatX* __restrict__ x, const floatX* __restrict__ g,
                            const float* __restrict__ rstd, int N, int d, int rows_per_warp) {
    using namespace rmsnorm_detail;
    extern __shared__ float dg_warp[];  // (kBackwardWarps, d)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float* dg_mine = dg_warp + warp * d;
    for (int col = lane * kPack; col < d; col += 32 * kPack)
#pragma unroll
        for (int k = 0; k < kPack; k++) dg_mine[col + k] = 0.f;

    const int first_row = (blockIdx.x * kBackwardWarps + warp) * rows_per_warp;
    const int end_row = min(first_row + rows_per_warp, N);
    for (int row = first_row; row < end_row; row++) {
        const int64_t offset = (int64_t)row * d;
        const float r = rstd[row];
        float dot = 0.f;  // Σ x ⊙ g ⊙ dy over the row
        for (int col = lane * kPack; col < d; col += 32 * kPack) {
            const Pack xp = *reinterpret_cast<const Pack*>(x + offset + col);
            const Pack gp = *reinterpret_cast<const Pack*>(g + col);
            const Pack dyp = *reinterpret_cast<const Pack*>(dy + offset + col);
#pragma unroll
            for (int k = 0; k < kPack; k++) dot += to_float(xp.v[k]) * to_float(gp.v[k]) * to_float(dyp.v[k]);
        }
        const float x_coef = r * r * r * warp_sum(dot) / d;
        for (int col = lane * kPack; col < d; col += 32 * kPack) {  // second read of x, g, dy hits L1
            const Pack xp = *reinterpret_cast<const Pack*>(x + offset + col);
            const Pack gp = *reinterpret_cast<const Pack*>(g + col);
            const Pack dyp = *reinterpret_cast<const Pack*>(dy + offset + col);
            Pack dxp = *reinterpret_cast<const Pack*>(dx + offset + col);
#pragma unroll
            for (int k = 0; k < kPack; k++) {
                const float xv = to_float(xp.v[k]), dyv = to_float(dyp.v[k]);
                dxp.v[k] = from_float<floatX>(to_float(dxp.v[k]) + r * to_float(gp.v[k]) * dyv - xv * x_coef);
                dg_mine[col + k] += dyv * xv * r;
            }
            *reinterpret_cast<Pack*>(dx + offset + col) = dxp;
        }
    }
    __syncthreads();
    for (int col = threadIdx.x; col < d; col += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < kBackwardWarps; w++) sum += dg_warp[w * d + col];
        dg_partial[(int64_t)blockIdx.x * d + col] = sum;
    }
}

// dg[col] += Σ_b dg_partial[b, col]: 8 warps each add every 8th partial in increasing b, then the 8
// sums are added in warp order. The order is fixed by (n_partials, d) alone, so dg is reproducible.
// Block (32, 8) covers 32 columns.
__global__ void rmsnorm_dg_reduce_kernel(float* __restrict__ dg, const float* __restrict__ dg_partial,
                                         int n_partials, int d) {
    __shared__ float warp_total[8][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float sum = 0.f;
    if (col < d)
        for (int b = threadIdx.y; b < n_partials; b += 8) sum += dg_partial[(int64_t)b * d + col];
    warp_total[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < d) {
        float total = 0.f;
        for (int w = 0; w < 8; w++) total += warp_total[w][threadIdx.x];
        dg[col] += total;
    }
}

// Floats of scratch rmsnorm_backward needs: one dg partial of d floats per block (at most 512 blocks
// for N up to 65536).
inline size_t rmsnorm_backward_scratch_floats(int N, int d) { return (size_t)rmsnorm_detail::backward_blocks(N) * d; }

// dx (N, d) floatX += input gradient; dg (d) fp32 += gain gradient; scratch: rmsnorm_backward_scratch_floats.
inline void rmsnorm_backward(floatX* dx, float* dg, const floatX* dy, const floatX* x, const floatX* g,
                             const float* rstd, int N, int d, float* scratch, cudaStream_t stream) {
    using namespace rmsnorm_detail;
    check_width(d, "rmsnorm_backward");
    if (d > kMaxBackwardWidth)
        die("argument", "RMSNorm backward supports d <= 1536 (per-warp dg rows in 48 KiB of shared memory)",
            "rmsnorm_backward", __FILE__, __LINE__);
    if (N == 0) return;
    const int blocks = backward_blocks(N);
    const size_t smem = sizeof(float) * kBackwardWarps * d;
    rmsnorm_backward_kernel<<<blocks, 32 * kBackwardWarps, smem, stream>>>(dx, scratch, dy, x, g, rstd, N, d,
                                                                           backward_rows_per_warp(N));
    CUDA_CHECK_LAUNCH();
    rmsnorm_dg_reduce_kernel<<<ceil_div(d, 32), dim3(32, 8), 0, stream>>>(dg, scratch, blocks, d);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
