// The routing plan: routed copies grouped by (head, expert), and the tile list the expert kernels walk (SPEC §4).
//
// Each of the H·M·k copies (head h, row t, slot j) goes to group g = h·E + sel[h, t, j]. Copies are
// laid out group after group, and inside a group by increasing row: a stable counting sort, so the
// layout — and every sum taken in it — is the same on every run. Groups are cut into tiles of
// kExpertTileRows rows (a tile never mixes experts); the tile list is built on the device, so no
// count ever travels to the host.
#pragma once
#include <vector>

#include "util/block_scan.cuh"
#include "util/cuda_utils.cuh"

namespace lmoe {

constexpr int kGroupChunkRows = 256;  // rows counted and placed by one block
constexpr int kExpertTileRows = 128;  // rows of one expert tile (moe/latent/io_experts.cuh)

// One layer's routing plan: where every copy went. A device view, passed by value to the kernels;
// RoutingPlans below owns the buffers. Copies (head h, row t, slot j), h < H, t < M, j < k.
struct RoutingPlan {
    int M, H, E, k;     // rows, routing groups (heads), experts per head, copies per row
    int max_tiles;      // room in the tile list: grids are launched this wide, tiles past num_tiles exit
    int* sel;           // (H, M, k) chosen experts
    float* gate;        // (H, M, k) their gates
    int* group_offset;  // (H·E + 1) first copy of each group; the last entry is the number of copies
    int* copy_row;      // (H·M·k) source row t of each copy, in group order
    int* copy_pos;      // (H, M, k) where copy (h, t, j) sits in group order
    int* tile_group;    // (max_tiles) group of each tile
    int* tile_start;    // (max_tiles) first copy of each tile
    int* num_tiles;     // (1) tiles in use
    int* chunk_counts;  // (H, routing_chunks(M), E) scratch: copies per expert in each chunk of rows
    int groups() const { return H * E; }
    int64_t copies() const { return (int64_t)H * M * k; }
};

inline int64_t routing_chunks(int M) { return ceil_div(M, kGroupChunkRows); }
// Every group may end in a part-filled tile: H·M·k / kExpertTileRows tiles, plus one per group.
inline int64_t routing_max_tiles(int M, int H, int E, int k) {
    return ceil_div((int64_t)H * M * k, kExpertTileRows) + (int64_t)H * E;
}

// The plans of a model's layers and the buffers behind them (one allocation path for the trainers
// and the tests). routed(): plans the router fills (sel, gate) and group_copies completes. received():
// Expert Parallel's owner plans, built from counts by build_owner_plan: up to `rows` copies that
// arrived for E owned experts, one copy per row (k = 1), no sel, gate, copy_pos or chunk scratch.
class RoutingPlans {
  public:
    static RoutingPlans routed(int layers, int M, int H, int E, int k) { return RoutingPlans(layers, M, H, E, k, true); }
    static RoutingPlans received(int layers, int rows, int E) { return RoutingPlans(layers, rows, 1, E, 1, false); }

    RoutingPlan operator[](int l) const {
        const int64_t n = shape_.copies(), G = shape_.groups(), tiles = shape_.max_tiles;
        RoutingPlan p = shape_;
        p.sel = at(sel_, l * n);
        p.gate = at(gate_, l * n);
        p.copy_pos = at(copy_pos_, l * n);
        p.group_offset = group_offset_.get() + l * (G + 1);
        p.copy_row = copy_row_.get() + l * n;
        p.tile_group = tile_group_.get() + l * tiles;
        p.tile_start = tile_start_.get() + l * tiles;
        p.num_tiles = num_tiles_.get() + l;
        p.chunk_counts = chunk_counts_.get();  // scratch: shared by every layer
        return p;
    }
    int layers() const { return layers_; }
    // Layer l's chosen experts (H, M, k), on the host.
    std::vector<int> selection(int l) const {
        std::vector<int> all = sel_.download();
        return std::vector<int>(all.begin() + l * shape_.copies(), all.begin() + (l + 1) * shape_.copies());
    }
    // Every entry of every plan set to -1 (NaN for the gates): tests poison before a run, so an entry
    // the kernels never wrote cannot pass for a right one.
    void poison() {
        for (auto* b : {&sel_, &group_offset_, &copy_row_, &copy_pos_, &tile_group_, &tile_start_, &num_tiles_})
            if (b->size()) b->poison();
        if (gate_.size()) gate_.poison();
    }

  private:
    RoutingPlans(int layers, int M, int H, int E, int k, bool routed) : layers_(layers) {
        shape_ = {M, H, E, k, (int)routing_max_tiles(M, H, E, k)};
        const size_t L = layers, n = shape_.copies(), tiles = shape_.max_tiles;
        if (routed) {
            sel_.resize(L * n); gate_.resize(L * n); copy_pos_.resize(L * n);
            chunk_counts_.resize((size_t)H * routing_chunks(M) * E);
        }
        copy_row_.resize(L * n);
        group_offset_.resize(L * (shape_.groups() + 1));
        tile_group_.resize(L * tiles); tile_start_.resize(L * tiles); num_tiles_.resize(L);
    }
    template <class T> static T* at(const DeviceBuffer<T>& b, int64_t offset) { return b.size() ? b.get() + offset : nullptr; }

    int layers_;
    RoutingPlan shape_{};  // the shape; its pointers stay null
    DeviceBuffer<int> sel_, copy_pos_, copy_row_, group_offset_, tile_group_, tile_start_, num_tiles_, chunk_counts_;
    DeviceBuffer<float> gate_;
};

// Per chunk of rows: how many copies each expert of head h receives (integer atomics on shared
// memory: the counts are exact whatever the order).
__global__ void count_copies_kernel(int* chunk_counts, const int* sel, int M, int E, int k) {
    extern __shared__ int hist[];  // (E)
    const int chunk = blockIdx.x, h = blockIdx.y, chunks = gridDim.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int t = chunk * kGroupChunkRows + threadIdx.x;
    if (t < M)
        for (int j = 0; j < k; j++) {
            const int e = sel[((int64_t)h * M + t) * k + j];
            if (e >= 0) atomicAdd(&hist[e], 1);  // e < 0: a copy LocMoE's capacity dropped
        }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[((int64_t)h * chunks + chunk) * E + e] = hist[e];
}

// One block: group sizes, their offsets (exclusive scan in group order: thread i takes a run of
// consecutive groups, then a block scan), each chunk's first slot in each group (chunk_counts is
// overwritten with it), and the tile list.
__global__ void plan_groups_kernel(RoutingPlan plan, int H, int E, int chunks) {
    const int G = H * E;
    extern __shared__ int shared[];  // group sizes (G), then each group's first tile (G)
    int* size = shared;
    int* first_tile = shared + G;
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
        const int* counts = plan.chunk_counts + (int64_t)(g / E) * chunks * E + g % E;
        int total = 0;
#pragma unroll 8
        for (int c = 0; c < chunks; c++) total += counts[(int64_t)c * E];
        size[g] = total;
    }
    __syncthreads();
    const int span = (int)ceil_div(G, blockDim.x), g0 = min(G, (int)threadIdx.x * span), g1 = min(G, g0 + span);
    int before[2] = {0, 0}, all[2];  // copies, tiles
    for (int g = g0; g < g1; g++) {
        before[0] += size[g];
        before[1] += (int)ceil_div(size[g], kExpertTileRows);
    }
    block_exclusive_scan(before, all);
    int copies = before[0], tiles = before[1];
    const int all_copies = all[0], all_tiles = all[1];
    for (int g = g0; g < g1; g++) {
        plan.group_offset[g] = copies;
        first_tile[g] = tiles;
        copies += size[g];
        tiles += (int)ceil_div(size[g], kExpertTileRows);
    }
    if (threadIdx.x == 0) {
        plan.group_offset[G] = all_copies;
        *plan.num_tiles = all_tiles;
    }
    __syncthreads();
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
        int* slots = plan.chunk_counts + (int64_t)(g / E) * chunks * E + g % E;
        int next = plan.group_offset[g];
        for (int c0 = 0; c0 < chunks; c0 += 8) {  // eight loads in flight, then their stores
            int n[8];
#pragma unroll
            for (int i = 0; i < 8; i++) n[i] = c0 + i < chunks ? slots[(int64_t)(c0 + i) * E] : 0;
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (c0 + i < chunks) {
                    slots[(int64_t)(c0 + i) * E] = next;
                    next += n[i];
                }
        }
        const int nt = (int)ceil_div(size[g], kExpertTileRows);
        for (int i = 0; i < nt; i++) {
            plan.tile_group[first_tile[g] + i] = g;
            plan.tile_start[first_tile[g] + i] = plan.group_offset[g] + i * kExpertTileRows;
        }
    }
}

// Stable placement: copy (h, t, j) with expert e lands at (its chunk's first slot in group e) + (the
// number of earlier rows of the chunk that chose e), counted from a bitmap of rows per expert.
// kPlaceThreadsPerRow threads share a row's k slots (slot j to thread j mod kPlaceThreadsPerRow), so
// that a block holds enough warps to hide the latency of its loads.
constexpr int kPlaceThreadsPerRow = 4;
__global__ void __launch_bounds__(kGroupChunkRows * kPlaceThreadsPerRow)
    place_copies_kernel(RoutingPlan plan, int M, int E, int k) {
    extern __shared__ unsigned chose[];  // (E, kGroupChunkRows / 32): bit t of expert e: row t chose e
    constexpr int words = kGroupChunkRows / 32;
    const int chunk = blockIdx.x, h = blockIdx.y, chunks = gridDim.x;
    for (int i = threadIdx.x; i < E * words; i += blockDim.x) chose[i] = 0;
    __syncthreads();
    const int local = threadIdx.x % kGroupChunkRows, first = threadIdx.x / kGroupChunkRows;
    const int t = chunk * kGroupChunkRows + local;
    const int* my_sel = plan.sel + ((int64_t)h * M + t) * k;
    if (t < M)
        for (int j = first; j < k; j += kPlaceThreadsPerRow)
            if (my_sel[j] >= 0) atomicOr(&chose[my_sel[j] * words + local / 32], 1u << (local % 32));
    __syncthreads();
    if (t >= M) return;
    for (int j = first; j < k; j += kPlaceThreadsPerRow) {
        const int e = my_sel[j];
        if (e < 0) {  // dropped: in no group
            plan.copy_pos[((int64_t)h * M + t) * k + j] = -1;
            continue;
        }
        const unsigned* bits = chose + e * words;
        int rank = __popc(bits[local / 32] & ((1u << (local % 32)) - 1));
        for (int w = 0; w < local / 32; w++) rank += __popc(bits[w]);
        const int pos = plan.chunk_counts[((int64_t)h * chunks + chunk) * E + e] + rank;
        plan.copy_row[pos] = t;
        plan.copy_pos[((int64_t)h * M + t) * k + j] = pos;
    }
}

// Builds the plan from plan.sel (filled by router_forward). H·E must be at most 4096. A negative sel
// (a copy LocMoE's capacity dropped, moe/locmoe_router.cuh) joins no group and gets copy_pos −1.
inline void group_copies(const RoutingPlan& plan, cudaStream_t stream) {
    const int M = plan.M, H = plan.H, E = plan.E, k = plan.k;
    const int chunks = (int)routing_chunks(M);
    const dim3 grid(chunks, H);
    count_copies_kernel<<<grid, kGroupChunkRows, E * sizeof(int), stream>>>(plan.chunk_counts, plan.sel, M, E, k);
    CUDA_CHECK_LAUNCH();
    plan_groups_kernel<<<1, 1024, 2 * H * E * sizeof(int), stream>>>(plan, H, E, chunks);
    CUDA_CHECK_LAUNCH();
    place_copies_kernel<<<grid, kGroupChunkRows * kPlaceThreadsPerRow, E * (kGroupChunkRows / 32) * sizeof(unsigned),
                          stream>>>(plan, M, E, k);
    CUDA_CHECK_LAUNCH();
}

}  // namespace lmoe
