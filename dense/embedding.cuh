// Token embedding (SPEC §2): x0 = W_te[tokens], no positional embedding (rotary embedding does that
// job inside attention). The forward is a row gather; the backward scatters rows of dx into dW_te
// without floating-point atomics, in a fixed order, so it is bitwise reproducible (SPEC §4).
// Rows move 16 bytes at a time, so the width d must be a multiple of 8.
#pragma once
#include <algorithm>
#include <cstdint>

#include "util/block_scan.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

namespace embedding_detail {

// The backward's counting sort ranks positions within chunks of this many tokens, one block each.
constexpr int kSortChunk = 1024;

inline void check_width(int d, const char* call) {
    if (d <= 0 || d % 8 != 0) die("argument", "embedding width d must be a positive multiple of 8", call, __FILE__, __LINE__);
}

// The backward's sum runs on a fixed grid of this many blocks, each taking every kSumBlocks-th id.
constexpr int kSumBlocks = 1024;

// Where the pieces of the backward's scratch buffer live (all int32):
//   chunk_count (n_chunks, Vp): occurrences of id v in chunk c, then (in place) those in chunks < c
//   n_distinct  (1):            number of distinct ids in the batch (zeroed with chunk_count)
//   id_start    (Vp + 1):       first position of id v in `order`; id_start[Vp] = N
//   rank        (N):            occurrences of tokens[t] at earlier positions of t's chunk
//   order       (N):            token positions grouped by id, increasing within each id
//   distinct    (N):            the n_distinct ids present, in no particular order
struct SortScratch {
    int *chunk_count, *n_distinct, *id_start, *rank, *order, *distinct;
    int n_chunks;
    SortScratch(void* scratch, int N, int Vp) {
        n_chunks = (int)ceil_div(N, kSortChunk);
        chunk_count = static_cast<int*>(scratch);
        n_distinct = chunk_count + (int64_t)n_chunks * Vp;
        id_start = n_distinct + 1;
        rank = id_start + Vp + 1;
        order = rank + N;
        distinct = order + N;
    }
    static size_t ints(int N, int Vp) { return (size_t)ceil_div(N, kSortChunk) * Vp + 1 + Vp + 1 + 3 * (size_t)N; }
};

}  // namespace embedding_detail

// x[t, :] = wte[tokens[t], :]; one thread per 16 bytes of x.
// x: (N, d) floatX; tokens: (N) int32, each < Vp; wte: (Vp, d) floatX.
__global__ void embedding_forward_kernel(floatX* __restrict__ x, const int* __restrict__ tokens,
                                         const floatX* __restrict__ wte, int N, int d) {
    using namespace embedding_detail;
    const int packs_per_row = d / kPack;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)N * packs_per_row) return;
    const int t = (int)(i / packs_per_row), p = (int)(i % packs_per_row);
    reinterpret_cast<Pack*>(x + (int64_t)t * d)[p] = reinterpret_cast<const Pack*>(wte + (int64_t)tokens[t] * d)[p];
}

inline void embedding_forward(floatX* x, const int* tokens, const floatX* wte, int N, int d, cudaStream_t stream) {
    embedding_detail::check_width(d, "embedding_forward");
    const int64_t threads = (int64_t)N * (d / kPack);
    if (threads == 0) return;
    embedding_forward_kernel<<<ceil_div(threads, 256), 256, 0, stream>>>(x, tokens, wte, N, d);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Backward: dwte[v, :] += dx[t, :] for t = 0, 1, ..., N−1 with tokens[t] = v, added one row at a time
// in increasing t, in fp32: exactly ref::embedding_backward's sequential loop, so the result does not
// depend on scheduling and equals a sequential fp32 sum bit for bit. To get there without float atomics
// the positions are first grouped by id with a stable counting sort (integer work only, whose atomics
// give the same result in any order), then one block per distinct id walks its positions in order:
//   1. rank:   per chunk of kSortChunk positions, each position's rank among equal ids earlier in the
//              chunk, and each id's count in the chunk;
//   2. prefix: per id, exclusive prefix of its counts over the chunks, and its total;
//   3. starts: exclusive prefix of the totals over the ids;
//   4. place:  order[id_start[v] + (v's count in earlier chunks) + rank[t]] = t;
//   5. sum:    each id's run of `order`, by one block.
// A very frequent id is summed by one block, so its rows are read at one block's bandwidth: fine for
// natural text with GPT-2's vocabulary (its commonest token is a few % of a batch); slow when much of
// a batch is one id, as with a byte-level vocabulary, where the space is ~15% of all tokens.

// Step 1. A position's rank in its chunk counts its id among the earlier warps' ids (a uniform loop
// over shared memory, 4 ids per load) and among the lower lanes of its own warp
// (one __match_any_sync). The chunk's count of an id is the largest rank + 1: an integer atomicMax,
// whose result does not depend on the order the atomics land in.
__global__ void __launch_bounds__(embedding_detail::kSortChunk)
    embedding_rank_in_chunk_kernel(int* rank, int* chunk_count, const int* tokens, int N, int Vp) {
    using namespace embedding_detail;
    __shared__ alignas(16) int chunk_tokens[kSortChunk];
    const int i = threadIdx.x, t = blockIdx.x * kSortChunk + i, lane = i % 32;
    chunk_tokens[i] = t < N ? tokens[t] : -1;  // -1: past the end, never equal to an id
    __syncthreads();
    const int v = chunk_tokens[i];
    int earlier = 0;
    for (int j = 0; j < i - lane; j += 4) {
        const int4 ids = *reinterpret_cast<const int4*>(chunk_tokens + j);
        earlier += (ids.x == v) + (ids.y == v) + (ids.z == v) + (ids.w == v);
    }
    earlier += __popc(__match_any_sync(0xffffffff, v) & ((1u << lane) - 1));
    if (t >= N) return;
    rank[t] = earlier;
    atomicMax(chunk_count + (int64_t)blockIdx.x * Vp + v, earlier + 1);
}

// Step 2. One thread per id walks the chunks (reads are coalesced across ids), 8 chunks per batch of
// loads so that they are in flight together. (Loads under a condition would not be: the compiler
// waits for a load issued in a possibly divergent branch before the warp reconverges.)
__global__ void embedding_chunk_prefix_kernel(int* chunk_count, int* id_total, int n_chunks, int Vp) {
    constexpr int kBatch = 8;
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= Vp) return;
    int running = 0;
    for (int c0 = 0; c0 < n_chunks; c0 += kBatch) {
        int count[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; k++) {  // unconditional loads (clamped chunk), so that all are in flight
            const int loaded = chunk_count[(int64_t)min(c0 + k, n_chunks - 1) * Vp + v];
            count[k] = c0 + k < n_chunks ? loaded : 0;
        }
#pragma unroll
        for (int k = 0; k < kBatch; k++) {
            if (c0 + k < n_chunks) chunk_count[(int64_t)(c0 + k) * Vp + v] = running;
            running += count[k];
        }
    }
    id_total[v] = running;
}

// Step 3. One block: id_start[v] holds v's total on entry and its exclusive prefix on exit;
// id_start[Vp] = Σ totals. The ids go through shared memory in tiles of 8192 (coalesced loads and
// stores); in a tile each thread scans 8 consecutive ids serially and the block scans the threads'
// sums (util/block_scan.cuh); a running carry links the tiles.
__global__ void __launch_bounds__(1024) embedding_id_start_kernel(int* id_start, int Vp) {
    constexpr int kPerThread = 8, kTile = 1024 * kPerThread;
    __shared__ int tile[kTile];
    const int tid = threadIdx.x;
    int carry = 0;  // Σ totals of the earlier tiles
    for (int base = 0; base < Vp; base += kTile) {
#pragma unroll
        for (int k = 0; k < kPerThread; k++) {  // unconditional loads (clamped id), so that all are in flight
            const int v = base + k * 1024 + tid;
            const int loaded = id_start[min(v, Vp - 1)];
            tile[k * 1024 + tid] = v < Vp ? loaded : 0;
        }
        __syncthreads();
        int before[1] = {0}, total[1];  // this thread's sum, then the sum of the threads before it
        for (int k = 0; k < kPerThread; k++) before[0] += tile[tid * kPerThread + k];
        block_exclusive_scan(before, total);
        int running = carry + before[0];
        for (int k = 0; k < kPerThread; k++) {
            const int count = tile[tid * kPerThread + k];
            tile[tid * kPerThread + k] = running;
            running += count;
        }
        __syncthreads();
        for (int k = 0; k < kPerThread; k++) {
            const int v = base + k * 1024 + tid;
            if (v < Vp) id_start[v] = tile[k * 1024 + tid];
        }
        carry += total[0];
        __syncthreads();  // before the next tile overwrites tile[]
    }
    if (tid == 0) id_start[Vp] = carry;
}

// Step 4. Distinct positions get distinct slots, so the order of these writes does not matter. The
// first position of each id also appends the id to `distinct`; the list's order depends on the
// atomics' timing, but it only decides which block sums which id, never what a sum is.
__global__ void embedding_place_kernel(int* order, int* distinct, int* n_distinct, const int* tokens, const int* rank,
                                       const int* chunk_count, const int* id_start, int N, int Vp) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    const int v = tokens[t];
    const int64_t chunk = t / embedding_detail::kSortChunk;
    const int index_in_run = chunk_count[chunk * Vp + v] + rank[t];
    order[id_start[v] + index_in_run] = t;
    if (index_in_run == 0) distinct[atomicAdd(n_distinct, 1)] = v;
}

// Step 5. Block b sums the ids distinct[b], distinct[b + kSumBlocks], ...

// dwte_row[:] += dx[order[s], :] for s = first, ..., end − 1, in that order (fp32 accumulators, starting
// from dwte_row). Each warp owns 32·kPack columns (a lane kPack of them) and keeps as many loads in
// flight as registers allow: it fetches the next 32 row indices with one coalesced load while it reads
// the current 32 rows, 16 at a time, and only then adds them in order. One warp per column range
// reads the whole run, which is what keeps the sum sequential, and what makes a huge run slow.
// The loads are unconditional (lanes past d or slots past the run read a valid stand-in and do not
// add it): a load inside a divergent branch makes the compiler wait for it before the warp
// reconverges, which serialises the 16 loads.
__device__ inline void embedding_sum_run(float* dwte_row, const floatX* dx, const int* order, int first, int end,
                                         int d) {
    using namespace embedding_detail;
    constexpr int kRowsInFlight = 16;
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int col0 = threadIdx.x / 32 * 32 * kPack; col0 < d; col0 += warps * 32 * kPack) {
        const bool active = col0 + lane * kPack < d;  // inactive lanes fetch indices and take part in shuffles
        const int col = active ? col0 + lane * kPack : 0;
        float4* out = reinterpret_cast<float4*>(dwte_row + col);
        float acc[kPack];
#pragma unroll
        for (int k = 0; k < kPack; k += 4) {
            const float4 o = out[k / 4];
            acc[k] = o.x;
            acc[k + 1] = o.y;
            acc[k + 2] = o.z;
            acc[k + 3] = o.w;
        }
        int my_row = order[min(first + lane, end - 1)];  // row of slot s0 + lane; past the run, a stand-in
        for (int s0 = first; s0 < end; s0 += 32) {
            const int next_row = order[min(s0 + 32 + lane, end - 1)];
            const int batch = min(32, end - s0);
            for (int r0 = 0; r0 < batch; r0 += kRowsInFlight) {
                Pack rows[kRowsInFlight];
#pragma unroll
                for (int r = 0; r < kRowsInFlight; r++) {
                    const int row = __shfl_sync(0xffffffff, my_row, r0 + r);
                    rows[r] = *reinterpret_cast<const Pack*>(dx + (int64_t)row * d + col);
                }
#pragma unroll
                for (int r = 0; r < kRowsInFlight; r++)
#pragma unroll
                    for (int k = 0; k < kPack; k++)
                        if (r0 + r < batch) acc[k] += to_float(rows[r].v[k]);
            }
            my_row = next_row;
        }
        if (active)
#pragma unroll
            for (int k = 0; k < kPack; k += 4) out[k / 4] = make_float4(acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
    }
}

// dwte: (Vp, d) fp32; dx: (N, d) floatX.
__global__ void embedding_backward_sum_kernel(float* dwte, const floatX* dx, const int* order, const int* distinct,
                                              const int* n_distinct, const int* id_start, int d) {
    const int ids = *n_distinct;
    for (int i = blockIdx.x; i < ids; i += gridDim.x) {
        const int v = distinct[i];
        embedding_sum_run(dwte + (int64_t)v * d, dx, order, id_start[v], id_start[v + 1], d);
    }
}

// Bytes of scratch embedding_backward needs for N tokens and a padded vocabulary of Vp ids.
inline size_t embedding_backward_scratch_bytes(int N, int Vp) {
    return sizeof(int) * embedding_detail::SortScratch::ints(N, Vp);
}

// dwte (Vp, d) fp32 += scatter of dx (N, d) floatX by tokens (N) int32; scratch: embedding_backward_scratch_bytes.
inline void embedding_backward(float* dwte, const floatX* dx, const int* tokens, int N, int d, int Vp, void* scratch,
                               cudaStream_t stream) {
    using namespace embedding_detail;
    check_width(d, "embedding_backward");
    if (N == 0) return;
    SortScratch s(scratch, N, Vp);
    CUDA_CHECK(cudaMemsetAsync(s.chunk_count, 0, sizeof(int) * ((size_t)s.n_chunks * Vp + 1), stream));  // + n_distinct
    embedding_rank_in_chunk_kernel<<<s.n_chunks, kSortChunk, 0, stream>>>(s.rank, s.chunk_count, tokens, N, Vp);
    CUDA_CHECK_LAUNCH();
    embedding_chunk_prefix_kernel<<<ceil_div(Vp, 256), 256, 0, stream>>>(s.chunk_count, s.id_start, s.n_chunks, Vp);
    CUDA_CHECK_LAUNCH();
    embedding_id_start_kernel<<<1, 1024, 0, stream>>>(s.id_start, Vp);
    CUDA_CHECK_LAUNCH();
    embedding_place_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(s.order, s.distinct, s.n_distinct, tokens, s.rank,
                                                                  s.chunk_count, s.id_start, N, Vp);
    CUDA_CHECK_LAUNCH();
    const int threads = (int)std::min<int64_t>(256, 32 * ceil_div(d / kPack, 32));
    embedding_backward_sum_kernel<<<std::min(N, kSumBlocks), threads, 0, stream>>>(dwte, dx, s.order, s.distinct,
                                                                                 s.n_distinct, s.id_start, d);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
