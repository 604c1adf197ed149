// Causal multi-head attention (SPEC §2), forward and backward, with the softmax materialised:
//   S = Q K^T          (per batch row b and head h, a (T, T) matrix)     cuBLAS strided-batched GEMM
//   P = causal_softmax(S / √da)   (s > t masked to 0; fp32 max and sum)  causal_softmax_forward_kernel
//   O = P V                                                              cuBLAS strided-batched GEMM
// Backward:
//   dV = P^T dO,  dP = dO V^T                                            cuBLAS
//   dS = P ⊙ (dP − rowsum(P ⊙ dP)) / √da   (causal)                      causal_softmax_backward_kernel
//   dQ = dS K,    dK = dS^T Q                                            cuBLAS
// This is llm.c's (non-cuDNN) attention: simple and exact, but it writes the (T, T) scores and
// probabilities to global memory and the GEMMs compute the masked upper triangle too, so it costs
// O(B·nh·T²) memory traffic where a fused flash-attention kernel would cost O(B·nh·T·da).
//
// Precision: the scores S and dP are GEMM outputs in fp32 (bf16 scores would put an error of up to
// |S|/256 into each exponent); the probabilities P and dS are floatX, because they are inputs of the
// next GEMMs (bf16 probabilities are also what llm.c keeps); all sums are fp32.
//
// Layouts. Input qkv: (B, T, 3·C) floatX with C = nh·da, each row [q | k | v], head h at column h·da
// of each part, already rotated by the rotary embedding. The batched GEMMs want each head's rows
// contiguous, so the forward permutes qkv into qkvr: (3, B, nh, T, da) = q, k, v one after another
// (kept for the backward, as is probs). Requires da % 8 == 0 (the permutes move 16 bytes at a time).
//
// Both passes take one scratch buffer of attention_scratch_bytes(): it holds nothing between calls,
// so one buffer can serve every layer. All GEMMs go through the caller's cuBLAS handle (see
// dense/matmul.cuh for its determinism notes); the two kernels here reduce in a fixed order (warp
// butterflies), so the whole attention is bitwise reproducible run to run.
#pragma once
#include <cmath>

#include "util/cuda_utils.cuh"

namespace lmoe {

namespace attention_detail {

constexpr int kRowsPerBlock = 8;             // softmax kernels: one warp per (b, h, t) row

__device__ inline float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}
__device__ inline float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

inline size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The scratch regions of one pass, carved from the caller's buffer at 256-byte boundaries.
struct Scratch {
    float* scores;   // (B, nh, T, T) fp32: S in the forward, dP in the backward
    floatX* dS;      // (B, nh, T, T) floatX: backward only
    floatX* heads;   // (B, nh, T, da) floatX: O in the forward, dO in the backward
    floatX* dqkvr;   // (3, B, nh, T, da) floatX: dQ, dK, dV, backward only
    size_t bytes;    // total size
};

inline Scratch carve_scratch(void* base, int B, int T, int nh, int da) {
    const size_t square = (size_t)B * nh * T * T, heads = (size_t)B * nh * T * da;
    char* p = static_cast<char*>(base);
    Scratch s;
    size_t offset = 0;
    s.scores = reinterpret_cast<float*>(p + offset);
    offset += align256(square * sizeof(float));
    s.dS = reinterpret_cast<floatX*>(p + offset);
    offset += align256(square * sizeof(floatX));
    s.heads = reinterpret_cast<floatX*>(p + offset);
    offset += align256(heads * sizeof(floatX));
    s.dqkvr = reinterpret_cast<floatX*>(p + offset);
    offset += align256(3 * heads * sizeof(floatX));
    s.bytes = offset;
    return s;
}

inline void check_head_size(int da) {
    if (da % 8 != 0) {  // covers kPack (8 in bf16, 4 in fp32)
        std::fprintf(stderr, "attention: head size d_attn = %d is not a multiple of 8\n", da);
        std::exit(1);
    }
}

}  // namespace attention_detail

// Bytes of scratch attention_forward and attention_backward need (the backward's share is larger).
inline size_t attention_scratch_bytes(int B, int T, int nh, int da) {
    return attention_detail::carve_scratch(nullptr, B, T, nh, da).bytes;
}

// ---------------------------------------------------------------------------------------------
// Permutes between token-major (B, T, parts·nh·da) rows and head-major (parts, B, nh, T, da) blocks.
// One thread moves 16 bytes; threads follow the destination's order, so writes are coalesced and
// reads come in runs of da elements.

// heads[p, b, h, t, :] = tokens[b, t, p·nh·da + h·da : +da]
__global__ void permute_to_heads_kernel(floatX* heads, const floatX* tokens, int parts, int B, int T, int nh,
                                        int da) {
    const int chunks_per_head = da / kPack;
    const int64_t total = (int64_t)parts * B * nh * T * chunks_per_head;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int64_t r = idx;
    const int c = r % chunks_per_head; r /= chunks_per_head;
    const int t = r % T; r /= T;
    const int h = r % nh; r /= nh;
    const int b = r % B;
    const int p = r / B;
    const int64_t src = ((int64_t)b * T + t) * parts * nh * da + (int64_t)(p * nh + h) * da + c * kPack;
    reinterpret_cast<int4*>(heads)[idx] = *reinterpret_cast<const int4*>(tokens + src);
}

// tokens[b, t, p·nh·da + h·da : +da] = heads[p, b, h, t, :]   (the inverse of the above)
__global__ void permute_from_heads_kernel(floatX* tokens, const floatX* heads, int parts, int B, int T, int nh,
                                          int da) {
    const int chunks_per_head = da / kPack;
    const int64_t total = (int64_t)parts * B * nh * T * chunks_per_head;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int64_t r = idx;  // idx walks tokens: (b, t, p, h, c)
    const int c = r % chunks_per_head; r /= chunks_per_head;
    const int h = r % nh; r /= nh;
    const int p = r % parts; r /= parts;
    const int t = r % T;
    const int b = r / T;
    const int64_t src = (((int64_t)p * B + b) * nh + h) * T * da + (int64_t)t * da + c * kPack;
    reinterpret_cast<int4*>(tokens)[idx] = *reinterpret_cast<const int4*>(heads + src);
}

inline void permute_to_heads(floatX* heads, const floatX* tokens, int parts, int B, int T, int nh, int da,
                             cudaStream_t stream) {
    const int64_t threads = (int64_t)parts * B * nh * T * (da / kPack);
    permute_to_heads_kernel<<<ceil_div(threads, 256), 256, 0, stream>>>(heads, tokens, parts, B, T, nh, da);
    CUDA_CHECK_LAUNCH();
}

inline void permute_from_heads(floatX* tokens, const floatX* heads, int parts, int B, int T, int nh, int da,
                               cudaStream_t stream) {
    const int64_t threads = (int64_t)parts * B * nh * T * (da / kPack);
    permute_from_heads_kernel<<<ceil_div(threads, 256), 256, 0, stream>>>(tokens, heads, parts, B, T, nh, da);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Causal softmax, one warp per row (b, h, t) of the (T, T) matrices:
//   P[t, s] = exp(scale·(S[t, s] − m)) / Σ_{s'≤t} exp(scale·(S[t, s'] − m))  for s ≤ t,  m = max_{s≤t} S[t, s]
//   P[t, s] = 0                                                               for s > t
// (scale > 0, so subtracting the raw maximum is the same as subtracting the scaled one.) The row is
// read three times (max, sum, write) and exp is evaluated twice; the second and third reads hit L1/L2.
__global__ void causal_softmax_forward_kernel(floatX* probs, const float* scores, int rows, int T, float scale) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int t = row % T;  // query position: keys s ≤ t are visible
    const float* s_row = scores + row * T;
    floatX* p_row = probs + row * T;

    float row_max = -INFINITY;
    for (int s = lane; s <= t; s += 32) row_max = fmaxf(row_max, s_row[s]);
    row_max = attention_detail::warp_max(row_max);
    float sum = 0.f;
    for (int s = lane; s <= t; s += 32) sum += expf(scale * (s_row[s] - row_max));
    const float inv_sum = 1.f / attention_detail::warp_sum(sum);
    for (int s = lane; s < T; s += 32)
        p_row[s] = from_float<floatX>(s <= t ? expf(scale * (s_row[s] - row_max)) * inv_sum : 0.f);
}

// Backward of P = causal_softmax(scale·S), one warp per row, with the scale folded in:
//   dS[t, s] = scale · P[t, s] · (dP[t, s] − Σ_{s'≤t} P[t, s'] dP[t, s'])   for s ≤ t,  0 for s > t
__global__ void causal_softmax_backward_kernel(floatX* dS, const float* dP, const floatX* probs, int rows, int T,
                                               float scale) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int t = row % T;
    const float* dp_row = dP + row * T;
    const floatX* p_row = probs + row * T;
    floatX* ds_row = dS + row * T;

    float p_dot_dp = 0.f;
    for (int s = lane; s <= t; s += 32) p_dot_dp += to_float(p_row[s]) * dp_row[s];
    p_dot_dp = attention_detail::warp_sum(p_dot_dp);
    for (int s = lane; s < T; s += 32)
        ds_row[s] = from_float<floatX>(s <= t ? scale * to_float(p_row[s]) * (dp_row[s] - p_dot_dp) : 0.f);
}

inline void causal_softmax_forward(floatX* probs, const float* scores, int rows, int T, float scale,
                                   cudaStream_t stream) {
    using attention_detail::kRowsPerBlock;
    causal_softmax_forward_kernel<<<ceil_div(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
        probs, scores, rows, T, scale);
    CUDA_CHECK_LAUNCH();
}

inline void causal_softmax_backward(floatX* dS, const float* dP, const floatX* probs, int rows, int T, float scale,
                                    cudaStream_t stream) {
    using attention_detail::kRowsPerBlock;
    causal_softmax_backward_kernel<<<ceil_div(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
        dS, dP, probs, rows, T, scale);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// The batched GEMMs, one batch entry per (b, h), in the three shapes attention needs. Row-major
// (T, da) head blocks and (T, T) square blocks are read by column-major cuBLAS as their transposes
// (see dense/matmul.cuh); each helper states its row-major product and its column-major form.
// fp32 accumulation throughout; C is fp32 or floatX as the caller needs.
namespace attention_detail {

// C (T, T) = A (T, da) · B (T, da)^T, i.e. C[t, s] = Σ_i A[t, i] B[s, i]; C fp32.
// Column-major: C^T (T×T) = op_T(B^T) (T×da) · A^T (da×T).
inline void gemm_rows_by_rows(cublasHandle_t handle, float* C, const floatX* A, const floatX* Bm, int batch, int T,
                              int da) {
    const float one = 1.f, zero = 0.f;
    const long long head = (long long)T * da, square = (long long)T * T;
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, T, T, da, &one, Bm, kCudaFloatX, da,
                                            head, A, kCudaFloatX, da, head, &zero, C, CUDA_R_32F, T, square, batch,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// C (T, da) = Sq (T, T) · Hd (T, da), i.e. C[t, i] = Σ_s Sq[t, s] Hd[s, i]; C floatX.
// Column-major: C^T (da×T) = Hd^T (da×T) · Sq^T (T×T).
inline void gemm_square_by_rows(cublasHandle_t handle, floatX* C, const floatX* Sq, const floatX* Hd, int batch,
                                int T, int da) {
    const float one = 1.f, zero = 0.f;
    const long long head = (long long)T * da, square = (long long)T * T;
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, da, T, T, &one, Hd, kCudaFloatX, da,
                                            head, Sq, kCudaFloatX, T, square, &zero, C, kCudaFloatX, da, head, batch,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// C (T, da) = Sq (T, T)^T · Hd (T, da), i.e. C[s, i] = Σ_t Sq[t, s] Hd[t, i]; C floatX.
// Column-major: C^T (da×T) = Hd^T (da×T) · op_T(Sq^T) (T×T).
inline void gemm_square_transposed_by_rows(cublasHandle_t handle, floatX* C, const floatX* Sq, const floatX* Hd,
                                           int batch, int T, int da) {
    const float one = 1.f, zero = 0.f;
    const long long head = (long long)T * da, square = (long long)T * T;
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, da, T, T, &one, Hd, kCudaFloatX, da,
                                            head, Sq, kCudaFloatX, T, square, &zero, C, kCudaFloatX, da, head, batch,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace attention_detail

// ---------------------------------------------------------------------------------------------
// Forward.
//   out:     (B, T, nh·da) floatX, written
//   probs:   (B, nh, T, T) floatX, written; zero above the diagonal; keep for the backward
//   qkvr:    (3, B, nh, T, da) floatX, written: q, k, v per head; keep for the backward
//   scratch: attention_scratch_bytes(B, T, nh, da) bytes, 256-byte aligned (cudaMalloc is)
//   qkv:     (B, T, 3·nh·da) floatX, rows [q | k | v]
inline void attention_forward(cublasHandle_t handle, floatX* out, floatX* probs, floatX* qkvr, void* scratch,
                              const floatX* qkv, int B, int T, int nh, int da, cudaStream_t stream) {
    attention_detail::check_head_size(da);
    const attention_detail::Scratch s = attention_detail::carve_scratch(scratch, B, T, nh, da);
    const int batch = B * nh;
    const size_t head_block = (size_t)batch * T * da;
    const floatX *q = qkvr, *k = qkvr + head_block, *v = qkvr + 2 * head_block;
    CUBLAS_CHECK(cublasSetStream(handle, stream));

    permute_to_heads(qkvr, qkv, 3, B, T, nh, da, stream);
    attention_detail::gemm_rows_by_rows(handle, s.scores, q, k, batch, T, da);        // S = Q K^T
    causal_softmax_forward(probs, s.scores, batch * T, T, 1.f / std::sqrt((float)da), stream);
    attention_detail::gemm_square_by_rows(handle, s.heads, probs, v, batch, T, da);   // O = P V
    permute_from_heads(out, s.heads, 1, B, T, nh, da, stream);
}

// Backward.
//   dqkv:    (B, T, 3·nh·da) floatX, written (not accumulated): [dq | dk | dv]
//   dout:    (B, T, nh·da) floatX
//   qkvr, probs: as left by attention_forward
//   scratch: attention_scratch_bytes(B, T, nh, da) bytes, 256-byte aligned
inline void attention_backward(cublasHandle_t handle, floatX* dqkv, const floatX* dout, const floatX* qkvr,
                               const floatX* probs, void* scratch, int B, int T, int nh, int da, cudaStream_t stream) {
    attention_detail::check_head_size(da);
    const attention_detail::Scratch s = attention_detail::carve_scratch(scratch, B, T, nh, da);
    const int batch = B * nh;
    const size_t head_block = (size_t)batch * T * da;
    const floatX *q = qkvr, *k = qkvr + head_block, *v = qkvr + 2 * head_block;
    floatX *dq = s.dqkvr, *dk = s.dqkvr + head_block, *dv = s.dqkvr + 2 * head_block;
    floatX* dO = s.heads;
    float* dP = s.scores;
    CUBLAS_CHECK(cublasSetStream(handle, stream));

    permute_to_heads(dO, dout, 1, B, T, nh, da, stream);
    attention_detail::gemm_square_transposed_by_rows(handle, dv, probs, dO, batch, T, da);  // dV = P^T dO
    attention_detail::gemm_rows_by_rows(handle, dP, dO, v, batch, T, da);                   // dP = dO V^T
    causal_softmax_backward(s.dS, dP, probs, batch * T, T, 1.f / std::sqrt((float)da), stream);
    attention_detail::gemm_square_by_rows(handle, dq, s.dS, k, batch, T, da);               // dQ = dS K
    attention_detail::gemm_square_transposed_by_rows(handle, dk, s.dS, q, batch, T, da);    // dK = dS^T Q
    permute_from_heads(dqkv, s.dqkvr, 3, B, T, nh, da, stream);
}

}  // namespace lmoe
