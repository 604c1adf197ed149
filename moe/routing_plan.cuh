// Grouping routed copies by (head, expert) and putting the expert outputs back (SPEC §4).
//
// Each of the H·M·k copies (head h, row t, slot j) goes to group g = h·E + sel[h, t, j]. Copies are
// laid out group after group, and inside a group by increasing row: a stable counting sort, so the
// layout — and every sum taken in it — is the same on every run. Groups are cut into tiles of
// kExpertTileRows rows (a tile never mixes experts); the tile list is built on the device, so no
// count ever travels to the host.
#pragma once
#include "util/cuda_utils.cuh"

namespace lmoe {

constexpr int kGroupChunkRows = 256;  // rows counted and placed by one block
constexpr int kExpertTileRows = 128;  // rows of one expert tile (moe/latent/io_experts.cuh)

// Where every copy went; device pointers (copies = H·M·k; tiles: routing_max_tiles; chunk_counts:
// H · routing_chunks(M) · E).
struct RoutingPlan {
    int* sel;           // (H, M, k) chosen experts
    float* gate;        // (H, M, k) their gates
    int* group_offset;  // (H·E + 1) first copy of each group; the last entry is H·M·k
    int* copy_row;      // (H·M·k) source row t of each copy, in group order
    int* copy_pos;      // (H, M, k) where copy (h, t, j) sits in group order
    int* tile_group;    // (max_tiles) group of each tile
    int* tile_start;    // (max_tiles) first copy of each tile
    int* num_tiles;     // (1) tiles in use
    int* chunk_counts;  // (H, chunks, E) scratch: copies per expert in each chunk of rows
};

inline int64_t routing_chunks(int M) { return ceil_div(M, kGroupChunkRows); }
inline int64_t routing_max_tiles(int M, int H, int E, int k) {
    return ceil_div((int64_t)H * M * k, kExpertTileRows) + (int64_t)H * E;
}

// Per chunk of rows: how many copies each expert of head h receives (integer atomics on shared
// memory: the counts are exact whatever the order).
__global__ void count_copies_kernel(int* chunk_counts, const int* sel, int M, int E, int k) {
    extern __shared__ int hist[];  // (E)
    const int chunk = blockIdx.x, h = blockIdx.y, chunks = gridDim.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int t = chunk * kGroupChunkRows + threadIdx.x;
    if (t < M)
        for (int j = 0; j < k; j++) atomicAdd(&hist[sel[((int64_t)h * M + t) * k + j]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[((int64_t)h * chunks + chunk) * E + e] = hist[e];
}

// One block: group sizes, their offsets (exclusive scan in group order), each chunk's first slot in
// each group (chunk_counts is overwritten with it), and the tile list.
__global__ void plan_groups_kernel(RoutingPlan plan, int H, int E, int chunks) {
    const int G = H * E;
    extern __shared__ int shared[];  // group sizes (G), then tile counts (G)
    int* size = shared;
    int* tiles = shared + G;
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
        const int h = g / E, e = g % E;
        int total = 0;
        for (int c = 0; c < chunks; c++) total += plan.chunk_counts[((int64_t)h * chunks + c) * E + e];
        size[g] = total;
        tiles[g] = (int)ceil_div(total, kExpertTileRows);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // sequential scan: a few thousand adds, once per layer
        int copies = 0, tile_count = 0;
        for (int g = 0; g < G; g++) {
            int n = size[g], nt = tiles[g];
            plan.group_offset[g] = copies;
            size[g] = tile_count;  // now: first tile of group g
            copies += n;
            tile_count += nt;
        }
        plan.group_offset[G] = copies;
        *plan.num_tiles = tile_count;
    }
    __syncthreads();
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
        const int h = g / E, e = g % E;
        int next = plan.group_offset[g];
        for (int c = 0; c < chunks; c++) {
            int* slot = plan.chunk_counts + ((int64_t)h * chunks + c) * E + e;
            int n = *slot;
            *slot = next;
            next += n;
        }
        for (int i = 0; i < tiles[g]; i++) {
            plan.tile_group[size[g] + i] = g;
            plan.tile_start[size[g] + i] = plan.group_offset[g] + i * kExpertTileRows;
        }
    }
}

// Stable placement: copy (h, t, j) with expert e lands at (its chunk's first slot in group e) + (the
// number of earlier rows of the chunk that chose e), counted from a bitmap of rows per expert.
__global__ void place_copies_kernel(RoutingPlan plan, int M, int E, int k) {
    extern __shared__ unsigned chose[];  // (E, kGroupChunkRows / 32): bit t of expert e: row t chose e
    constexpr int words = kGroupChunkRows / 32;
    const int chunk = blockIdx.x, h = blockIdx.y, chunks = gridDim.x;
    for (int i = threadIdx.x; i < E * words; i += blockDim.x) chose[i] = 0;
    __syncthreads();
    const int local = threadIdx.x, t = chunk * kGroupChunkRows + local;
    const int* my_sel = plan.sel + ((int64_t)h * M + t) * k;
    if (t < M)
        for (int j = 0; j < k; j++) atomicOr(&chose[my_sel[j] * words + local / 32], 1u << (local % 32));
    __syncthreads();
    if (t >= M) return;
    for (int j = 0; j < k; j++) {
        const int e = my_sel[j];
        const unsigned* bits = chose + e * words;
        int rank = __popc(bits[local / 32] & ((1u << (local % 32)) - 1));
        for (int w = 0; w < local / 32; w++) rank += __popc(bits[w]);
        const int pos = plan.chunk_counts[((int64_t)h * chunks + chunk) * E + e] + rank;
        plan.copy_row[pos] = t;
        plan.copy_pos[((int64_t)h * M + t) * k + j] = pos;
    }
}

// Builds the plan from plan.sel (filled by router_forward). H·E must be at most 4096.
inline void group_copies(const RoutingPlan& plan, int M, int H, int E, int k, cudaStream_t stream) {
    const int chunks = (int)routing_chunks(M);
    const dim3 grid(chunks, H);
    count_copies_kernel<<<grid, kGroupChunkRows, E * sizeof(int), stream>>>(plan.chunk_counts, plan.sel, M, E, k);
    CUDA_CHECK_LAUNCH();
    plan_groups_kernel<<<1, 1024, 2 * H * E * sizeof(int), stream>>>(plan, H, E, chunks);
    CUDA_CHECK_LAUNCH();
    place_copies_kernel<<<grid, kGroupChunkRows, E * (kGroupChunkRows / 32) * sizeof(unsigned), stream>>>(plan, M, E,
                                                                                                         k);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Weight and merge: y[t, h] = Σ_j w[h, t, j] · o[pos(h, t, j)], slots summed in order (fp32).
// o is (H·M·k, D) in group order; y is (M, ld) with head h at columns h·D.
__global__ void combine_forward_kernel(floatX* y, int64_t ld, const floatX* o, const RoutingPlan plan, int M, int H,
                                       int D, int k) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)M * H * D) return;
    const int i = (int)(idx % D), h = (int)(idx / D % H);
    const int64_t t = idx / ((int64_t)D * H);
    const int64_t slot0 = ((int64_t)h * M + t) * k;
    float acc = 0.f;
    for (int j = 0; j < k; j++) acc += plan.gate[slot0 + j] * to_float(o[(int64_t)plan.copy_pos[slot0 + j] * D + i]);
    y[t * ld + (int64_t)h * D + i] = from_float<floatX>(acc);
}

inline void combine_forward(floatX* y, int64_t ld, const floatX* o, const RoutingPlan& plan, int M, int H, int D,
                            int k, cudaStream_t stream) {
    const int64_t n = (int64_t)M * H * D;
    combine_forward_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(y, ld, o, plan, M, H, D, k);
    CUDA_CHECK_LAUNCH();
}

// Backward of the weighting, one warp per (head, row):
//   dw_j = dy · o_j;   do_j = w_j dy   (to the copy's slot, for the expert backward);
//   ds_j = w_j (dw_j − Σ_i w_i dw_i)   (the gate softmax; stored per copy for the router backward).
__global__ void combine_backward_kernel(floatX* d_o, float* ds_copy, const floatX* dy, int64_t ld, const floatX* o,
                                        const RoutingPlan plan, int M, int H, int D, int k) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (warp >= (int64_t)H * M) return;
    const int h = (int)(warp / M);
    const int64_t t = warp % M, slot0 = warp * k;
    const floatX* dyt = dy + t * ld + (int64_t)h * D;
    float my_dgate = 0.f, my_gate = 0.f;  // lane j < k holds slot j's
    for (int j = 0; j < k; j++) {
        const int64_t pos = plan.copy_pos[slot0 + j];
        const float w = plan.gate[slot0 + j];
        float dot = 0.f;
        for (int i = lane; i < D; i += 32) {
            float g = to_float(dyt[i]);
            dot += g * to_float(o[pos * D + i]);
            d_o[pos * D + i] = from_float<floatX>(w * g);
        }
        for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, offset);
        if (lane == j) {
            my_dgate = dot;
            my_gate = w;
        }
    }
    float wdw = my_gate * my_dgate;
    for (int offset = 16; offset > 0; offset >>= 1) wdw += __shfl_xor_sync(0xffffffff, wdw, offset);
    if (lane < k) ds_copy[plan.copy_pos[slot0 + lane]] = my_gate * (my_dgate - wdw);
}

inline void combine_backward(floatX* d_o, float* ds_copy, const floatX* dy, int64_t ld, const floatX* o,
                             const RoutingPlan& plan, int M, int H, int D, int k, cudaStream_t stream) {
    const int warps = 8;
    combine_backward_kernel<<<(unsigned)ceil_div((int64_t)H * M, warps), warps * 32, 0, stream>>>(d_o, ds_copy, dy, ld,
                                                                                                  o, plan, M, H, D, k);
    CUDA_CHECK_LAUNCH();
}

// The gradient of each row from its copies and the router, in the reference's order:
//   dx[t, h] = Σ_j dx_copy[pos(h, t, j)]  +  Σ_j R_h[:, e_j] ds_j      (written, not accumulated)
__global__ void gather_input_grad_kernel(floatX* dx, int64_t ld, const floatX* dx_copy, const float* ds_copy,
                                         const floatX* R, const RoutingPlan plan, int M, int H, int D, int E, int k) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)M * H * D) return;
    const int i = (int)(idx % D), h = (int)(idx / D % H);
    const int64_t t = idx / ((int64_t)D * H);
    const int64_t slot0 = ((int64_t)h * M + t) * k;
    float acc = 0.f;
    for (int j = 0; j < k; j++) acc += to_float(dx_copy[(int64_t)plan.copy_pos[slot0 + j] * D + i]);
    const floatX* Ri = R + ((int64_t)h * D + i) * E;
    for (int j = 0; j < k; j++) acc += to_float(Ri[plan.sel[slot0 + j]]) * ds_copy[plan.copy_pos[slot0 + j]];
    dx[t * ld + (int64_t)h * D + i] = from_float<floatX>(acc);
}

inline void gather_input_grad(floatX* dx, int64_t ld, const floatX* dx_copy, const float* ds_copy, const floatX* R,
                              const RoutingPlan& plan, int M, int H, int D, int E, int k, cudaStream_t stream) {
    const int64_t n = (int64_t)M * H * D;
    gather_input_grad_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(dx, ld, dx_copy, ds_copy, R, plan, M, H,
                                                                             D, E, k);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
