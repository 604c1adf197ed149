// Rotary position embedding (SPEC §2), in place on the attention input qkv: (B, T, 3·n_head·d_attn)
// floatX, each row [q | k | v], head h of q at column h·d_attn and of k at n_head·d_attn + h·d_attn.
// In every head of q and k, the pair (2i, 2i+1) at position p turns by θ = p · 10000^(−2i/d_attn);
// v is untouched. The backward turns the gradient pair by −θ (a rotation's transpose is its inverse).
//
// Precision: θ reaches T (1024 rad for p1), where one fp32 ulp is 6e-5 rad, and powf's error on the
// frequency is multiplied by p as well. Angles formed in fp32 miss the reference's double ones by up
// to 6e-5 rad at T = 1024 (a host emulation gives a norm-wise error of 4.4e-6 on q and k: within the
// fp32 build's 1e-5, but with little room, and it grows with T). So each thread computes its
// frequencies once with double pow, forms θ = p·freq in double, reduces it to [−π, π] in double, and
// only then takes sincosf: a few double operations per pair and row, cheap next to the memory traffic.
#pragma once
#include <cstdint>

#include "util/cuda_utils.cuh"

namespace lmoe {

namespace rope_detail {

constexpr double kBase = 10000.0;
constexpr int kThreads = 128;      // packs of one row side by side: coalesced 16-byte accesses
constexpr int kRowsPerBlock = 16;  // rows each thread walks, reusing its frequencies

}  // namespace rope_detail

// Thread (row block, pack j) rotates pack j of the q|k part (columns [0, 2·n_head·d_attn)) of
// kRowsPerBlock rows; direction +1 turns by θ (forward), −1 by −θ (backward).
__global__ void __launch_bounds__(rope_detail::kThreads)
    rope_rotate_kernel(floatX* qkv, int N, int T, int n_head, int d_attn, int direction) {
    using namespace rope_detail;
    constexpr int kPairs = kPack / 2;
    constexpr double kTwoPi = 6.283185307179586476925;
    const int qk_packs = 2 * n_head * d_attn / kPack;
    const int pack = blockIdx.y * kThreads + threadIdx.x;
    if (pack >= qk_packs) return;
    const int col = pack * kPack;
    const int first_pair = (col % d_attn) / 2;  // a pack never straddles heads: d_attn % 8 == 0
    double freq[kPairs];
#pragma unroll
    for (int j = 0; j < kPairs; j++) freq[j] = pow(kBase, -2.0 * (first_pair + j) / d_attn);

    const int width = 3 * n_head * d_attn;
    const int first_row = blockIdx.x * kRowsPerBlock, end_row = min(first_row + kRowsPerBlock, N);
    for (int row = first_row; row < end_row; row++) {
        const int p = row % T;
        Pack* at = reinterpret_cast<Pack*>(qkv + (int64_t)row * width + col);
        Pack v = *at;
#pragma unroll
        for (int j = 0; j < kPairs; j++) {
            const double theta = p * freq[j];
            const float reduced = (float)(theta - kTwoPi * rint(theta * (1.0 / kTwoPi)));
            float sin_t, cos_t;
            sincosf(reduced, &sin_t, &cos_t);
            sin_t *= direction;
            const float a = to_float(v.v[2 * j]), b = to_float(v.v[2 * j + 1]);
            v.v[2 * j] = from_float<floatX>(a * cos_t - b * sin_t);
            v.v[2 * j + 1] = from_float<floatX>(a * sin_t + b * cos_t);
        }
        *at = v;
    }
}

inline void rope_rotate(floatX* qkv, int B, int T, int n_head, int d_attn, int direction, const char* call,
                        cudaStream_t stream) {
    using namespace rope_detail;
    if (d_attn <= 0 || d_attn % 8 != 0)
        die("argument", "rotary embedding needs the head size d_attn to be a positive multiple of 8", call, __FILE__,
            __LINE__);
    const int N = B * T;
    if (N == 0 || n_head == 0) return;
    const dim3 grid((unsigned)ceil_div(N, kRowsPerBlock), (unsigned)ceil_div(2 * n_head * d_attn / kPack, kThreads));
    rope_rotate_kernel<<<grid, kThreads, 0, stream>>>(qkv, N, T, n_head, d_attn, direction);
    CUDA_CHECK_LAUNCH();
}

// qkv: (B, T, 3·n_head·d_attn) floatX, q and k rotated in place.
inline void rope_forward(floatX* qkv, int B, int T, int n_head, int d_attn, cudaStream_t stream) {
    rope_rotate(qkv, B, T, n_head, d_attn, +1, "rope_forward", stream);
}

// dqkv: (B, T, 3·n_head·d_attn) floatX, the q and k gradients turned back in place (dv untouched).
inline void rope_backward(floatX* dqkv, int B, int T, int n_head, int d_attn, cudaStream_t stream) {
    rope_rotate(dqkv, B, T, n_head, d_attn, -1, "rope_backward", stream);
}

}  // namespace lmoe
