// Head Parallel's exchange (SPEC §3): after W_mh every rank holds all H heads of its own N tokens;
// rank q owns heads [q·H/R, (q+1)·H/R). One equal-block all-to-all moves each head block to its owner,
// which then holds its heads' sub-tokens of all R·N tokens; the reverse brings the head outputs home.
// Block sizes are fixed by (N, H, dh, R): no counts, no metadata, no host synchronisation.
#pragma once
#include "parallel/comm.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

// Between token-major rows (N, H·dh) and owner blocks (R, N, W), W = H·dh / R:
//   blocks[q][t][c] = rows[t][q·W + c]      (to_blocks), or the reverse.
__global__ void permute_head_blocks_kernel(floatX* blocks, floatX* rows, int N, int HD, int R, bool to_blocks) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)N * HD) return;
    const int W = HD / R, c = (int)(idx % W), q = (int)(idx / W % R);
    const int64_t t = idx / HD;
    floatX* b = blocks + ((int64_t)q * N + t) * W + c;
    floatX* r = rows + t * HD + (int64_t)q * W + c;
    if (to_blocks) *b = *r;
    else *r = *b;
}

inline void permute_head_blocks(floatX* blocks, floatX* rows, int N, int HD, int R, bool to_blocks,
                                cudaStream_t stream) {
    const int64_t n = (int64_t)N * HD;
    permute_head_blocks_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(blocks, rows, N, HD, R, to_blocks);
    CUDA_CHECK_LAUNCH();
}

// u (N, H·dh) here -> U (R·N, H/R·dh): this rank's heads, for the tokens of every rank (rank order).
// Returns the bytes sent to other ranks.
inline int64_t send_to_head_owners(floatX* U, floatX* scratch, const floatX* u, int N, int HD, const Comm& c,
                                   cudaStream_t stream) {
    permute_head_blocks(scratch, const_cast<floatX*>(u), N, HD, c.world, true, stream);
    return all_to_all_equal(scratch, U, (size_t)N * HD / c.world, c, stream);
}

// Y (R·N, H/R·dh) at the head owner -> y (N, H·dh) back at the tokens' rank.
inline int64_t return_from_head_owners(floatX* y, floatX* scratch, const floatX* Y, int N, int HD, const Comm& c,
                                       cudaStream_t stream) {
    const int64_t bytes = all_to_all_equal(Y, scratch, (size_t)N * HD / c.world, c, stream);
    permute_head_blocks(scratch, y, N, HD, c.world, false, stream);
    return bytes;
}

}  // namespace lmoe
