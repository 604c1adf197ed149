// A prefix sum over the threads of one block, for the kernels that turn per-thread counts into
// offsets in one block (moe/routing_plan.cuh's grouping, the expert weight gradient's part list,
// dense/embedding.cuh's id offsets).
#pragma once

namespace lmoe {

// Exclusive prefix sums of N counts over the threads of a block (blockDim.x a multiple of 32, at most
// 1024), in thread order: v[i] becomes the sum of v[i] over the threads before this one, and every
// thread gets the totals. Integers: exact in any order.
template <int N>
__device__ inline void block_exclusive_scan(int (&v)[N], int (&total)[N]) {
    __shared__ int warp_sums[N][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int inclusive[N];  // within the warp
#pragma unroll
    for (int i = 0; i < N; i++) inclusive[i] = v[i];
    for (int offset = 1; offset < 32; offset <<= 1)
#pragma unroll
        for (int i = 0; i < N; i++) {
            const int up = __shfl_up_sync(0xffffffff, inclusive[i], offset);
            if (lane >= offset) inclusive[i] += up;
        }
    if (lane == 31)
#pragma unroll
        for (int i = 0; i < N; i++) warp_sums[i][warp] = inclusive[i];
    __syncthreads();
    if (warp == 0)
#pragma unroll
        for (int i = 0; i < N; i++) {
            int w = lane < warps ? warp_sums[i][lane] : 0;
            for (int offset = 1; offset < 32; offset <<= 1) {
                const int up = __shfl_up_sync(0xffffffff, w, offset);
                if (lane >= offset) w += up;
            }
            warp_sums[i][lane] = w;  // now inclusive over warps
        }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; i++) {
        v[i] = (warp > 0 ? warp_sums[i][warp - 1] : 0) + inclusive[i] - v[i];
        total[i] = warp_sums[i][warps - 1];
    }
}

}  // namespace lmoe
