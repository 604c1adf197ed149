// Causal multi-head attention (SPEC §2), forward and backward, as flash attention: no (T, T) matrix
// is ever stored. Per batch row b and head h, with scale c = 1/√da and queries t, keys s ≤ t:
//   S[t, s] = c · q_t · k_s,   P[t, s] = exp(S[t, s] − lse_t),   lse_t = log Σ_{s≤t} exp S[t, s]
//   o_t     = Σ_{s≤t} P[t, s] v_s
// The forward walks the key blocks of a block of queries with an online softmax (a running maximum
// m and sum ℓ per row; each new maximum rescales what is accumulated), and keeps only lse per row.
// The backward recomputes P from q, k and lse:
//   δ_t = do_t · o_t                                 (attention_delta_kernel)
//   dP[t, s] = do_t · v_s,   dS[t, s] = P[t, s] (dP[t, s] − δ_t)
//   dv_s = Σ_{t≥s} P[t, s] do_t,   dk_s = c Σ_{t≥s} dS[t, s] q_t     one block per key block
//   dq_t = c Σ_{s≤t} dS[t, s] k_s                                    one block per query block
// Each output row is owned by one block that sums over its partner rows in a fixed order: no
// atomics, bitwise reproducible. The price is that S and dP are computed twice in the backward
// (seven (T × T × da) products instead of five), which costs less than the (T, T) traffic it saves.
//
// Inside the kernels the softmax works in base 2 (exp2 is one instruction): S and lse are kept
// multiplied by log2(e), so lse[b, h, t] as stored is log2 Σ exp2(log2(e) · S).
//
// Two implementations of the same arithmetic:
//   bf16 (the default build): tensor cores (mma.sync m16n8k16, tc/warp_tile.cuh) on 64-row tiles in
//     shared memory, filled by cp.async one key (or query) block ahead. P and dS are rounded to bf16
//     as the A operands of the next product, straight from the accumulators (they never leave
//     registers); every sum is fp32. On Hopper (an sm_90a build, head sizes 64 and 128) all three
//     kernels run on wgmma instead, warp-specialised (a TMA producer warpgroup and two consumer
//     warpgroups; "Hopper kernels" below): the forward and dq on 128 queries per block, dk/dv on 128
//     keys, P (P^T, dS, dS^T) in register A operands.
//   fp32 (the LMOE_FP32 check build): one thread per query (or key) row, plain fp32 loops, so that
//     the whole model can be checked tightly against the CPU reference.
// Both read q, k, v in place from the (B, T, 3·C) qkv rows and write (B, T, C) and (B, T, 3·C) rows:
// no permutes. Head sizes 16, 32, 64 and 128 (attention_head_size_supported).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "tc/tma.cuh"
#include "tc/warp_tile.cuh"
#include "tc/wgmma.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

inline bool attention_head_size_supported(int da) { return da == 16 || da == 32 || da == 64 || da == 128; }

namespace attention_detail {

constexpr float kLog2e = 1.4426950408889634f;

// Calls body(std::integral_constant<int, D>) for the supported head size D == da.
template <class Body>
void with_head_size(int da, Body body) {
    switch (da) {
        case 16: body(std::integral_constant<int, 16>()); break;
        case 32: body(std::integral_constant<int, 32>()); break;
        case 64: body(std::integral_constant<int, 64>()); break;
        case 128: body(std::integral_constant<int, 128>()); break;
        default:
            std::fprintf(stderr, "attention: head size %d is not supported (16, 32, 64 or 128)\n", da);
            std::exit(1);
    }
}

// δ[b, h, t] = Σ_i dout[b, t, h·da + i] · out[b, t, h·da + i], one thread per (b, t, h), fp32.
__global__ void attention_delta_kernel(float* delta, const floatX* dout, const floatX* out, int B, int T, int nh,
                                       int da) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // walks (b, t, h)
    if (idx >= (int64_t)B * T * nh) return;
    const int h = idx % nh;
    const int64_t bt = idx / nh;
    const int b = bt / T, t = bt % T;
    const Pack* dp = reinterpret_cast<const Pack*>(dout + idx * da);
    const Pack* op = reinterpret_cast<const Pack*>(out + idx * da);
    float sum = 0.f;
    for (int c = 0; c < da / kPack; c++) {
        const Pack x = dp[c], y = op[c];
        for (int j = 0; j < kPack; j++) sum += to_float(x.v[j]) * to_float(y.v[j]);
    }
    delta[((int64_t)b * nh + h) * T + t] = sum;
}

}  // namespace attention_detail

// Scratch of attention_backward: δ, (B, nh, T) fp32.
inline size_t attention_scratch_bytes(int B, int T, int nh) { return (size_t)B * nh * T * sizeof(float); }

#ifndef LMOE_FP32
// ---------------------------------------------------------------------------------------------
// Tensor-core kernels. A block has 4 warps; each warp owns 16 rows of the block's 64 (queries in
// the forward and in dq, keys in dk/dv) and holds their accumulators, fragment layout as in
// tc/mma.cuh: lane (g = lane/4, q = lane%4) holds rows g and g+8, columns 2q and 2q+1 of each 8-wide
// n-tile. Tiles are [row][da] bf16 in shared memory with rows padded by 8 (tc/warp_tile.cuh).
namespace attention_detail {

constexpr int kThreads = 128, kRows = 64;  // rows per block, 16 per warp
// Partner rows per step of the dk/dv kernel: 32 at da = 128 keeps its four accumulators in registers.
template <int D>
constexpr int kDkdvStep = D == 128 ? 32 : 64;

// Rows t0.. of part `part` (0 q, 1 k, 2 v) of head h, batch row b, in qkv (B, T, 3C): row r at
// qkv_rows(...) + r · 3C.
__device__ inline const bf16* qkv_rows(const bf16* qkv, int part, int b, int h, int t0, int T, int nh, int D) {
    return qkv + ((int64_t)b * T + t0) * 3 * nh * D + (int64_t)part * nh * D + h * D;
}

// Issues the copies of n (≤ ROWS) rows with stride `stride` into a padded tile, zeros past n.
template <int D, int ROWS>
__device__ inline void load_strided_rows(bf16* tile, const bf16* src, int n, int64_t stride) {
    load_rows_async<D, ROWS, kThreads>(tile, src, n, [stride](int r) { return r * stride; });
}

// Writes this warp's 16 accumulator rows × D, times `scale`, to rows row0 + r of dst (row stride
// `stride`), rows below `rows` only.
template <int D>
__device__ inline void store_warp_rows(bf16* dst, int64_t stride, const float (&acc)[1][D / 8][4], int row0,
                                       int rows, float scale) {
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = row0 + g + 8 * half;
        if (row >= rows) continue;
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++)
            *reinterpret_cast<uint32_t*>(dst + row * stride + nt * 8 + 2 * q) =
                pack_bf16x2(scale * acc[0][nt][2 * half], scale * acc[0][nt][2 * half + 1]);
    }
}

template <int W>
__device__ inline void zero(float (&acc)[1][W / 8][4]) {
#pragma unroll
    for (int nt = 0; nt < W / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[0][nt][i] = 0.f;
}

// The key-block pipeline of the forward and of dq, at key block kb of 0..last: issues the copies of
// block kb+1's K and V into the stage block kb does not use (blocks 0 and 1 alternate), then waits
// until block kb's copies (issued one iteration earlier) have landed. Returns kb's stage.
template <int D>
__device__ inline int next_key_block(bf16* Ks, bf16* Vs, const bf16* qkv, int kb, int last, int b, int h, int T,
                                     int nh) {
    constexpr int tile = kRows * (D + 8);
    const int stage = kb % 2;
    if (kb < last) {
        const int k1 = (kb + 1) * kRows;
        const int64_t stride = 3 * nh * D;
        load_strided_rows<D, kRows>(Ks + (1 - stage) * tile, qkv_rows(qkv, 1, b, h, k1, T, nh, D), T - k1, stride);
        load_strided_rows<D, kRows>(Vs + (1 - stage) * tile, qkv_rows(qkv, 2, b, h, k1, T, nh, D), T - k1, stride);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    return stage;
}

// Forward, one block per (64 queries, b·h). Key block j is copied while block j−1 is multiplied.
// Per key block: S = Q K^T (fp32, scaled to base 2), the diagonal block masked (s > t), then per
// row m' = max(m, max_s S), ℓ = ℓ·2^(m−m') + Σ_s 2^(S−m'), O = O·2^(m−m') + 2^(S−m') V.
template <int D>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(bf16* out, float* lse, const bf16* qkv, int T,
                                                                 int nh) {
    constexpr int ld = D + 8, tile = kRows * ld;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);  // [64][ld]
    bf16* Ks = Qs + tile;                      // [2][64][ld]
    bf16* Vs = Ks + 2 * tile;                  // [2][64][ld]
    const int qb = gridDim.x - 1 - blockIdx.x;  // the longest rows first: the tail is short blocks
    const int b = blockIdx.y / nh, h = blockIdx.y % nh, q0 = qb * kRows;
    const int64_t stride = 3 * nh * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4, r0 = warp * 16;
    const float scale = kLog2e / sqrtf((float)D);

    load_strided_rows<D, kRows>(Qs, qkv_rows(qkv, 0, b, h, q0, T, nh, D), T - q0, stride);
    load_strided_rows<D, kRows>(Ks, qkv_rows(qkv, 1, b, h, 0, T, nh, D), T, stride);
    load_strided_rows<D, kRows>(Vs, qkv_rows(qkv, 2, b, h, 0, T, nh, D), T, stride);
    cp_async_commit();

    float o[1][D / 8][4], s[1][kRows / 8][4];
    zero<D>(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g, g+8; ℓ summed over this lane's columns
    for (int kb = 0; kb <= qb; kb++) {
        const int stage = next_key_block<D>(Ks, Vs, qkv, kb, qb, b, h, T, nh);
        const bf16 *Kt = Ks + stage * tile, *Vt = Vs + stage * tile;

        warp_mma_nt<D, 1, kRows>(s, Qs, ld, r0, Kt, ld, 0);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int t = q0 + r0 + g + 8 * half;
            float row_max = m[half];
#pragma unroll
            for (int nt = 0; nt < kRows / 8; nt++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    float& x = s[0][nt][2 * half + j];
                    x *= scale;
                    if (kb == qb && kb * kRows + nt * 8 + 2 * q + j > t) x = -INFINITY;
                    row_max = fmaxf(row_max, x);
                }
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffff, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffff, row_max, 2));
            const float rescale = exp2f(m[half] - row_max);  // key s = t is never masked: row_max is finite
            m[half] = row_max;
            l[half] *= rescale;
#pragma unroll
            for (int nt = 0; nt < D / 8; nt++) {
                o[0][nt][2 * half] *= rescale;
                o[0][nt][2 * half + 1] *= rescale;
            }
#pragma unroll
            for (int nt = 0; nt < kRows / 8; nt++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    float& x = s[0][nt][2 * half + j];
                    x = exp2f(x - row_max);
                    l[half] += x;
                }
        }
        warp_mma_hidden<D, 1, kRows>(o, s, Vt, ld);  // O += P V, P packed to bf16 from registers
        __syncthreads();  // the next iteration's copies overwrite this stage
    }

#pragma unroll
    for (int half = 0; half < 2; half++) {
        l[half] += __shfl_xor_sync(0xffffffff, l[half], 1);
        l[half] += __shfl_xor_sync(0xffffffff, l[half], 2);
        const int t = q0 + r0 + g + 8 * half;
        if (q == 0 && t < T) lse[(int64_t)blockIdx.y * T + t] = m[half] + log2f(l[half]);
    }
    const float inv[2] = {1.f / l[0], 1.f / l[1]};
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[0][nt][i] *= inv[i / 2];
    store_warp_rows<D>(out + ((int64_t)b * T + q0) * nh * D + h * D, (int64_t)nh * D, o, r0, T - q0, 1.f);
}

// dk, dv of one block of 64 keys (b·h), over the query blocks that see them (t ≥ s), STEP queries at
// a time, copied one step ahead with their lse and δ. Per step, in this warp's 16 keys:
//   P^T = 2^(c·K Q^T − lse)  (masked t < s),   dV += P^T dO,   dP^T = V dO^T,
//   dS^T = P^T ⊙ (dP^T − δ),   dK += dS^T Q   (times c at the end)
template <int D>
__global__ void __launch_bounds__(kThreads) flash_backward_dkdv_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv,
                                                                       const float* lse, const float* delta, int T,
                                                                       int nh) {
    constexpr int STEP = kDkdvStep<D>, ld = D + 8, key_tile = kRows * ld, step_tile = STEP * ld;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);   // [64][ld]
    bf16* Vs = Ks + key_tile;                   // [64][ld]
    bf16* Qs = Vs + key_tile;                   // [2][STEP][ld]
    bf16* dOs = Qs + 2 * step_tile;             // [2][STEP][ld]
    float* lse_s = reinterpret_cast<float*>(dOs + 2 * step_tile);  // [2][STEP]
    float* delta_s = lse_s + 2 * STEP;                              // [2][STEP]
    const int kb = blockIdx.x;  // key block 0 sees every query: the longest first
    const int b = blockIdx.y / nh, h = blockIdx.y % nh, k0 = kb * kRows;
    const int64_t stride = 3 * nh * D, out_stride = (int64_t)nh * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4, r0 = warp * 16;
    const float scale = kLog2e / sqrtf((float)D);
    const float* lse_bh = lse + (int64_t)blockIdx.y * T;
    const float* delta_bh = delta + (int64_t)blockIdx.y * T;
    const bf16* dout_b = dout + (int64_t)b * T * out_stride + h * D;

    // Queries of step i: t0 = i·STEP ..; rows past T read as lse = +∞ (P = 0) and δ = 0.
    auto load_step = [&](int i, int stage) {
        const int t0 = i * STEP;
        load_strided_rows<D, STEP>(Qs + stage * step_tile, qkv_rows(qkv, 0, b, h, t0, T, nh, D), T - t0, stride);
        load_strided_rows<D, STEP>(dOs + stage * step_tile, dout_b + (int64_t)t0 * out_stride, T - t0, out_stride);
        if (threadIdx.x < STEP) {
            const int t = t0 + threadIdx.x;
            lse_s[stage * STEP + threadIdx.x] = t < T ? lse_bh[t] : INFINITY;
            delta_s[stage * STEP + threadIdx.x] = t < T ? delta_bh[t] : 0.f;
        }
    };
    const int first = k0 / STEP, steps = (int)ceil_div(T, STEP);
    load_strided_rows<D, kRows>(Ks, qkv_rows(qkv, 1, b, h, k0, T, nh, D), T - k0, stride);
    load_strided_rows<D, kRows>(Vs, qkv_rows(qkv, 2, b, h, k0, T, nh, D), T - k0, stride);
    load_step(first, 0);
    cp_async_commit();

    float dv[1][D / 8][4], dk[1][D / 8][4], p[1][STEP / 8][4], dp[1][STEP / 8][4];
    zero<D>(dv);
    zero<D>(dk);
    for (int i = first; i < steps; i++) {
        const int stage = (i - first) % 2;
        if (i + 1 < steps) load_step(i + 1, 1 - stage);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16 *Qt = Qs + stage * step_tile, *dOt = dOs + stage * step_tile;
        const float *lse_t = lse_s + stage * STEP, *delta_t = delta_s + stage * STEP;

        warp_mma_nt<D, 1, STEP>(p, Ks, ld, r0, Qt, ld, 0);   // S^T (keys × queries)
        warp_mma_nt<D, 1, STEP>(dp, Vs, ld, r0, dOt, ld, 0);  // dP^T
        const bool diagonal = i * STEP < k0 + kRows;
#pragma unroll
        for (int nt = 0; nt < STEP / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = nt * 8 + 2 * q + e % 2, s_key = k0 + r0 + g + 8 * (e / 2);
                float x = exp2f(p[0][nt][e] * scale - lse_t[col]);
                if (diagonal && i * STEP + col < s_key) x = 0.f;
                p[0][nt][e] = x;
                dp[0][nt][e] = x * (dp[0][nt][e] - delta_t[col]);  // dS^T
            }
        warp_mma_hidden<D, 1, STEP>(dv, p, dOt, ld);  // dV += P^T dO
        warp_mma_hidden<D, 1, STEP>(dk, dp, Qt, ld);  // dK += dS^T Q
        __syncthreads();
    }
    const float c = 1.f / sqrtf((float)D);
    store_warp_rows<D>(dqkv + ((int64_t)b * T + k0) * stride + nh * D + h * D, stride, dk, r0, T - k0, c);
    store_warp_rows<D>(dqkv + ((int64_t)b * T + k0) * stride + 2 * nh * D + h * D, stride, dv, r0, T - k0, 1.f);
}

// dq of one block of 64 queries (b·h), over the key blocks it sees (s ≤ t), copied one block ahead.
// Per key block, in this warp's 16 queries:
//   P = 2^(c·Q K^T − lse) (masked s > t),   dP = dO V^T,   dS = P ⊙ (dP − δ),   dQ += dS K  (times c)
template <int D>
__global__ void __launch_bounds__(kThreads) flash_backward_dq_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv,
                                                                     const float* lse, const float* delta, int T,
                                                                     int nh) {
    constexpr int ld = D + 8, tile = kRows * ld;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);  // [64][ld]
    bf16* dOs = Qs + tile;                     // [64][ld]
    bf16* Ks = dOs + tile;                     // [2][64][ld]
    bf16* Vs = Ks + 2 * tile;                  // [2][64][ld]
    const int qb = gridDim.x - 1 - blockIdx.x;
    const int b = blockIdx.y / nh, h = blockIdx.y % nh, q0 = qb * kRows;
    const int64_t stride = 3 * nh * D, out_stride = (int64_t)nh * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4, r0 = warp * 16;
    const float scale = kLog2e / sqrtf((float)D);

    load_strided_rows<D, kRows>(Qs, qkv_rows(qkv, 0, b, h, q0, T, nh, D), T - q0, stride);
    load_strided_rows<D, kRows>(dOs, dout + ((int64_t)b * T + q0) * out_stride + h * D, T - q0, out_stride);
    load_strided_rows<D, kRows>(Ks, qkv_rows(qkv, 1, b, h, 0, T, nh, D), T, stride);
    load_strided_rows<D, kRows>(Vs, qkv_rows(qkv, 2, b, h, 0, T, nh, D), T, stride);
    cp_async_commit();
    float row_lse[2], row_delta[2];  // rows past T are computed on zeros and never stored
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int t = q0 + r0 + g + 8 * half;
        row_lse[half] = t < T ? lse[(int64_t)blockIdx.y * T + t] : 0.f;
        row_delta[half] = t < T ? delta[(int64_t)blockIdx.y * T + t] : 0.f;
    }

    float dq[1][D / 8][4], p[1][kRows / 8][4], dp[1][kRows / 8][4];
    zero<D>(dq);
    for (int kb = 0; kb <= qb; kb++) {
        const int stage = next_key_block<D>(Ks, Vs, qkv, kb, qb, b, h, T, nh);
        const bf16 *Kt = Ks + stage * tile, *Vt = Vs + stage * tile;

        warp_mma_nt<D, 1, kRows>(p, Qs, ld, r0, Kt, ld, 0);    // S
        warp_mma_nt<D, 1, kRows>(dp, dOs, ld, r0, Vt, ld, 0);  // dP
#pragma unroll
        for (int nt = 0; nt < kRows / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int half = e / 2, s_key = kb * kRows + nt * 8 + 2 * q + e % 2;
                float x = exp2f(p[0][nt][e] * scale - row_lse[half]);
                if (kb == qb && s_key > q0 + r0 + g + 8 * half) x = 0.f;
                dp[0][nt][e] = x * (dp[0][nt][e] - row_delta[half]);  // dS
            }
        warp_mma_hidden<D, 1, kRows>(dq, dp, Kt, ld);  // dQ += dS K
        __syncthreads();
    }
    store_warp_rows<D>(dqkv + ((int64_t)b * T + q0) * stride + h * D, stride, dq, r0, T - q0, 1.f / sqrtf((float)D));
}

// ---------------------------------------------------------------------------------------------
// Hopper kernels (sm_90a builds, head sizes 64 and 128), all three on FlashAttention-3's plan: a
// block of two consumer warpgroups, which own 64 rows each and hold their accumulators, and a
// producer warpgroup that gives its registers to them and whose one thread copies the tiles by TMA
// (128B-swizzled, tc/wgmma.cuh) into stages handed on by mbarriers, so that no barrier stops the
// block. In the forward the consumers also take the tensor cores in turns (ping-pong), one
// warpgroup's softmax running under the other's products; in the backward kernels turns were
// measured no faster (dk/dv) or slower (dq; docs/perf/single_gpu.md), and the two warpgroups run
// free. The kernels exist in every build; without wgmma their bodies are empty and they are never
// launched.
constexpr int kWgRows = 128, kWgConsumers = 256, kWgThreads = kWgConsumers + 128;

// The tensor map of the head columns of a (B, T, width) bf16 activation (qkv: width 3C, its dout:
// C) in boxes of 64 columns × `rows` rows of one batch row, zeros past T.
inline CUtensorMap rows_tensor_map(const bf16* x, int B, int T, int width, int rows) {
    return make_tensor_map(x, {(uint64_t)width, (uint64_t)T, (uint64_t)B}, {(uint64_t)width, (uint64_t)width * T}, 64,
                           rows);
}

#if defined(LMOE_HAS_WGMMA)
// The mbarriers of a block's copies, 1 + 2·STAGES of them at `bars`: `once` completes when the tiles
// copied once per block have landed; the ring of STAGES stages is filled with blocks 0, 1, 2, ... in
// order, full[s] completing when stage s has landed (the TMA thread's bytes plus `extra` arrivals of
// the producer's other threads), empty[s] when every consumer thread is done with it.
template <int STAGES>
struct StageRing {
    uint64_t* once;
    uint64_t* full;
    uint64_t* empty;
    __device__ explicit StageRing(uint64_t* bars) : once(bars), full(bars + 1), empty(bars + 1 + STAGES) {}
    __device__ void init(int extra) const {  // by one thread, before a __syncthreads
        mbarrier_init(once, 1);
        for (int s = 0; s < STAGES; s++) {
            mbarrier_init(full + s, 1 + extra);
            mbarrier_init(empty + s, kWgConsumers);
        }
        fence_mbarrier_init();
    }
    __device__ int stage(int i) const { return i % STAGES; }
    __device__ void producer_wait(int i) const {  // until block i may overwrite its stage
        if (i >= STAGES) mbarrier_wait(empty + i % STAGES, (i / STAGES - 1) % 2);
    }
    __device__ uint64_t* expect(int i, uint32_t bytes) const {  // the TMA thread, before block i's copies
        mbarrier_arrive_expect_tx(full + i % STAGES, bytes);
        return full + i % STAGES;
    }
    __device__ void arrive(int i) const { mbarrier_arrive(full + i % STAGES); }  // one of the `extra`
    __device__ void wait(int i) const { mbarrier_wait(full + i % STAGES, i / STAGES % 2); }
    __device__ void release(int i) const { mbarrier_arrive(empty + i % STAGES); }
};

// The TMA thread's copies of key blocks 0..last (BK keys each, the head columns col.. of batch row b)
// into the ring's K and V stages, each once its stage is free.
template <int D, int BK, int STAGES>
__device__ inline void copy_key_blocks(const StageRing<STAGES>& ring, bf16* Ks, bf16* Vs, const CUtensorMap& qkv_map,
                                       int nh, int col, int b, int last) {
    constexpr int kv_elems = BK * D;
    for (int kb = 0; kb <= last; kb++) {
        ring.producer_wait(kb);
        uint64_t* full = ring.expect(kb, 2 * kv_elems * 2);
        bf16 *K = Ks + ring.stage(kb) * kv_elems, *V = Vs + ring.stage(kb) * kv_elems;
        for (int j = 0; j < D / 64; j++) {
            tma_load_3d(K + j * BK * 64, qkv_map, nh * D + col + 64 * j, kb * BK, b, full);
            tma_load_3d(V + j * BK * 64, qkv_map, 2 * nh * D + col + 64 * j, kb * BK, b, full);
        }
    }
}
#endif

// Forward, one block per (128 queries, b·h), warpgroup w owning queries q0 + 64w ..; Q copied once,
// K and V 128 keys a block into three stages. Per key block j, in a warpgroup's 64 rows, at its turn:
//   issue S_{j+1} = Q K_{j+1}^T;   O ← O·2^(m_{j−1} − m_j);   issue O += P_j V_j
// then out of turn: S_{j+1} awaited, masked where it is the diagonal block (s > t), its row maxima
// m_{j+1} = max(m_j, c·max_s S), ℓ ← ℓ·2^(m_j − m_{j+1}) + Σ_s P, P_{j+1} = 2^(c·S − m_{j+1}) in
// place (one FFMA and one exp2 an element); O += P_j V_j awaited and block j released; P_{j+1} packed
// to bf16 as the register A operand of its product.
constexpr int kWgForwardKeys = 128, kWgForwardStages = 3;

template <int D>
constexpr int wgmma_forward_smem() {
    return (kWgRows + 2 * kWgForwardStages * kWgForwardKeys) * D * 2 + 1024 + (1 + 2 * kWgForwardStages) * 8;
}

template <int D>
__global__ void __launch_bounds__(kWgThreads, 1)
    flash_forward_wgmma_kernel(bf16* out, float* lse, const __grid_constant__ CUtensorMap qkv_map, int T, int nh) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(D == 64 || D == 128, "wgmma attention: head size 64 or 128");
    constexpr int BQ = kWgRows, BK = kWgForwardKeys, STAGES = kWgForwardStages;
    static_assert(BK == BQ, "query block qb sees key blocks 0..qb, the last on its diagonal");
    constexpr int q_elems = BQ * D, kv_elems = BK * D;
    constexpr uint32_t q_block = BQ * 128, kv_block = BK * 128;  // bytes of one 64-column block of a tile
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Qs = reinterpret_cast<bf16*>(wgmma_align_smem(smem_raw));  // (128, D)
    bf16* Ks = Qs + q_elems;                                         // STAGES × (128, D)
    bf16* Vs = Ks + STAGES * kv_elems;                               // STAGES × (128, D)
    const StageRing<STAGES> ring(reinterpret_cast<uint64_t*>(Vs + STAGES * kv_elems));  // once: Q
    const int qb = gridDim.x - 1 - blockIdx.x;  // the longest rows first: the tail is short blocks
    const int b = blockIdx.y / nh, h = blockIdx.y % nh, q0 = qb * BQ, last = qb;
    if (threadIdx.x == 0) ring.init(0);
    __syncthreads();  // initialised before anyone arrives; the block's only barrier

    if (threadIdx.x >= kWgConsumers) {  // the producer warpgroup
        warpgroup_release_registers<24>();
        if (threadIdx.x == kWgConsumers) {
            const int col = h * D;  // this head's columns within each third of a qkv row
            mbarrier_arrive_expect_tx(ring.once, q_elems * 2);
            for (int j = 0; j < D / 64; j++) tma_load_3d(Qs + j * BQ * 64, qkv_map, col + 64 * j, q0, b, ring.once);
            copy_key_blocks<D, BK>(ring, Ks, Vs, qkv_map, nh, col, b, last);
        }
        return;
    }

    warpgroup_claim_registers<240>();
    const int wg = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const int t0 = q0 + 64 * wg + 16 * warp + gq;  // this thread's rows: t0 and t0 + 8
    const float scale = kLog2e / sqrtf((float)D);
    const unsigned char* Qw = reinterpret_cast<const unsigned char*>(Qs) + wg * 64 * 128;  // this warpgroup's rows
    const Turns turns{wg, last + 2};  // S_0; S_{j+1} with P_j V_j for j < last; P_last V_last
    float s[BK / 2], o[D / 2];
    uint32_t p[BK / 16][4];  // P of the block whose O += P V is issued next, the A operand
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, rescale[2];  // rows t0, t0 + 8; ℓ over this lane's columns
    auto issue_scores = [&](int kb) {  // S = Q K_kb^T, once block kb has landed, at turn kb
        ring.wait(kb);
        turns.take(kb);
        wgmma_fence();
        wgmma_kmajor<BK, D / 16>(s, Qw, q_block, Ks + ring.stage(kb) * kv_elems, kv_block);
        wgmma_commit();
    };
    auto issue_values = [&](int kb) {  // O ← O·rescale, O += P_kb V_kb
#pragma unroll
        for (int i = 0; i < D / 2; i++) o[i] *= rescale[i / 2 % 2];
        const bf16* Vt = Vs + ring.stage(kb) * kv_elems;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) wgmma_rs<D, 1>(o, p[kk], wgmma_desc_mnmajor(Vt, kv_block, kk), 1);
        wgmma_commit();
    };
    auto softmax = [&](int kb) {  // S of block kb (awaited) → P in place; m, ℓ and the rescale of O
        if (kb == last) {
#pragma unroll
            for (int e = 0; e < BK / 2; e++)
                if (kb * BK + 8 * (e / 4) + 2 * q + e % 2 > t0 + 8 * (e / 2 % 2)) s[e] = -INFINITY;
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float row_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < BK / 4; j++) row_max = fmaxf(row_max, s[4 * (j / 2) + 2 * half + j % 2]);
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffff, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffff, row_max, 2));
            const float m_new = fmaxf(m[half], row_max * scale);  // key 0 ≤ t is never masked: finite
            rescale[half] = exp2f(m[half] - m_new);
            m[half] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < BK / 4; j++) {
                float& x = s[4 * (j / 2) + 2 * half + j % 2];
                x = exp2f(fmaf(x, scale, -m_new));
                sum += x;
            }
            l[half] = l[half] * rescale[half] + sum;
        }
    };

    mbarrier_wait(ring.once, 0);
    issue_scores(0);
    turns.pass(0);
    wgmma_wait<0>();
    wgmma_fence_operands(s);
    softmax(0);
    wgmma_accumulators_as_a<BK / 16>(p, s);
    for (int kb = 0; kb < last; kb++) {
        issue_scores(kb + 1);
        issue_values(kb);
        turns.pass(kb + 1);
        wgmma_wait<1>();  // S_{kb+1}
        wgmma_fence_operands(s);
        softmax(kb + 1);
        wgmma_wait<0>();  // O += P_kb V_kb: p and block kb are free
        wgmma_fence_operands(o);
        ring.release(kb);
        wgmma_accumulators_as_a<BK / 16>(p, s);
    }
    turns.take(last + 1);
    issue_values(last);
    turns.pass(last + 1);
    wgmma_wait<0>();
    wgmma_fence_operands(o);

#pragma unroll
    for (int half = 0; half < 2; half++) {
        l[half] += __shfl_xor_sync(0xffffffff, l[half], 1);
        l[half] += __shfl_xor_sync(0xffffffff, l[half], 2);
        const int t = t0 + 8 * half;
        if (q == 0 && t < T) lse[(int64_t)blockIdx.y * T + t] = m[half] + log2f(l[half]);
    }
    const float inv[2] = {1.f / l[0], 1.f / l[1]};
    bf16* out_rows = out + ((int64_t)b * T + q0 + 64 * wg) * nh * D + h * D;  // this warpgroup's rows
    for_each_accumulator_pair<D>(o, [&](int r, int col, float x, float y) {  // r % 16 / 8: row t0 or t0 + 8
        if (q0 + 64 * wg + r < T)
            *reinterpret_cast<uint32_t*>(out_rows + (int64_t)r * nh * D + col) =
                pack_bf16x2(x * inv[r % 16 / 8], y * inv[r % 16 / 8]);
    });
#endif
}

// dk, dv, one block per (128 keys, b·h), warpgroup w owning keys k0 + 64w ..; K and V copied once,
// the queries that see them (t ≥ s) 64 at a time into four stages: Q and dO by TMA, their lse and δ
// stored by the producer's second warp (rows past T: lse = +∞, so P = 0, and δ = 0). Per step, in a
// warpgroup's 64 keys:
//   S^T, dP^T (64 keys × 64 queries) = K_w Q^T, V_w dO^T
//   P^T = 2^(c·S^T − lse) (masked t < s where the step reaches below the keys),  dS^T = P^T ⊙ (dP^T − δ)
//   dV_w += P^T dO,  dK_w += dS^T Q   (P^T, dS^T packed to bf16 as register A operands; dO, Q read
//   MN-major)
// and the step's stage released once they are done; dK times c at the end. Computed transposed so
// that P^T and dS^T are, as they stand, the A operands of the last two products (the expert weight
// gradient of moe/latent/expert_weight_backward.cuh has the same shape).
constexpr int kWgDkdvQueries = 64, kWgDkdvStages = 4;

template <int D>
constexpr int wgmma_dkdv_smem() {
    return (2 * kWgRows + 2 * kWgDkdvStages * kWgDkdvQueries) * D * 2 + 2 * kWgDkdvStages * kWgDkdvQueries * 4 +
           1024 + (1 + 2 * kWgDkdvStages) * 8;
}

template <int D>
__global__ void __launch_bounds__(kWgThreads, 1)
    flash_backward_dkdv_wgmma_kernel(bf16* dqkv, const __grid_constant__ CUtensorMap qkv_map,
                                     const __grid_constant__ CUtensorMap dout_map, const float* lse,
                                     const float* delta, int T, int nh) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(D == 64 || D == 128, "wgmma attention: head size 64 or 128");
    constexpr int BKEY = kWgRows, BQ = kWgDkdvQueries, STAGES = kWgDkdvStages;
    constexpr int key_elems = BKEY * D, step_elems = BQ * D;
    constexpr uint32_t key_block = BKEY * 128, step_block = BQ * 128;  // bytes of one 64-column block of a tile
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Ks = reinterpret_cast<bf16*>(wgmma_align_smem(smem_raw));     // (128, D)
    bf16* Vs = Ks + key_elems;                                          // (128, D)
    bf16* Qs = Vs + key_elems;                                          // STAGES × (64, D)
    bf16* dOs = Qs + STAGES * step_elems;                               // STAGES × (64, D)
    float* lse_s = reinterpret_cast<float*>(dOs + STAGES * step_elems);  // STAGES × 64
    float* delta_s = lse_s + STAGES * BQ;                                // STAGES × 64
    const StageRing<STAGES> ring(reinterpret_cast<uint64_t*>(delta_s + STAGES * BQ));  // once: K, V
    // key block 0 sees every query: the longest blocks come first
    const int b = blockIdx.y / nh, h = blockIdx.y % nh, k0 = blockIdx.x * BKEY;
    const int first = k0 / BQ, steps = (int)ceil_div(T, BQ) - first;  // query steps first + i, i < steps
    if (threadIdx.x == 0) ring.init(32);
    __syncthreads();  // initialised before anyone arrives; the block's only barrier

    if (threadIdx.x >= kWgConsumers) {  // the producer warpgroup
        warpgroup_release_registers<24>();
        const int col = h * D, lane = threadIdx.x % 32;
        if (threadIdx.x == kWgConsumers) {
            mbarrier_arrive_expect_tx(ring.once, 2 * key_elems * 2);
            for (int j = 0; j < D / 64; j++)
                for (int half = 0; half < 2; half++) {
                    const int at = j * BKEY * 64 + half * 64 * 64, row = k0 + 64 * half;
                    tma_load_3d(Ks + at, qkv_map, nh * D + col + 64 * j, row, b, ring.once);
                    tma_load_3d(Vs + at, qkv_map, 2 * nh * D + col + 64 * j, row, b, ring.once);
                }
            for (int i = 0; i < steps; i++) {
                ring.producer_wait(i);
                uint64_t* full = ring.expect(i, 2 * step_elems * 2);
                const int stage = ring.stage(i), t0 = (first + i) * BQ;
                for (int j = 0; j < D / 64; j++) {
                    tma_load_3d(Qs + stage * step_elems + j * BQ * 64, qkv_map, col + 64 * j, t0, b, full);
                    tma_load_3d(dOs + stage * step_elems + j * BQ * 64, dout_map, col + 64 * j, t0, b, full);
                }
            }
        } else if (threadIdx.x / 32 == kWgConsumers / 32 + 1) {  // the second warp: lse and δ
            const float* lse_bh = lse + (int64_t)blockIdx.y * T;
            const float* delta_bh = delta + (int64_t)blockIdx.y * T;
            for (int i = 0; i < steps; i++) {
                ring.producer_wait(i);
                const int stage = ring.stage(i);
#pragma unroll
                for (int r = lane; r < BQ; r += 32) {
                    const int t = (first + i) * BQ + r;
                    lse_s[stage * BQ + r] = t < T ? lse_bh[t] : INFINITY;
                    delta_s[stage * BQ + r] = t < T ? delta_bh[t] : 0.f;
                }
                ring.arrive(i);
            }
        }
        return;
    }

    warpgroup_claim_registers<240>();
    const int wg = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const int s0 = k0 + 64 * wg + 16 * warp + gq;  // this thread's keys: s0 and s0 + 8
    const float scale = kLog2e / sqrtf((float)D);
    const unsigned char* Kw = reinterpret_cast<const unsigned char*>(Ks) + wg * 64 * 128;  // this warpgroup's keys
    const unsigned char* Vw = reinterpret_cast<const unsigned char*>(Vs) + wg * 64 * 128;
    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dk[i] = dv[i] = 0.f;
    mbarrier_wait(ring.once, 0);
    for (int i = 0; i < steps; i++) {
        const int stage = ring.stage(i), t0 = (first + i) * BQ;
        const bf16 *Qt = Qs + stage * step_elems, *dOt = dOs + stage * step_elems;
        const float *lse_t = lse_s + stage * BQ, *delta_t = delta_s + stage * BQ;
        float st[32], dpt[32];  // S^T, dP^T
        ring.wait(i);
        wgmma_fence();
        wgmma_kmajor<64, D / 16>(st, Kw, key_block, Qt, step_block);
        wgmma_kmajor<64, D / 16>(dpt, Vw, key_block, dOt, step_block);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(st);
        wgmma_fence_operands(dpt);
        if (t0 < k0 + BKEY) {
#pragma unroll
            for (int e = 0; e < 32; e++)
                if (t0 + 8 * (e / 4) + 2 * q + e % 2 < s0 + 8 * (e / 2 % 2)) st[e] = -INFINITY;
        }
#pragma unroll
        for (int e = 0; e < 32; e++) {
            const int col = 8 * (e / 4) + 2 * q + e % 2;
            const float x = exp2f(fmaf(st[e], scale, -lse_t[col]));
            st[e] = x;
            dpt[e] = x * (dpt[e] - delta_t[col]);  // dS^T
        }
        static_assert(BQ == 64, "the second products take 64 query rows");
        wgmma_rs_pair_from_accumulators<D>(dv, st, dOt, dk, dpt, Qt, step_block);  // dV += P^T dO, dK += dS^T Q
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(dv);
        wgmma_fence_operands(dk);
        ring.release(i);
    }
    const float c = 1.f / sqrtf((float)D);
    const int64_t stride = 3 * nh * D;
    bf16* rows = dqkv + ((int64_t)b * T + k0 + 64 * wg) * stride + h * D;  // this warpgroup's keys
    const auto store = [&](const float (&acc)[D / 2], int part, float scale) {  // part 1: dK, 2: dV
        for_each_accumulator_pair<D>(acc, [&](int r, int col, float x, float y) {
            if (k0 + 64 * wg + r < T)
                *reinterpret_cast<uint32_t*>(rows + (int64_t)r * stride + part * nh * D + col) =
                    pack_bf16x2(scale * x, scale * y);
        });
    };
    store(dk, 1, c);
    store(dv, 2, 1.f);
#endif
}

// dq, one block per (128 queries, b·h) as in the forward; Q and dO copied once, K and V 64 keys a
// block into four stages. Per key block j, in a warpgroup's 64 queries:
//   issue S_{j+1}, dP_{j+1} = Q K_{j+1}^T, dO V_{j+1}^T;   issue dQ += dS_j K_j
// then S_{j+1}, dP_{j+1} awaited, P = 2^(c·S − lse) (masked s > t on the diagonal
// block), dS = P ⊙ (dP − δ) in place; dQ += dS_j K_j awaited and block j released; dS_{j+1} packed to
// bf16 as the register A operand of its product (K read MN-major; dQ times c at the end). Both
// warpgroups run every key block: warpgroup 0's last one is fully masked (P = 0, dQ += 0), and skipping
// its products there would make ptxas serialise every wgmma of the kernel.
constexpr int kWgDqKeys = 64, kWgDqStages = 4;

template <int D>
constexpr int wgmma_dq_smem() {
    return (2 * kWgRows + 2 * kWgDqStages * kWgDqKeys) * D * 2 + 1024 + (1 + 2 * kWgDqStages) * 8;
}

template <int D>
__global__ void __launch_bounds__(kWgThreads, 1)
    flash_backward_dq_wgmma_kernel(bf16* dqkv, const __grid_constant__ CUtensorMap qkv_map,
                                   const __grid_constant__ CUtensorMap dout_map, const float* lse, const float* delta,
                                   int T, int nh) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(D == 64 || D == 128, "wgmma attention: head size 64 or 128");
    constexpr int BQ = kWgRows, BK = kWgDqKeys, STAGES = kWgDqStages, q_elems = BQ * D, kv_elems = BK * D;
    constexpr uint32_t q_block = BQ * 128, kv_block = BK * 128;  // bytes of one 64-column block of a tile
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Qs = reinterpret_cast<bf16*>(wgmma_align_smem(smem_raw));  // (128, D)
    bf16* dOs = Qs + q_elems;                                        // (128, D)
    bf16* Ks = dOs + q_elems;                                        // STAGES × (64, D)
    bf16* Vs = Ks + STAGES * kv_elems;                               // STAGES × (64, D)
    const StageRing<STAGES> ring(reinterpret_cast<uint64_t*>(Vs + STAGES * kv_elems));  // once: Q, dO
    const int qb = gridDim.x - 1 - blockIdx.x;  // the longest rows first
    const int b = blockIdx.y / nh, h = blockIdx.y % nh, q0 = qb * BQ;
    const int last = min(2 * qb + 1, (T - 1) / BK);
    if (threadIdx.x == 0) ring.init(0);
    __syncthreads();  // initialised before anyone arrives; the block's only barrier

    if (threadIdx.x >= kWgConsumers) {  // the producer warpgroup
        warpgroup_release_registers<24>();
        if (threadIdx.x == kWgConsumers) {
            const int col = h * D;
            mbarrier_arrive_expect_tx(ring.once, 2 * q_elems * 2);
            for (int j = 0; j < D / 64; j++)
                for (int half = 0; half < 2; half++) {
                    const int at = j * BQ * 64 + half * 64 * 64, row = q0 + 64 * half;
                    tma_load_3d(Qs + at, qkv_map, col + 64 * j, row, b, ring.once);
                    tma_load_3d(dOs + at, dout_map, col + 64 * j, row, b, ring.once);
                }
            copy_key_blocks<D, BK>(ring, Ks, Vs, qkv_map, nh, col, b, last);
        }
        return;
    }

    warpgroup_claim_registers<240>();
    const int wg = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const int t0 = q0 + 64 * wg + 16 * warp + gq;  // this thread's rows: t0 and t0 + 8
    const float scale = kLog2e / sqrtf((float)D);
    float row_lse[2], row_delta[2];  // rows past T: P = 0
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int t = t0 + 8 * half;
        row_lse[half] = t < T ? lse[(int64_t)blockIdx.y * T + t] : INFINITY;
        row_delta[half] = t < T ? delta[(int64_t)blockIdx.y * T + t] : 0.f;
    }
    const unsigned char* Qw = reinterpret_cast<const unsigned char*>(Qs) + wg * 64 * 128;  // this warpgroup's rows
    const unsigned char* dOw = reinterpret_cast<const unsigned char*>(dOs) + wg * 64 * 128;
    float s[BK / 2], dp[BK / 2], dq[D / 2];
    uint32_t ds[BK / 16][4];  // dS of the block whose dQ += dS K is issued next, the A operand
#pragma unroll
    for (int i = 0; i < D / 2; i++) dq[i] = 0.f;
    auto issue_scores = [&](int kb) {  // S, dP of block kb, once it has landed
        ring.wait(kb);
        wgmma_fence();
        wgmma_kmajor<BK, D / 16>(s, Qw, q_block, Ks + ring.stage(kb) * kv_elems, kv_block);
        wgmma_kmajor<BK, D / 16>(dp, dOw, q_block, Vs + ring.stage(kb) * kv_elems, kv_block);
        wgmma_commit();
    };
    auto issue_dq = [&](int kb) {  // dQ += dS_kb K_kb
        const bf16* Kt = Ks + ring.stage(kb) * kv_elems;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) wgmma_rs<D, 1>(dq, ds[kk], wgmma_desc_mnmajor(Kt, kv_block, kk), 1);
        wgmma_commit();
    };
    auto score_grads = [&](int kb) {  // S, dP of block kb (awaited) → dS in s
        if (kb >= 2 * qb + wg) {
#pragma unroll
            for (int e = 0; e < BK / 2; e++)
                if (kb * BK + 8 * (e / 4) + 2 * q + e % 2 > t0 + 8 * (e / 2 % 2)) s[e] = -INFINITY;
        }
#pragma unroll
        for (int e = 0; e < BK / 2; e++) {
            const int half = e / 2 % 2;
            s[e] = exp2f(fmaf(s[e], scale, -row_lse[half])) * (dp[e] - row_delta[half]);
        }
    };

    mbarrier_wait(ring.once, 0);
    issue_scores(0);
    wgmma_wait<0>();
    wgmma_fence_operands(s);
    wgmma_fence_operands(dp);
    score_grads(0);
    wgmma_accumulators_as_a<BK / 16>(ds, s);
    for (int kb = 0; kb < last; kb++) {
        issue_scores(kb + 1);
        issue_dq(kb);
        wgmma_wait<1>();  // S_{kb+1}, dP_{kb+1}
        wgmma_fence_operands(s);
        wgmma_fence_operands(dp);
        score_grads(kb + 1);
        wgmma_wait<0>();  // dQ += dS_kb K_kb: ds and block kb are free
        wgmma_fence_operands(dq);
        ring.release(kb);
        wgmma_accumulators_as_a<BK / 16>(ds, s);
    }
    issue_dq(last);
    wgmma_wait<0>();
    wgmma_fence_operands(dq);
    const float c = 1.f / sqrtf((float)D);
    const int64_t stride = 3 * nh * D;
    bf16* rows = dqkv + ((int64_t)b * T + q0 + 64 * wg) * stride + h * D;  // this warpgroup's queries
    for_each_accumulator_pair<D>(dq, [&](int r, int col, float x, float y) {
        if (q0 + 64 * wg + r < T)
            *reinterpret_cast<uint32_t*>(rows + (int64_t)r * stride + col) = pack_bf16x2(c * x, c * y);
    });
#endif
}

// Dynamic shared memory of each kernel, and the opt-in above 48 KiB (set before every launch: it is
// cheap, and right for whichever device is current).
template <int D>
constexpr int forward_smem() { return 5 * kRows * (D + 8) * 2; }
template <int D>
constexpr int dkdv_smem() { return (2 * kRows + 4 * kDkdvStep<D>) * (D + 8) * 2 + 4 * kDkdvStep<D> * 4; }
template <int D>
constexpr int dq_smem() { return 6 * kRows * (D + 8) * 2; }

template <class Kernel>
void allow_smem(Kernel kernel, int bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// The launches for head size D (attention_forward and attention_backward below choose D).
template <int D>
void launch_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, int nh, cudaStream_t stream) {
    if constexpr (D == 64 || D == 128) {
        if (device_has_wgmma()) {
            const dim3 grid((unsigned)ceil_div(T, kWgRows), B * nh);
            allow_smem(flash_forward_wgmma_kernel<D>, wgmma_forward_smem<D>());
            flash_forward_wgmma_kernel<D><<<grid, kWgThreads, wgmma_forward_smem<D>(), stream>>>(
                out, lse, rows_tensor_map(qkv, B, T, 3 * nh * D, kWgRows), T, nh);
            CUDA_CHECK_LAUNCH();
            return;
        }
    }
    const dim3 grid((unsigned)ceil_div(T, kRows), B * nh);
    allow_smem(flash_forward_kernel<D>, forward_smem<D>());
    flash_forward_kernel<D><<<grid, kThreads, forward_smem<D>(), stream>>>(out, lse, qkv, T, nh);
    CUDA_CHECK_LAUNCH();
}

template <int D>
void launch_backward(floatX* dqkv, const floatX* dout, const floatX* qkv, const float* lse, const float* delta, int B,
                     int T, int nh, cudaStream_t stream) {
    if constexpr (D == 64 || D == 128) {
        if (device_has_wgmma()) {
            const CUtensorMap qkv_map = rows_tensor_map(qkv, B, T, 3 * nh * D, 64),
                              dout_map = rows_tensor_map(dout, B, T, nh * D, 64);
            const dim3 blocks((unsigned)ceil_div(T, kWgRows), B * nh);  // of 128 keys, then of 128 queries
            allow_smem(flash_backward_dkdv_wgmma_kernel<D>, wgmma_dkdv_smem<D>());
            flash_backward_dkdv_wgmma_kernel<D><<<blocks, kWgThreads, wgmma_dkdv_smem<D>(), stream>>>(
                dqkv, qkv_map, dout_map, lse, delta, T, nh);
            CUDA_CHECK_LAUNCH();
            allow_smem(flash_backward_dq_wgmma_kernel<D>, wgmma_dq_smem<D>());
            flash_backward_dq_wgmma_kernel<D><<<blocks, kWgThreads, wgmma_dq_smem<D>(), stream>>>(
                dqkv, qkv_map, dout_map, lse, delta, T, nh);
            CUDA_CHECK_LAUNCH();
            return;
        }
    }
    const dim3 grid((unsigned)ceil_div(T, kRows), B * nh);
    allow_smem(flash_backward_dkdv_kernel<D>, dkdv_smem<D>());
    flash_backward_dkdv_kernel<D><<<grid, kThreads, dkdv_smem<D>(), stream>>>(dqkv, dout, qkv, lse, delta, T, nh);
    CUDA_CHECK_LAUNCH();
    allow_smem(flash_backward_dq_kernel<D>, dq_smem<D>());
    flash_backward_dq_kernel<D><<<grid, kThreads, dq_smem<D>(), stream>>>(dqkv, dout, qkv, lse, delta, T, nh);
    CUDA_CHECK_LAUNCH();
}

}  // namespace attention_detail

#else  // LMOE_FP32
// ---------------------------------------------------------------------------------------------
// fp32 kernels: one thread per row, the same sums in plain loops (keys, or queries, in order).
namespace attention_detail {

__device__ inline float dot(const float* a, const float* b, int n) {
    float sum = 0.f;
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

// Row t of part `part` of head h in qkv (B, T, 3C).
__device__ inline const float* qkv_row(const float* qkv, int part, int b, int h, int t, int T, int nh, int D) {
    return qkv + ((int64_t)b * T + t) * 3 * nh * D + (int64_t)part * nh * D + h * D;
}

// Forward, thread (b·h, t): the online softmax over s = 0..t.
template <int D>
__global__ void simt_forward_kernel(float* out, float* lse, const float* qkv, int B, int T, int nh) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // walks (b·h, t)
    if (idx >= (int64_t)B * nh * T) return;
    const int bh = idx / T, t = idx % T, b = bh / nh, h = bh % nh;
    const float scale = kLog2e / sqrtf((float)D);
    const float* qt = qkv_row(qkv, 0, b, h, t, T, nh, D);
    float o[D] = {}, m = -INFINITY, l = 0.f;
    for (int s = 0; s <= t; s++) {
        const float x = scale * dot(qt, qkv_row(qkv, 1, b, h, s, T, nh, D), D);
        const float m_new = fmaxf(m, x), rescale = exp2f(m - m_new), p = exp2f(x - m_new);
        const float* vs = qkv_row(qkv, 2, b, h, s, T, nh, D);
        for (int i = 0; i < D; i++) o[i] = o[i] * rescale + p * vs[i];
        l = l * rescale + p;
        m = m_new;
    }
    float* ot = out + ((int64_t)b * T + t) * nh * D + h * D;
    for (int i = 0; i < D; i++) ot[i] = o[i] / l;
    lse[idx] = m + log2f(l);
}

// dk, dv, thread (b·h, s): over the queries t = s..T−1.
template <int D>
__global__ void simt_backward_dkdv_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                          const float* delta, int B, int T, int nh) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)B * nh * T) return;
    const int bh = idx / T, s = idx % T, b = bh / nh, h = bh % nh;
    const float scale = kLog2e / sqrtf((float)D);
    const float *ks = qkv_row(qkv, 1, b, h, s, T, nh, D), *vs = qkv_row(qkv, 2, b, h, s, T, nh, D);
    float dk[D] = {}, dv[D] = {};
    for (int t = s; t < T; t++) {
        const float* qt = qkv_row(qkv, 0, b, h, t, T, nh, D);
        const float* do_t = dout + ((int64_t)b * T + t) * nh * D + h * D;
        const float p = exp2f(scale * dot(qt, ks, D) - lse[(int64_t)bh * T + t]);
        const float ds = p * (dot(do_t, vs, D) - delta[(int64_t)bh * T + t]);
        for (int i = 0; i < D; i++) {
            dv[i] += p * do_t[i];
            dk[i] += ds * qt[i];
        }
    }
    const float c = 1.f / sqrtf((float)D);
    float* row = dqkv + ((int64_t)b * T + s) * 3 * nh * D + h * D;
    for (int i = 0; i < D; i++) {
        row[nh * D + i] = c * dk[i];
        row[2 * nh * D + i] = dv[i];
    }
}

// dq, thread (b·h, t): over the keys s = 0..t.
template <int D>
__global__ void simt_backward_dq_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                        const float* delta, int B, int T, int nh) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)B * nh * T) return;
    const int bh = idx / T, t = idx % T, b = bh / nh, h = bh % nh;
    const float scale = kLog2e / sqrtf((float)D);
    const float* qt = qkv_row(qkv, 0, b, h, t, T, nh, D);
    const float* do_t = dout + ((int64_t)b * T + t) * nh * D + h * D;
    float dq[D] = {};
    for (int s = 0; s <= t; s++) {
        const float *ks = qkv_row(qkv, 1, b, h, s, T, nh, D), *vs = qkv_row(qkv, 2, b, h, s, T, nh, D);
        const float p = exp2f(scale * dot(qt, ks, D) - lse[idx]);
        const float ds = p * (dot(do_t, vs, D) - delta[idx]);
        for (int i = 0; i < D; i++) dq[i] += ds * ks[i];
    }
    const float c = 1.f / sqrtf((float)D);
    float* row = dqkv + ((int64_t)b * T + t) * 3 * nh * D + h * D;
    for (int i = 0; i < D; i++) row[i] = c * dq[i];
}

template <int D>
void launch_forward(float* out, float* lse, const float* qkv, int B, int T, int nh, cudaStream_t stream) {
    simt_forward_kernel<D><<<ceil_div((int64_t)B * nh * T, 128), 128, 0, stream>>>(out, lse, qkv, B, T, nh);
    CUDA_CHECK_LAUNCH();
}

template <int D>
void launch_backward(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int B,
                     int T, int nh, cudaStream_t stream) {
    const int64_t blocks = ceil_div((int64_t)B * nh * T, 128);
    simt_backward_dkdv_kernel<D><<<blocks, 128, 0, stream>>>(dqkv, dout, qkv, lse, delta, B, T, nh);
    CUDA_CHECK_LAUNCH();
    simt_backward_dq_kernel<D><<<blocks, 128, 0, stream>>>(dqkv, dout, qkv, lse, delta, B, T, nh);
    CUDA_CHECK_LAUNCH();
}

}  // namespace attention_detail
#endif  // LMOE_FP32

// Forward.
//   out: (B, T, nh·da) floatX, written;  lse: (B, nh, T) fp32, written (base 2, see above), keep it
//   qkv: (B, T, 3·nh·da) floatX, rows [q | k | v], rotated by the rotary embedding; keep it
inline void attention_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, int nh, int da,
                              cudaStream_t stream) {
    attention_detail::with_head_size(da, [&](auto head) {
        attention_detail::launch_forward<decltype(head)::value>(out, lse, qkv, B, T, nh, stream);
    });
}

// Backward.
//   dqkv: (B, T, 3·nh·da) floatX, written (not accumulated): [dq | dk | dv]
//   dout: (B, T, nh·da);  out, lse, qkv: as attention_forward left and read them
//   scratch: attention_scratch_bytes(B, T, nh) bytes (δ)
inline void attention_backward(floatX* dqkv, void* scratch, const floatX* dout, const floatX* out, const float* lse,
                               const floatX* qkv, int B, int T, int nh, int da, cudaStream_t stream) {
    float* delta = static_cast<float*>(scratch);
    const int64_t rows = (int64_t)B * T * nh;
    attention_detail::attention_delta_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(delta, dout, out, B, T, nh, da);
    CUDA_CHECK_LAUNCH();
    attention_detail::with_head_size(da, [&](auto head) {
        attention_detail::launch_backward<decltype(head)::value>(dqkv, dout, qkv, lse, delta, B, T, nh, stream);
    });
}

}  // namespace lmoe
