// The row-tile expert kernels on Hopper's wgmma (sm_90a builds), dh 64 or 128: the forward and the
// input gradient, which walk a planner tile's rows through the expert's fe the same way, in chunks
// of FC = 128 (the forward, where 128 divides fe) or 64 (moe/latent/expert_forward.cuh and
// expert_input_backward.cuh have their math and launch them when device_has_wgmma()). One block of
// two warpgroups per planner tile, warpgroup w owning rows 64w..64w+63; per chunk c (three or four
// stages of K_c, V_c (WgmmaRows); every tile 128B-swizzled):
//   forward:        S = X_w K_c^T                      A = GELU(S)          O_w  += A V_c
//   input gradient: S = X_w K_c^T,  dA = dO_w V_c^T    A = dA ⊙ GELU'(S)    dX_w += A K_c
// S and dA are (64 × FC) fp32 in registers, A goes packed to bf16 straight into the register A
// operand of the last product, and the (64 × dh) result stays in registers until the end, when it
// leaves through shared memory (tc/wgmma.cuh's epilogue): the (rows × fe) hidden activations never
// leave the registers. K_c and V_c come by TMA (tc/tma.cuh), issued by one thread; the tile's rows,
// gathered through copy_row, by cp.async from every thread. Chunk c's elementwise work overlaps two
// sets of products: its warpgroup's last product of chunk c − 1, issued behind chunk c's S, and the
// other warpgroup's, as the two take the tensor cores in turns (tc/wgmma.cuh's ping-pong). The
// kernel exists in every build; without wgmma its body is empty and it is never launched.
#pragma once
#include "moe/latent/expert_tiles.cuh"
#include "tc/tma.cuh"
#include "tc/wgmma.cuh"

namespace lmoe {

enum class RowsPass { Forward, InputGrad };

constexpr int kWgmmaRowsChunk = 64, kWgmmaRowsThreads = 256;  // the narrowest chunk: the kernels need fe % 64 == 0

// A kernel's chunk of fe, FC, and its stages of K_c, V_c: four, or three where four do not fit beside
// the row tiles (dh 128 with FC 128). FC = 128 fits the forward's registers (S, two sets of A and the
// result), not the input gradient's (dA too).
template <int DH, RowsPass PASS, int FC>
struct WgmmaRows {
    static constexpr int row_tiles = PASS == RowsPass::InputGrad ? 2 : 1;
    static constexpr int tile_elems = kExpertTileRows * DH, chunk_elems = FC * DH;
    static constexpr int stages = (DH == 128 && FC == 128) ? 3 : 4;
    // the X tile (and the dO tile), the stages of K_c and V_c, two mbarriers per stage and one for
    // the row tiles; 1 KB to align the tiles to 1024 bytes
    static constexpr size_t smem_bytes = (row_tiles * tile_elems + 2 * stages * chunk_elems) * sizeof(bf16) +
                                         (2 * stages + 1) * sizeof(uint64_t) + 1024;
};

// out (copies, dh): o (forward) or dx_copy (input gradient, from d_o); K_map and V_map are the
// tensor maps of K and V (rows_wgmma_chunk_map).
template <int DH, RowsPass PASS, int FC>
__global__ void __launch_bounds__(kWgmmaRowsThreads, 1)
    expert_rows_wgmma_kernel(bf16* out, const bf16* d_o, const bf16* x, int64_t ld,
                             const __grid_constant__ CUtensorMap K_map, const __grid_constant__ CUtensorMap V_map,
                             const RoutingPlan plan, int E, int F) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(DH == 64 || DH == 128, "wgmma row tiles: dh 64 or 128");
    static_assert(FC == 64 || FC == 128, "wgmma row tiles: chunks of 64 or 128");
    static_assert(kExpertTileRows == 2 * 64 && kWgmmaRowsThreads == 2 * 128, "two warpgroups of 64 rows per tile");
    using S = WgmmaRows<DH, PASS, FC>;
    constexpr int BR = kExpertTileRows, NT = kWgmmaRowsThreads, kStages = S::stages;
    constexpr bool backward = PASS == RowsPass::InputGrad;
    constexpr uint32_t tile_block = BR * 128, chunk_block = FC * 128;  // bytes of one 64-column block
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = wgmma_align_smem(smem_raw);
    bf16* Xs = reinterpret_cast<bf16*>(smem);  // (128, dh)
    bf16* dOs = Xs + S::tile_elems;             // (128, dh), the input gradient's
    bf16* Ks = Xs + S::row_tiles * S::tile_elems;  // kStages × (FC, dh)
    bf16* Vs = Ks + kStages * S::chunk_elems;      // kStages × (FC, dh)
    // A stage's full mbarrier: its chunk has landed (the TMA copies' bytes); its empty one: both
    // warpgroups are done with it; rows_landed: every thread's copies of the row tiles have.
    uint64_t* full = reinterpret_cast<uint64_t*>(Vs + kStages * S::chunk_elems);
    uint64_t* empty = full + kStages;
    uint64_t* rows_landed = empty + kStages;
    if ((int)blockIdx.x >= *plan.num_tiles) return;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbarrier_init(full + s, 1);
            mbarrier_init(empty + s, NT);
        }
        mbarrier_init(rows_landed, NT);
        fence_mbarrier_init();
    }
    __syncthreads();  // initialised before anyone arrives
    const ExpertRowTile t = expert_row_tile<kExpertTileRows>(plan, blockIdx.x, 0, E);
    const int g = t.g, h = t.h, p0 = t.p0, rows = t.rows;
    const int chunks = F / FC;
    const int wg = threadIdx.x / 128;
    const auto contiguous = [](int i) { return (int64_t)i * DH; };
    const auto stage_k = [&](int c) { return Ks + (c % kStages) * S::chunk_elems; };
    const auto stage_v = [&](int c) { return Vs + (c % kStages) * S::chunk_elems; };
    auto fill = [&](int c) {  // thread 0: chunk c into its stage, its bytes counted on the stage's full barrier
        uint64_t* bar = full + c % kStages;
        mbarrier_arrive_expect_tx(bar, 2 * S::chunk_elems * sizeof(bf16));
#pragma unroll
        for (int j = 0; j < DH / 64; j++) {  // a box per 64-column block
            tma_load_3d(stage_k(c) + j * FC * 64, K_map, 64 * j, c * FC, g, bar);
            tma_load_3d(stage_v(c) + j * FC * 64, V_map, 64 * j, c * FC, g, bar);
        }
    };
    auto wait_landed = [&](int c) {
        mbarrier_wait(full + c % kStages, c / kStages % 2);
        if (c == 0) {  // and the row tiles, copied by every thread through the generic proxy
            mbarrier_wait(rows_landed, 0);
            fence_proxy_async();
        }
    };
    const auto mnmajor = [](const void* tile, int k) { return wgmma_desc_mnmajor(tile, chunk_block, k); };
    const int wg_rows = wg * 64 * 128;  // byte offset of this warpgroup's rows in a 64-column block
    const unsigned char* Xw = reinterpret_cast<const unsigned char*>(Xs) + wg_rows;
    const unsigned char* dOw = reinterpret_cast<const unsigned char*>(dOs) + wg_rows;

    if (threadIdx.x == 0)
#pragma unroll
        for (int c = 0; c < kStages; c++)
            if (c < chunks) fill(c);
    load_rows_swizzled_async<DH, BR, NT>(Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    if constexpr (backward) load_rows_swizzled_async<DH, BR, NT>(dOs, d_o + (int64_t)p0 * DH, rows, contiguous);
    cp_async_mbarrier_arrive(rows_landed);
    float acc[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; i++) acc[i] = 0.f;
    float s[FC / 2], da[FC / 2];  // S (and dA) of the chunk in hand
    const auto issue_first = [&](int c) {  // chunk c's S (and dA), committed
        wgmma_kmajor<FC, DH / 16>(s, Xw, tile_block, stage_k(c), chunk_block);
        if constexpr (backward) wgmma_kmajor<FC, DH / 16>(da, dOw, tile_block, stage_v(c), chunk_block);
        wgmma_commit();
    };
    const auto issue_last = [&](int c, const uint32_t (&a)[FC / 16][4]) {  // acc += A_c V_c (A_c K_c), committed
        const bf16* B = backward ? stage_k(c) : stage_v(c);
#pragma unroll
        for (int kk = 0; kk < FC / 16; kk++) wgmma_rs<DH, 1>(acc, a[kk], mnmajor(B, kk), 1);
        wgmma_commit();
    };
    const auto hidden = [&](uint32_t (&a)[FC / 16][4]) {  // A = GELU(S) or dA ⊙ GELU'(S), packed
        wgmma_fence_operands(s);
        if constexpr (backward) wgmma_fence_operands(da);
#pragma unroll
        for (int kk = 0; kk < FC / 16; kk++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int j = 8 * kk + 2 * i;
                a[kk][i] = backward ? pack_bf16x2(da[j] * gelu_grad_fast(s[j]), da[j + 1] * gelu_grad_fast(s[j + 1]))
                                    : pack_bf16x2(gelu_fast(s[j]), gelu_fast(s[j + 1]));
            }
    };
    // Turn c (0 < c < chunks) issues chunk c's S (and dA), then chunk c − 1's last product from its
    // packed A (a_prev); once S is done it works out chunk c's A (into a_next) while that product and
    // the other warpgroup's turn keep the tensor cores busy. Two sets of A registers, used by even and
    // odd chunks, as a register operand in flight must not be overwritten before its wait.
    const Turns turns{wg, chunks + 1};  // chunk 0's S; chunk c's with chunk c − 1's last product; the last one's
    const auto turn = [&](int c, const uint32_t (&a_prev)[FC / 16][4], uint32_t (&a_next)[FC / 16][4]) {
        wait_landed(c);
        turns.take(c);
        wgmma_fence();
        issue_first(c);
        issue_last(c - 1, a_prev);
        turns.pass(c);
        // chunk c + kStages − 2 into the stage of chunk c − 2, once both warpgroups are done with it
        // (the other warpgroup's last product of chunk c − 2 was issued before this turn)
        if (threadIdx.x == 0 && c >= 2 && c + kStages - 2 < chunks) {
            mbarrier_wait(empty + (c - 2) % kStages, (c - 2) / kStages % 2);
            fill(c + kStages - 2);
        }
        wgmma_wait<1>();  // S (dA): the last product may still run
        hidden(a_next);
        wgmma_wait<0>();
        wgmma_fence_operands(acc);
        mbarrier_arrive(empty + (c - 1) % kStages);  // chunk c − 1's products are done: its stage is free
    };
    uint32_t a0[FC / 16][4], a1[FC / 16][4];
    // turn 0: chunk 0's S alone
    wait_landed(0);
    turns.take(0);
    wgmma_fence();
    issue_first(0);
    turns.pass(0);
    wgmma_wait<0>();
    hidden(a0);
    for (int c = 1; c < chunks; c += 2) {
        turn(c, a0, a1);
        if (c + 1 < chunks) turn(c + 1, a1, a0);
    }
    // turn `chunks`: the last chunk's last product alone
    uint32_t a_last[FC / 16][4];
#pragma unroll
    for (int kk = 0; kk < FC / 16; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++) a_last[kk][i] = chunks % 2 ? a0[kk][i] : a1[kk][i];
    turns.take(chunks);
    wgmma_fence();
    issue_last(chunks - 1, a_last);
    turns.pass(chunks);
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
    // The result leaves through this warpgroup's rows of the X tile, which its products no longer read.
    unsigned char* Ow = reinterpret_cast<unsigned char*>(Xs) + wg_rows;
    wgmma_accumulators_to_tile<DH>(Ow, tile_block, acc);
    warpgroup_barrier(wg);
    for_each_tile_piece<DH>(Ow, tile_block, [&](int r, int c, uint4 v) {
        if (64 * wg + r < rows) *reinterpret_cast<uint4*>(out + (int64_t)(p0 + 64 * wg + r) * DH + 8 * c) = v;
    });
#endif
}

// The tensor map of K or V (groups, F, DH) for chunks of FC rows: boxes of 64 columns by FC rows.
inline CUtensorMap rows_wgmma_chunk_map(const bf16* KV, const RoutingPlan& plan, int F, int DH, int FC) {
    return make_tensor_map(KV, {(uint64_t)DH, (uint64_t)F, (uint64_t)plan.groups()}, {(uint64_t)DH, (uint64_t)F * DH},
                           64, FC);
}

// Launches the kernel with chunks of 128 (the forward, where 128 divides F) or of kWgmmaRowsChunk.
template <int DH, RowsPass PASS>
void launch_rows_wgmma(bf16* out, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                       const RoutingPlan& plan, int F, cudaStream_t stream) {
    const auto launch = [&](auto chunk) {
        constexpr int FC = decltype(chunk)::value;
        launch_with_smem(expert_rows_wgmma_kernel<DH, PASS, FC>, dim3(plan.max_tiles), kWgmmaRowsThreads,
                         WgmmaRows<DH, PASS, FC>::smem_bytes, stream, out, d_o, x, ld,
                         rows_wgmma_chunk_map(K, plan, F, DH, FC), rows_wgmma_chunk_map(V, plan, F, DH, FC), plan,
                         plan.E, F);
    };
    if constexpr (PASS == RowsPass::Forward) {
        if (F % 128 == 0) return launch(std::integral_constant<int, 128>{});
    }
    launch(std::integral_constant<int, kWgmmaRowsChunk>{});
}

}  // namespace lmoe
