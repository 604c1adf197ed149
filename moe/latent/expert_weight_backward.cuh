// Weight gradients of the LatentMoE experts (SPEC §4), per expert g = (head, e), over all its copies p
// (with s = K_g x_p, a = GELU(s), ds = GELU'(s) ⊙ V_g do_p as in the input gradient):
//     dV_g (+)= Σ_p a do_p^T      dK_g (+)= Σ_p ds x_p^T        (fe × dh, fp32)
// added to the gradients, or written (the first micro-batch of a step: every element, zeros for an
// expert without copies, so the gradients need no clearing before).
// A block owns a slice of fe of one expert and walks the expert's copies in order, a tile of rows at
// a time, recomputing S = X K_c^T, dA = dO V_c^T, A = GELU(S) and dS = dA ⊙ GELU'(S) per tile; so
// each gradient element has one owner and a fixed summation order (no atomics, bitwise
// reproducible).
// Crowded routing (every copy of a head on the same few experts, as in the first steps of training,
// or one head per rank at R = H) would leave the work to as few blocks as there are busy groups. So a
// group of more than WeightGradParts::rows copies is cut into parts of that many: part 0's block adds
// into (or writes) dK, dV as above, each later part's block writes its sums to a scratch slot, and
// add_weight_partials then adds the slots into dK, dV in part order — still one fixed order. The part
// size is at least twice the mean group size, so balanced routing is never cut, and no smaller than
// the scratch allows (kWeightPartialsBytes).
// Three kernels, one launcher: expert_weight_backward_kernel (fp32 SIMT), and
// expert_weight_backward_mma_kernel (tensor cores, mma.sync), which in sm_90a builds runs
// weight_backward_wgmma (below, on tc/wgmma.cuh) instead for the shapes it covers;
// expert_weight_backward picks by floatX, and around them runs list_weight_parts_kernel and
// add_weight_partials_kernel when groups may be cut.
#pragma once
#include <algorithm>

#include "moe/latent/expert_tiles.cuh"
#include "tc/wgmma.cuh"
#include "util/block_scan.cuh"

namespace lmoe {

// Scratch for the partial sums of cut groups, at most (the slots are full-size (2, fe, dh) fp32).
constexpr size_t kWeightPartialsBytes = size_t(16) << 20;

// How a plan's groups are cut for the weight gradient, and where the parts past each group's first go.
struct WeightGradParts {
    int rows;          // copies per part; 0: no group is ever cut
    int max_extra;     // slots: an upper bound on the parts past the first, over all groups
    int* extra_group;  // (max_extra) group of each later part, in group order
    int* extra_index;  // (max_extra) its part index j ≥ 1 within the group
    int* num_extra;    // (1) slots in use
    float* partials;   // (max_extra, 2, fe, dh): each later part's dK, then dV sums
};

// The part size and slot count for a plan of M rows, H heads, E experts, k copies per row, and experts
// of (fe, dh). A group holds at most M copies, and the parts past the first number at most
// H·M·k / rows in all.
inline WeightGradParts weight_grad_parts_shape(int M, int H, int E, int k, int F, int dh) {
    const int64_t copies = (int64_t)H * M * k, slot_bytes = (int64_t)2 * F * dh * sizeof(float);
    const int64_t fitting = std::max<int64_t>(1, (int64_t)(kWeightPartialsBytes / slot_bytes));
    int64_t rows = std::max(2 * ceil_div((int64_t)M * k, E), ceil_div(copies, fitting));
    rows = ceil_div(rows, kMmaWeightRows) * kMmaWeightRows;
    WeightGradParts p{};
    if (rows >= M) return p;  // no group can be cut
    p.rows = (int)rows;
    p.max_extra = (int)std::min(copies / rows, (int64_t)H * E * (ceil_div(M, rows) - 1));
    return p;
}

// The scratch behind a plan's WeightGradParts (one per trainer layer set, test or benchmark).
class WeightGradScratch {
  public:
    WeightGradScratch(int M, int H, int E, int k, int F, int dh) : shape_(weight_grad_parts_shape(M, H, E, k, F, dh)) {
        lists_.resize(2 * (size_t)shape_.max_extra + 1);
        partials_.resize((size_t)shape_.max_extra * 2 * F * dh);
    }
    static int64_t bytes(int M, int H, int E, int k, int F, int dh) {
        const WeightGradParts p = weight_grad_parts_shape(M, H, E, k, F, dh);
        return (2 * (int64_t)p.max_extra + 1) * (int64_t)sizeof(int) + (int64_t)p.max_extra * 2 * F * dh * sizeof(float);
    }
    WeightGradParts view() const {
        WeightGradParts p = shape_;
        p.extra_group = lists_.get();
        p.extra_index = lists_.get() + shape_.max_extra;
        p.num_extra = lists_.get() + 2 * shape_.max_extra;
        p.partials = partials_.get();
        return p;
    }
    // Every list entry -1 and every slot NaN: tests poison before a run (a slot or entry the kernels
    // never wrote cannot pass for a right one).
    void poison() {
        if (lists_.size()) lists_.poison();
        if (partials_.size()) partials_.poison();
    }

  private:
    WeightGradParts shape_;
    DeviceBuffer<int> lists_;
    DeviceBuffer<float> partials_;
};

// One block: each group's parts past the first, listed in group order (thread i takes a run of
// consecutive groups, then a block scan).
__global__ void list_weight_parts_kernel(WeightGradParts parts, const int* group_offset, int G) {
    const int span = (int)ceil_div(G, blockDim.x), g0 = min(G, (int)threadIdx.x * span), g1 = min(G, g0 + span);
    auto later_parts = [&](int g) {
        const int n = group_offset[g + 1] - group_offset[g];
        return n > parts.rows ? (int)ceil_div(n, parts.rows) - 1 : 0;
    };
    int first[1] = {0}, total[1];
    for (int g = g0; g < g1; g++) first[0] += later_parts(g);
    block_exclusive_scan(first, total);
    int slot = first[0];
    for (int g = g0; g < g1; g++)
        for (int j = 1; j <= later_parts(g); j++, slot++)
            if (slot < parts.max_extra) {  // always, by the bound on max_extra
                parts.extra_group[slot] = g;
                parts.extra_index[slot] = j;
            }
    if (threadIdx.x == 0) *parts.num_extra = min(total[0], parts.max_extra);
}

// The copies and the (fe, dh) sums of block `item` of the weight gradient: items below G are the groups
// (their first part, added to dK, dV or, with accumulate false, written), the rest the listed later
// parts (written to their slots).
struct WeightGradItem {
    int g, begin, end;
    float *dk, *dv;  // this group's (fe, dh) dK, dV, or the part's slot
    bool accumulate;  // += into dK, dV, or = into them or the slot
};
__device__ inline bool weight_grad_item(WeightGradItem& it, int item, const RoutingPlan& plan,
                                        const WeightGradParts& parts, float* dK, float* dV, bool accumulate, int F,
                                        int DH) {
    const int G = plan.H * plan.E;
    const int64_t matrix = (int64_t)F * DH;
    int j = 0;
    if (item < G) {
        it.g = item;
        it.dk = dK + item * matrix;
        it.dv = dV + item * matrix;
        it.accumulate = accumulate;
    } else {
        const int slot = item - G;
        if (parts.rows == 0 || slot >= *parts.num_extra) return false;
        it.g = parts.extra_group[slot];
        j = parts.extra_index[slot];
        it.dk = parts.partials + slot * 2 * matrix;
        it.dv = it.dk + matrix;
        it.accumulate = false;
    }
    const int begin = plan.group_offset[it.g], end = plan.group_offset[it.g + 1];
    it.begin = parts.rows ? begin + j * parts.rows : begin;
    it.end = parts.rows ? min(end, it.begin + parts.rows) : end;
    return true;
}

// dK, dV of every cut group += its later parts' sums, in part order: the block of a group's first slot
// walks the group's slots, four consecutive floats per thread.
__global__ void add_weight_partials_kernel(float* dK, float* dV, const WeightGradParts parts, int64_t matrix) {
    const int slot = blockIdx.y;
    if (slot >= *parts.num_extra || parts.extra_index[slot] != 1) return;
    const int g = parts.extra_group[slot];
    const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;  // in (dK, dV) of the group
    if (i >= 2 * matrix) return;
    float4* out = reinterpret_cast<float4*>(i < matrix ? dK + g * matrix + i : dV + g * matrix + (i - matrix));
    float4 v = *out;
    for (int s = slot; s < *parts.num_extra && parts.extra_group[s] == g; s++) {
        const float4 p = *reinterpret_cast<const float4*>(parts.partials + s * 2 * matrix + i);
        v = make_float4(v.x + p.x, v.y + p.y, v.z + p.z, v.w + p.w);
    }
    *out = v;
}

// fp32: one block per (kExpertChunk-wide chunk c of fe, item), kSimtTileRows copies at a time:
//   S = X K_c^T,  dA = dO V_c^T,  A = GELU(S), dS = dA ⊙ GELU'(S) → shared,
//   dV_c += A^T dO,  dK_c += dS^T X.
template <int DH>
__global__ void __launch_bounds__(kExpertThreads)
    expert_weight_backward_kernel(float* dK, float* dV, bool accumulate, const floatX* d_o, const floatX* x, int64_t ld,
                                  const floatX* K, const floatX* V, const RoutingPlan plan, const WeightGradParts parts,
                                  int E, int F) {
    using S = ExpertTileSmem<DH>;
    extern __shared__ float smem[];
    float *Xs = smem, *dOs = Xs + S::rows_floats, *Ks = dOs + S::rows_floats, *Vs = Ks + S::chunk_floats;
    float *As = Vs + S::chunk_floats, *dSs = As + S::hidden_floats;
    WeightGradItem it;
    if (!weight_grad_item(it, blockIdx.y, plan, parts, dK, dV, accumulate, F, DH)) return;
    const int g = it.g, h = g / E, f0 = blockIdx.x * kExpertChunk;
    const int64_t wofs = ((int64_t)g * F + f0) * DH;  // this chunk of expert g's K, V
    const int r = threadIdx.x / 4, cg = threadIdx.x % 4;          // for the (rows × chunk) products
    const int c = threadIdx.x / 8, col0 = threadIdx.x % 8;         // for the (chunk × dh) accumulators
    load_chunk<DH>(Ks, K + wofs);
    load_chunk<DH>(Vs, V + wofs);
    float acc_k[DH / 8] = {}, acc_v[DH / 8] = {};
    for (int p0 = it.begin; p0 < it.end; p0 += kSimtTileRows) {
        const int rows = min(kSimtTileRows, it.end - p0);
        __syncthreads();
        load_tile_rows<DH>(Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
        load_tile_rows<DH>(dOs, d_o, rows, [&](int i) { return (int64_t)(p0 + i) * DH; });
        __syncthreads();
        float s[kExpertChunk / 4], da[kExpertChunk / 4];
        tile_times_chunk_t<DH>(s, Xs, Ks, r, cg);
        tile_times_chunk_t<DH>(da, dOs, Vs, r, cg);
#pragma unroll
        for (int i = 0; i < kExpertChunk / 4; i++) {
            As[r * S::ld_chunk + cg + 4 * i] = gelu(s[i]);
            dSs[r * S::ld_chunk + cg + 4 * i] = da[i] * gelu_grad(s[i]);
        }
        __syncthreads();
        for (int rr = 0; rr < rows; rr++) {
            const float a = As[rr * S::ld_chunk + c], ds = dSs[rr * S::ld_chunk + c];
#pragma unroll
            for (int i = 0; i < DH / 8; i++) {
                acc_v[i] += a * dOs[rr * S::ld_row + col0 + 8 * i];
                acc_k[i] += ds * Xs[rr * S::ld_row + col0 + 8 * i];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DH / 8; i++) {
        const int64_t at = (int64_t)(f0 + c) * DH + col0 + 8 * i;
        it.dk[at] = it.accumulate ? it.dk[at] + acc_k[i] : acc_k[i];
        it.dv[at] = it.accumulate ? it.dv[at] + acc_v[i] : acc_v[i];
    }
}

// dK[at(j), at(j) + 1] (+)= k(j), dV[...] (+)= v(j) for N accumulator pairs of the mma.sync kernel,
// each an 8-byte read and write of both, every read issued before the first write; += with
// accumulate, = without (a part's slot, or dK, dV in a step's first micro-batch).
template <int N, class At, class K, class V>
__device__ inline void write_dk_dv_pairs(float* dK, float* dV, bool accumulate, At at, K k, V v) {
    read_all_then_write<N>(
        [&](int j) {
            float4 old{};  // dK's pair, then dV's
            if (accumulate) {
                const float2 k_old = *reinterpret_cast<const float2*>(dK + at(j));
                const float2 v_old = *reinterpret_cast<const float2*>(dV + at(j));
                old = make_float4(k_old.x, k_old.y, v_old.x, v_old.y);
            }
            return old;
        },
        [&](int j, float4 old) {
            const float2 kj = k(j), vj = v(j);
            *reinterpret_cast<float2*>(dK + at(j)) = make_float2(old.x + kj.x, old.y + kj.y);
            *reinterpret_cast<float2*>(dV + at(j)) = make_float2(old.z + vj.x, old.w + vj.y);
        });
}

constexpr int kWgmmaWeightStages = 4;  // of X, dO in the wgmma weight gradient

// Warp layouts of the weight-gradient kernel for an FC-wide slice of fe (FC = 32, 64 or 128):
//   row products S, dA (64 rows × FC): s_warps_m × s_warps_n warps of (s_rows × s_cols);
//   reductions dK, dV (FC × dh):        r_warps_f × r_warps_d warps of (r_rows × r_cols), the rest idle
//                                        (only when FC·dh is small).
template <int DH, int FC> struct MmaWeightLayout {
    static constexpr int warps = kMmaWeightThreads / 32;
    static constexpr int s_warps_n = FC / 16 < 4 ? FC / 16 : 4, s_warps_m = warps / s_warps_n;
    static constexpr int s_rows = kMmaWeightRows / s_warps_m, s_cols = FC / s_warps_n;
    static constexpr int r_warps_d = DH / 16 < 2 ? DH / 16 : 2;
    static constexpr int r_warps_f = FC / 16 < warps / r_warps_d ? FC / 16 : warps / r_warps_d;
    static constexpr int r_rows = FC / r_warps_f, r_cols = DH / r_warps_d;
    static_assert(s_rows % 16 == 0 && s_cols % 16 == 0 && r_rows % 16 == 0 && r_cols % 16 == 0, "whole mma tiles");
    // shared memory: K, V slices (FC × dh); two stages of X, dO (64 × dh); A, dS (64 × FC)
    static constexpr int ld = DH + 8, ld_hidden = FC + 8;
    static constexpr int slice_elems = FC * ld, rows_elems = kMmaWeightRows * ld, hidden_elems = kMmaWeightRows * ld_hidden;
    static constexpr size_t bytes_mma = (2 * slice_elems + 4 * rows_elems + 2 * hidden_elems) * sizeof(bf16);
    // the wgmma version (sm_90a builds): unpadded swizzled tiles, kWgmmaWeightStages stages of X, dO (A
    // and dS stay in registers), two mbarriers per stage, and 1 KB to align the tiles to 1024 bytes
    static constexpr bool on_wgmma = FC == 128 && (DH == 64 || DH == 128);
    static constexpr size_t bytes_wgmma = (2 * FC * DH + 2 * kWgmmaWeightStages * kMmaWeightRows * DH) * sizeof(bf16) +
                                          2 * kWgmmaWeightStages * sizeof(uint64_t) + 1024;
    static constexpr size_t bytes = on_wgmma && bytes_wgmma > bytes_mma ? bytes_wgmma : bytes_mma;
};

#if defined(LMOE_HAS_WGMMA)

// Weight gradients on wgmma for an FC = 128 slice of fe and dh = 64 or 128: two warpgroups, warpgroup
// w owning fe rows 64w..64w+63 of the slice. Per 64 copies (four stages of X, dO, filled three ahead):
//   S^T, dA^T (64 fe × 64 rows, registers) = K_w X^T, V_w dO^T     (K_w, V_w, X, dO K-major)
//   A^T = GELU(S^T), dS^T = dA^T ⊙ GELU'(S^T), packed to bf16 in registers
//   dV_w += A^T dO,  dK_w += dS^T X       (64 × dh accumulators; dO, X read MN-major, same tiles)
// Computing the transposes puts A^T and dS^T in the accumulator layout that the register A operand
// of the second products takes as it stands (as in expert_rows_wgmma.cuh): they never touch shared
// memory. No block barrier in the loop: a stage's full mbarrier says its rows have landed (each thread
// arrives when its copies have), its empty one that both warpgroups are done with it.
template <int DH, int FC>
__device__ inline void weight_backward_wgmma(const WeightGradItem& item, const bf16* d_o, const bf16* x, int64_t ld,
                                             const bf16* K, const bf16* V, const RoutingPlan& plan, int E, int F,
                                             unsigned char* smem_raw) {
    static_assert(FC == 128 && (DH == 64 || DH == 128), "wgmma path: fe slice 128, dh 64 or 128");
    constexpr int BR = 64, NT = kMmaWeightThreads, STAGES = kWgmmaWeightStages;
    constexpr int slice_elems = FC * DH, rows_elems = BR * DH;
    constexpr uint32_t slice_block = FC * 128, rows_block = BR * 128;  // bytes of one 64-column block
    unsigned char* smem = wgmma_align_smem(smem_raw);
    bf16* Ks = reinterpret_cast<bf16*>(smem);  // (FC, dh) swizzled
    bf16* Vs = Ks + slice_elems;                // (FC, dh)
    bf16* Xs = Vs + slice_elems;                // STAGES × (64, dh)
    bf16* dOs = Xs + STAGES * rows_elems;       // STAGES × (64, dh)
    const int g = item.g, h = g / E, f0 = blockIdx.x * FC, begin = item.begin, end = item.end;
    const int64_t wofs = ((int64_t)g * F + f0) * DH;  // this slice of expert g's K, V
    const int wg = threadIdx.x / 128;
    if (item.accumulate) {  // the slices of dK, dV the epilogue adds to (contiguous rows f0..f0 + FC)
        prefetch_l2<NT>(item.dk + (int64_t)f0 * DH, 1, FC * DH * (int)sizeof(float), 0);
        prefetch_l2<NT>(item.dv + (int64_t)f0 * DH, 1, FC * DH * (int)sizeof(float), 0);
    }
    // The X rows are gathered through copy_row: each thread's next row indices are loaded one fetch
    // ahead, so that their latency is off the path of the copies.
    const SwizzledTileCopy<BR, DH, NT> row_copy;
    int next_row[row_copy.passes];  // copy_row of this thread's rows of the next fetch; −1 past the part
    auto fetch_indices = [&](int p0) {
#pragma unroll
        for (int j = 0; j < row_copy.passes; j++) {
            const int p = p0 + row_copy.row(j);
            next_row[j] = p < end ? plan.copy_row[p] : -1;
        }
    };
    auto load_rows = [&](int p0, int stage) {  // p0: the rows fetch_indices last looked up
        bf16 *xs = Xs + stage * rows_elems, *ds = dOs + stage * rows_elems;
#pragma unroll
        for (int j = 0; j < row_copy.passes; j++) {
            const bool valid = next_row[j] >= 0;
            const int64_t x_at = (int64_t)next_row[j] * ld + (int64_t)h * DH + row_copy.col();
            const int64_t d_at = (int64_t)(p0 + row_copy.row(j)) * DH + row_copy.col();
            row_copy.issue(xs, j, valid ? x + x_at : x, valid);
            row_copy.issue(ds, j, valid ? d_o + d_at : d_o, valid);
        }
        fetch_indices(p0 + BR);
    };
    // Stages are handed on by mbarriers, not by block barriers, so a warpgroup may run ahead of the
    // other (by up to a stage) and its elementwise work overlap the other's products.
    uint64_t* full = reinterpret_cast<uint64_t*>(dOs + STAGES * rows_elems);  // a stage's rows have landed
    uint64_t* empty = full + STAGES;  // both warpgroups are done with a stage
    if (threadIdx.x == 0)
        for (int s = 0; s < STAGES; s++) {
            mbarrier_init(full + s, NT);
            mbarrier_init(empty + s, NT);
        }
    __syncthreads();  // initialised before anyone arrives
    const int steps = (int)ceil_div(end - begin, BR);
    // Step `step`'s rows into its stage: each thread issues its copies, then arrives on the stage's
    // full barrier once they have landed.
    auto fill = [&](int step) {
        load_rows(begin + step * BR, step % STAGES);
        cp_async_mbarrier_arrive(full + step % STAGES);
    };
    const auto contiguous = [](int i) { return (int64_t)i * DH; };
    if (steps > 0) {  // K, V land with step 0's rows
        load_rows_swizzled_async<DH, FC, NT>(Ks, K + wofs, FC, contiguous);
        load_rows_swizzled_async<DH, FC, NT>(Vs, V + wofs, FC, contiguous);
    }
    fetch_indices(begin);
    for (int step = 0; step < STAGES - 1 && step < steps; step++) fill(step);

    const bf16 *Kw = Ks + wg * 64 * 64, *Vw = Vs + wg * 64 * 64;  // this warpgroup's 64 fe rows (block 0)
    float acc_k[DH / 2], acc_v[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; i++) acc_k[i] = acc_v[i] = 0.f;
    for (int it = 0; it < steps; it++) {
        const int stage = it % STAGES;
        mbarrier_wait(full + stage, it / STAGES % 2);
        fence_proxy_async();
        const bf16 *Xt = Xs + stage * rows_elems, *dOt = dOs + stage * rows_elems;
        float st[32] = {}, dat[32] = {};  // S^T, dA^T (zeroed, or ptxas waits on the products to copy them)
        wgmma_fence();
        wgmma_kmajor<64, DH / 16>(st, Kw, slice_block, Xt, rows_block);
        wgmma_kmajor<64, DH / 16>(dat, Vw, slice_block, dOt, rows_block);
        wgmma_commit();
        // While they run: step it + STAGES − 1 into the stage of step it − 1, once both warpgroups are done with it.
        if (it + STAGES - 1 < steps) {
            if (it > 0) mbarrier_wait(empty + (it - 1) % STAGES, (it - 1) / STAGES % 2);
            fill(it + STAGES - 1);
        }
        wgmma_wait<0>();
        wgmma_fence_operands(st);
        wgmma_fence_operands(dat);
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const GeluAndGrad g = gelu_and_grad_fast(st[i]);
            st[i] = g.value;
            dat[i] *= g.grad;
        }
        static_assert(BR == 64, "the second products take 64 copies");
        // A^T, dS^T as the register A operands (k = copies): dV_w += A^T dO, dK_w += dS^T X
        wgmma_rs_pair_from_accumulators<DH>(acc_v, st, dOt, acc_k, dat, Xt, rows_block);
        wgmma_commit();
        wgmma_wait<0>();  // waiting here, not at the next rows, keeps ptxas from serializing the products
        mbarrier_arrive(empty + stage);
    }
    wgmma_fence_operands(acc_v);
    wgmma_fence_operands(acc_k);
    // dK, dV (+)= acc through fp32 tiles (tc/wgmma.cuh) in the freed shared memory, 2 × 64 × dh × 4
    // bytes a warpgroup: read-modify-writes of float4 pieces along the rows of the slice, 8 pieces'
    // reads of dK and dV in flight at a time.
    __syncthreads();  // both warpgroups are done with every stage and with K, V
    constexpr int tile_bytes = 64 * DH * 4;
    static_assert(2 * 2 * tile_bytes <= 2 * kWgmmaWeightStages * BR * DH * sizeof(bf16) + 2 * slice_elems * sizeof(bf16),
                  "both warpgroups' dK, dV tiles fit in the stages and K, V");
    unsigned char* tile_k = smem + wg * 2 * tile_bytes;
    unsigned char* tile_v = tile_k + tile_bytes;
    wgmma_accumulators_to_tile_f32<DH>(tile_k, acc_k);
    wgmma_accumulators_to_tile_f32<DH>(tile_v, acc_v);
    warpgroup_barrier(wg);
    const TilePiecesF32<DH> pieces_k{tile_k}, pieces_v{tile_v};
    auto at = [&](int j) { return (int64_t)(f0 + 64 * wg + pieces_k.row(j)) * DH + pieces_k.col(j); };
    struct Old {
        float4 k, v;
    };
    constexpr int batch = 8;
    static_assert(pieces_k.count % batch == 0, "whole batches of pieces");
#pragma unroll
    for (int j0 = 0; j0 < pieces_k.count; j0 += batch)
        read_all_then_write<batch>(
            [&](int j) {
                Old old{};  // zeros where the sums are written, not added
                if (item.accumulate)
                    old = {*reinterpret_cast<const float4*>(item.dk + at(j0 + j)),
                           *reinterpret_cast<const float4*>(item.dv + at(j0 + j))};
                return old;
            },
            [&](int j, Old old) {
                const float4 k = pieces_k.value(j0 + j), v = pieces_v.value(j0 + j);
                *reinterpret_cast<float4*>(item.dk + at(j0 + j)) =
                    make_float4(old.k.x + k.x, old.k.y + k.y, old.k.z + k.z, old.k.w + k.w);
                *reinterpret_cast<float4*>(item.dv + at(j0 + j)) =
                    make_float4(old.v.x + v.x, old.v.y + v.y, old.v.z + v.z, old.v.w + v.w);
            });
}
#endif  // LMOE_HAS_WGMMA

// Tensor cores: one block per (FC-wide slice c of fe, item) — slices fastest, so the blocks of a
// group run together and share its X, dO through L2. Per 64 rows: S = X K_c^T, dA = dO V_c^T in
// registers; A = GELU(S) and dS = dA ⊙ GELU'(S) parked in shared memory as bf16; then
// dV_c += A^T dO,  dK_c += dS^T X, the (FC × dh) accumulators in registers.
template <int DH, int FC>
__global__ void __launch_bounds__(kMmaWeightThreads, 1)
    expert_weight_backward_mma_kernel(float* dK, float* dV, bool accumulate, const bf16* d_o, const bf16* x, int64_t ld,
                                      const bf16* K, const bf16* V, const RoutingPlan plan, const WeightGradParts parts,
                                      int E, int F) {
    using L = MmaWeightLayout<DH, FC>;
    constexpr int BR = kMmaWeightRows, NT = kMmaWeightThreads;
    constexpr int S_MT = L::s_rows / 16, R_MT = L::r_rows / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    WeightGradItem item;
    if (!weight_grad_item(item, blockIdx.y, plan, parts, dK, dV, accumulate, F, DH)) return;
#if defined(LMOE_HAS_WGMMA)
    if constexpr (MmaWeightLayout<DH, FC>::on_wgmma) {
        weight_backward_wgmma<DH, FC>(item, d_o, x, ld, K, V, plan, E, F, smem_raw);
        return;
    }
#endif
    bf16* Ks = reinterpret_cast<bf16*>(smem_raw);  // (FC, dh)
    bf16* Vs = Ks + L::slice_elems;                 // (FC, dh)
    bf16* Xs = Vs + L::slice_elems;                 // 2 × (64, dh)
    bf16* dOs = Xs + 2 * L::rows_elems;             // 2 × (64, dh)
    bf16* As = dOs + 2 * L::rows_elems;             // (64, FC)
    bf16* dSs = As + L::hidden_elems;               // (64, FC)
    const int g = item.g, h = g / E, f0 = blockIdx.x * FC, begin = item.begin, end = item.end;
    const int64_t wofs = ((int64_t)g * F + f0) * DH;  // this slice of expert g's K, V
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const int sm0 = warp / L::s_warps_n * L::s_rows, sn0 = warp % L::s_warps_n * L::s_cols;
    const int rf0 = warp / L::r_warps_d * L::r_rows, rd0 = warp % L::r_warps_d * L::r_cols;
    const bool reducer = warp < L::r_warps_f * L::r_warps_d;
    auto load_rows = [&](int p0, int stage) {
        const int rows = min(BR, end - p0);
        load_rows_async<DH, BR, NT>(Xs + stage * L::rows_elems, x, rows,
                                    GatheredRows<DH>{plan, ld, p0, h});
        load_rows_async<DH, BR, NT>(dOs + stage * L::rows_elems, d_o + (int64_t)p0 * DH, rows,
                                    [](int i) { return (int64_t)i * DH; });
    };

    load_chunk_async<DH, FC, NT>(Ks, K + wofs);
    load_chunk_async<DH, FC, NT>(Vs, V + wofs);
    if (begin < end) load_rows(begin, 0);
    cp_async_commit();
    float acc_k[R_MT][L::r_cols / 8][4] = {}, acc_v[R_MT][L::r_cols / 8][4] = {};
    for (int p0 = begin, it = 0; p0 < end; p0 += BR, it++) {
        cp_async_wait<0>();
        __syncthreads();  // these rows have landed, and every warp is done with the previous step
        if (p0 + BR < end) load_rows(p0 + BR, (it + 1) % 2);
        cp_async_commit();
        const bf16 *Xt = Xs + (it % 2) * L::rows_elems, *dOt = dOs + (it % 2) * L::rows_elems;
        {
            float s[S_MT][L::s_cols / 8][4], da[S_MT][L::s_cols / 8][4];
            warp_mma_nt<DH, S_MT, L::s_cols>(s, Xt, L::ld, sm0, Ks, L::ld, sn0);
            warp_mma_nt<DH, S_MT, L::s_cols>(da, dOt, L::ld, sm0, Vs, L::ld, sn0);
#pragma unroll
            for (int mt = 0; mt < S_MT; mt++)
#pragma unroll
                for (int n = 0; n < L::s_cols / 8; n++)
#pragma unroll
                    for (int half = 0; half < 2; half++) {
                        const int r = sm0 + 16 * mt + gq + 8 * half, c = sn0 + n * 8 + 2 * q;
                        const GeluAndGrad g0 = gelu_and_grad_fast(s[mt][n][2 * half]),
                                          g1 = gelu_and_grad_fast(s[mt][n][2 * half + 1]);
                        *reinterpret_cast<uint32_t*>(As + r * L::ld_hidden + c) = pack_bf16x2(g0.value, g1.value);
                        *reinterpret_cast<uint32_t*>(dSs + r * L::ld_hidden + c) =
                            pack_bf16x2(da[mt][n][2 * half] * g0.grad, da[mt][n][2 * half + 1] * g1.grad);
                    }
        }
        __syncthreads();  // A and dS complete
        if (reducer) {
            warp_mma_tn<BR, R_MT, L::r_cols>(acc_v, As, L::ld_hidden, rf0, dOt, L::ld, rd0);  // dV_c += A^T dO
            warp_mma_tn<BR, R_MT, L::r_cols>(acc_k, dSs, L::ld_hidden, rf0, Xt, L::ld, rd0);  // dK_c += dS^T X
        }
    }
    if (!reducer) return;
#pragma unroll
    for (int mt = 0; mt < R_MT; mt++)
#pragma unroll
        for (int nt = 0; nt < L::r_cols / 8; nt++)
            write_dk_dv_pairs<2>(  // the pairs of rows gq and gq + 8
                item.dk, item.dv, item.accumulate,
                [&](int half) { return (int64_t)(f0 + rf0 + 16 * mt + gq + 8 * half) * DH + rd0 + nt * 8 + 2 * q; },
                [&](int half) { return make_float2(acc_k[mt][nt][2 * half], acc_k[mt][nt][2 * half + 1]); },
                [&](int half) { return make_float2(acc_v[mt][nt][2 * half], acc_v[mt][nt][2 * half + 1]); });
}

// fe slice of the tensor-core weight gradient: the widest, 128, reads the group's X and dO the fewest
// times and is the shape the wgmma version covers.
constexpr int kWeightBackwardSlice = 128;

// dK, dV (H, E, fe, dh) fp32, added to (accumulate) or written, from d_o (copies, dh); `parts` (the
// plan's shape's WeightGradScratch) says how crowded groups are cut.
inline void expert_weight_backward(float* dK, float* dV, bool accumulate, const floatX* d_o, const floatX* x,
                                   int64_t ld, const floatX* K, const floatX* V, const RoutingPlan& plan,
                                   const WeightGradParts& parts, int dh, int F, cudaStream_t stream) {
    const int E = plan.E, G = plan.H * plan.E, items = G + parts.max_extra;
    if (parts.rows) {
        list_weight_parts_kernel<<<1, 1024, 0, stream>>>(parts, plan.group_offset, G);
        CUDA_CHECK_LAUNCH();
    }
    dispatch_expert_kernel<kWeightBackwardSlice>(
        dh, F,
        [&](auto head_dim, auto slice) {
            constexpr int DH = decltype(head_dim)::value, FC = decltype(slice)::value;
            launch_with_smem(expert_weight_backward_mma_kernel<DH, FC>, dim3(F / FC, items), kMmaWeightThreads,
                             MmaWeightLayout<DH, FC>::bytes, stream, dK, dV, accumulate, d_o, x, ld, K, V, plan, parts, E, F);
        },
        [&](auto head_dim) {
            constexpr int DH = decltype(head_dim)::value;
            launch_with_smem(expert_weight_backward_kernel<DH>, dim3(F / kExpertChunk, items), kExpertThreads,
                             ExpertTileSmem<DH>::bytes(2, 2), stream, dK, dV, accumulate, d_o, x, ld, K, V, plan, parts, E, F);
        });
    if (parts.max_extra) {
        const int64_t matrix = (int64_t)F * dh;
        add_weight_partials_kernel<<<dim3((unsigned)ceil_div(2 * matrix, 4 * 256), parts.max_extra), 256, 0, stream>>>(
            dK, dV, parts, matrix);
        CUDA_CHECK_LAUNCH();
    }
}

}  // namespace lmoe
