// The row-tile expert kernels on Hopper's wgmma (sm_90a builds), dh 64 or 128, fe in chunks of 64:
// the forward and the input gradient, which walk a planner tile's rows through the expert's fe the
// same way (moe/latent/expert_forward.cuh and expert_input_backward.cuh have their math and launch
// them when device_has_wgmma()). Per 128-row tile and chunk c (every tile 128B-swizzled):
//   forward:        S = X_w K_c^T                      A = GELU(S)          O_w  += A V_c
//   input gradient: S = X_w K_c^T,  dA = dO_w V_c^T    A = dA ⊙ GELU'(S)    dX_w += A K_c
// S and dA are (64 × 64) fp32 in registers, A goes packed to bf16 straight into the register A
// operand of the last product, and the (64 × dh) result stays in registers until the end: the
// (rows × fe) hidden activations never leave the registers.
//
// Persistent and warp-specialised: one block per SM walks the tiles blockIdx.x, blockIdx.x +
// gridDim.x, ... with three warpgroups. Warpgroup 0, the producer, only copies: each tile's rows of
// X (and dO) into one of two tile buffers, then its chunks K_c, V_c into a ring of stages that runs on
// from tile to tile, so that the next tile's data lands while the consumers finish this one.
// Warpgroups 1 and 2, the consumers, own rows 0..63 and 64..127 of the tile and do the products and
// the GELU; they hand stages and tile buffers back on mbarriers, with no block barrier, so one may
// run ahead of the other and its GELU overlap the other's products. In the forward the products of
// chunk c + 1 are issued before chunk c's GELU is computed, so the tensor cores work while the ALUs do
// (two sets of S registers, used by even and odd chunks). The kernel exists in every build; without
// wgmma its body is empty and it is never launched.
#pragma once
#include <algorithm>

#include "moe/latent/expert_tiles.cuh"
#include "tc/wgmma.cuh"

namespace lmoe {

enum class RowsPass { Forward, InputGrad };

constexpr int kWgmmaRowsChunk = 64, kWgmmaRowsThreads = 3 * 128;
// The block's 384 · 168 registers, shared out (128 · 72 + 256 · 216 ≤ 384 · 168): the producer's
// unrolled copies spill below 72, and the consumers need no more than 216.
constexpr int kRowsProducerRegs = 72, kRowsConsumerRegs = 216;

// Shared memory: two tile buffers of X (and dO), then the stages of K_c and V_c, a full and an empty
// mbarrier per stage and a free one per tile buffer; 1 KB to align the tiles to 1024 bytes. Four
// stages, where three are all that fit beside the input gradient's tile buffers at dh 128.
template <int DH, RowsPass PASS>
struct WgmmaRowsSmem {
    static constexpr int row_tiles = PASS == RowsPass::InputGrad ? 2 : 1;
    static constexpr int tile_elems = kExpertTileRows * DH, chunk_elems = kWgmmaRowsChunk * DH;
    static constexpr int buffer_elems = row_tiles * tile_elems;
    static constexpr int stages = row_tiles * DH > 128 ? 3 : 4;
    static constexpr size_t bytes = (2 * buffer_elems + 2 * stages * chunk_elems) * sizeof(bf16) +
                                    (2 * stages + 2) * sizeof(uint64_t) + 1024;
};

// out (copies, dh): o (forward) or dx_copy (input gradient, from d_o).
template <int DH, RowsPass PASS>
__global__ void __launch_bounds__(kWgmmaRowsThreads, 1)
    expert_rows_wgmma_kernel(bf16* out, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                             const RoutingPlan plan, int E, int F) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(DH == 64 || DH == 128, "wgmma row tiles: dh 64 or 128");
    static_assert(kExpertTileRows == 2 * 64, "two consumer warpgroups of 64 rows per tile");
    static_assert(128 * kRowsProducerRegs + 256 * kRowsConsumerRegs <= kWgmmaRowsThreads * 168,
                  "the warpgroups' registers fit the block's");
    constexpr int FC = kWgmmaRowsChunk, BR = kExpertTileRows, PT = 128, CT = 256;  // producer, consumer threads
    constexpr bool backward = PASS == RowsPass::InputGrad;
    using S = WgmmaRowsSmem<DH, PASS>;
    constexpr int kStages = S::stages;
    constexpr uint32_t tile_block = BR * 128, chunk_block = FC * 128;  // bytes of one 64-column block
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = wgmma_align_smem(smem_raw);
    bf16* buffers = reinterpret_cast<bf16*>(smem);    // 2 × (X (128, dh), then the input gradient's dO (128, dh))
    bf16* Ks = buffers + 2 * S::buffer_elems;          // kStages × (64, dh)
    bf16* Vs = Ks + kStages * S::chunk_elems;          // kStages × (64, dh)
    // A stage's full mbarrier: its chunk has landed (each producer thread arrives when its copies
    // have); its empty one: both consumers are done with it; a tile buffer's free one: both consumers
    // are done with its tile. Chunk n of the block (counted over its tiles) goes to stage n % kStages.
    uint64_t* full = reinterpret_cast<uint64_t*>(Vs + kStages * S::chunk_elems);
    uint64_t* empty = full + kStages;
    uint64_t* buffer_free = empty + kStages;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbarrier_init(full + s, PT);
            mbarrier_init(empty + s, CT);
        }
        for (int b = 0; b < 2; b++) mbarrier_init(buffer_free + b, CT);
    }
    __syncthreads();  // initialised before anyone arrives
    const int num_tiles = *plan.num_tiles, chunks = F / FC;
    const auto contiguous = [](int i) { return (int64_t)i * DH; };

    if (threadIdx.x < PT) {  // the producer
        setmaxnreg_dec<kRowsProducerRegs>();
        int n = 0;
        for (int i = 0, tile = blockIdx.x; tile < num_tiles; i++, tile += gridDim.x) {
            const ExpertRowTile t = expert_row_tile<BR>(plan, tile, 0, E);
            bf16* Xs = buffers + i % 2 * S::buffer_elems;
            if (i >= 2) mbarrier_wait(buffer_free + i % 2, (i / 2 - 1) % 2);
            // no barrier of their own: a copy's arrival on a full barrier waits for every copy the
            // thread issued before it, so the tile's first chunk announces its rows as well
            load_rows_swizzled_async<DH, BR, PT>(Xs, x, t.rows, GatheredRows<DH>{plan, ld, t.p0, t.h});
            if constexpr (backward)
                load_rows_swizzled_async<DH, BR, PT>(Xs + S::tile_elems, d_o + (int64_t)t.p0 * DH, t.rows, contiguous);
            const bf16 *Kg = K + (int64_t)t.g * F * DH, *Vg = V + (int64_t)t.g * F * DH;
            for (int c = 0; c < chunks; c++, n++) {
                const int s = n % kStages;
                if (n >= kStages) mbarrier_wait(empty + s, (n / kStages - 1) % 2);
                load_rows_swizzled_async<DH, FC, PT>(Ks + s * S::chunk_elems, Kg + (int64_t)c * FC * DH, FC, contiguous);
                load_rows_swizzled_async<DH, FC, PT>(Vs + s * S::chunk_elems, Vg + (int64_t)c * FC * DH, FC, contiguous);
                cp_async_mbarrier_arrive(full + s);
            }
        }
        cp_async_wait_all();  // no copy of an exited thread in flight
        return;
    }

    setmaxnreg_inc<kRowsConsumerRegs>();
    const int wg = threadIdx.x / 128 - 1, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const auto mnmajor = [](const void* tile, int k) { return wgmma_desc_mnmajor(tile, chunk_block, k); };
    const int wg_rows = wg * 64 * 128;  // byte offset of this warpgroup's rows in a 64-column block
    // S (and dA) of even and odd chunks in the forward, of every chunk in the input gradient; the
    // products overwrite them
    float s0[32], da0[32], s1[32], acc[DH / 2];
    for (int i = 0, tile = blockIdx.x, n0 = 0; tile < num_tiles; i++, tile += gridDim.x, n0 += chunks) {
        const ExpertRowTile t = expert_row_tile<BR>(plan, tile, 0, E);
        const unsigned char* Xw = reinterpret_cast<const unsigned char*>(buffers + i % 2 * S::buffer_elems) + wg_rows;
        const unsigned char* dOw = Xw + S::tile_elems * sizeof(bf16);
        const auto stage = [&](int c) { return (n0 + c) % kStages; };
        auto wait_landed = [&](int c) {
            mbarrier_wait(full + stage(c), (n0 + c) / kStages % 2);
            fence_proxy_async();
        };
        // Issues S = X K_c^T (and dA = dO V_c^T) into s (and da), without waiting.
        auto issue_row_products = [&](float (&s)[32], float (&da)[32], int c) {
            const bf16 *Kc = Ks + stage(c) * S::chunk_elems, *Vc = Vs + stage(c) * S::chunk_elems;
            wgmma_fence();
            wgmma_m64n64_kmajor<DH / 16>(s, Xw, tile_block, Kc, chunk_block);
            if constexpr (backward) {
                wgmma_m64n64_kmajor<DH / 16>(da, dOw, tile_block, Vc, chunk_block);
            }
            wgmma_commit();
        };
        // The products of chunk c + 1 into s_next, da_next, once its K, V have landed; after the last
        // chunk an empty group, so that every chunk's waits count the same groups.
        auto issue_next = [&](int c, float (&s_next)[32], float (&da_next)[32]) {
            if (c + 1 < chunks) {
                wait_landed(c + 1);
                issue_row_products(s_next, da_next, c + 1);
            } else {
                wgmma_commit();
            }
        };
        // Chunk c's second product, O += A V_c (dX += A K_c), its A operand the hidden values h packed
        // to bf16; committed.
        auto issue_second_product = [&](int c, const float (&h)[32]) {
            uint32_t a[FC / 16][4];
            wgmma_accumulators_as_a<FC / 16>(a, h);
            const bf16* B = (backward ? Ks : Vs) + stage(c) * S::chunk_elems;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < FC / 16; kk++) {
                if constexpr (DH == 128) wgmma_m64n128k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
                else wgmma_m64n64k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
            }
            wgmma_commit();
        };
        // Chunk c, whose S (and dA) are done and fenced in s (and da), with chunk c − 1's second
        // product perhaps still running: the hidden values h = GELU(S) (dA ⊙ GELU'(S)) are worked out
        // while the tensor cores run it (and, in the forward, chunk c + 1's S, issued first into the
        // other register set); they are packed into the A operand, whose registers that product
        // reads, once it is done. The wait at the end leaves chunk c's second product running into
        // the next chunk's GELU. The input gradient, with no room for a second set of S and dA beside
        // its accumulators, issues chunk c + 1's products into s and da once h is packed, ahead of
        // chunk c's second product, and waits for them alone. (Writing h over s, or packing before
        // the wait, makes ptxas serialise the products.)
        auto step = [&](int c, float (&s)[32], float (&da)[32], float (&s_next)[32]) {
            if constexpr (!backward) issue_next(c, s_next, da);
            float h[32];
#pragma unroll
            for (int j = 0; j < 32; j++) h[j] = backward ? da[j] * gelu_grad_fast(s[j]) : gelu_fast(s[j]);
            if constexpr (backward) wgmma_wait<0>();  // chunk c − 1's second product is done
            else wgmma_wait<1>();                     // ... and in the forward chunk c + 1's S runs on
            if (c > 0) mbarrier_arrive(empty + stage(c - 1));
            if constexpr (backward) {
                uint32_t a[FC / 16][4];
                wgmma_accumulators_as_a<FC / 16>(a, h);
                issue_next(c, s, da);
                const bf16* B = Ks + stage(c) * S::chunk_elems;
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < FC / 16; kk++) {
                    if constexpr (DH == 128) wgmma_m64n128k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
                    else wgmma_m64n64k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
                }
                wgmma_commit();
            } else {
                issue_second_product(c, h);
            }
            wgmma_wait<1>();  // chunk c + 1's products
            wgmma_fence_operands(backward ? s : s_next);
            if constexpr (backward) wgmma_fence_operands(da);
        };

#pragma unroll
        for (int j = 0; j < DH / 2; j++) acc[j] = 0.f;
        wait_landed(0);
        issue_row_products(s0, da0, 0);
        wgmma_wait<0>();
        wgmma_fence_operands(s0);
        if constexpr (backward) {
            wgmma_fence_operands(da0);
            for (int c = 0; c < chunks; c++) step(c, s0, da0, s0);
        } else {
            for (int c = 0; c < chunks; c += 2) {  // two chunks per pass, so that s0, s1 stay in registers
                step(c, s0, da0, s1);
                if (c + 1 < chunks) step(c + 1, s1, da0, s0);
            }
        }
        wgmma_wait<0>();  // the last chunk's second product
        mbarrier_arrive(empty + stage(chunks - 1));
        wgmma_fence_operands(acc);
        mbarrier_arrive(buffer_free + i % 2);  // every product of the tile is done
#pragma unroll
        for (int j = 0; j < DH / 2; j += 2) {
            const int r = 64 * wg + 16 * warp + gq + 8 * (j / 2 % 2), col = 8 * (j / 4) + 2 * q;
            if (r < t.rows)
                *reinterpret_cast<uint32_t*>(out + (int64_t)(t.p0 + r) * DH + col) = pack_bf16x2(acc[j], acc[j + 1]);
        }
    }
#endif
}

// A grid of one block per SM (fewer where the plan has fewer tiles), each walking its share of the tiles.
template <int DH, RowsPass PASS>
void launch_rows_wgmma(bf16* out, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                       const RoutingPlan& plan, int F, cudaStream_t stream) {
    const int blocks = std::max(1, std::min(plan.max_tiles, device_sm_count()));
    launch_with_smem(expert_rows_wgmma_kernel<DH, PASS>, dim3(blocks), kWgmmaRowsThreads,
                     WgmmaRowsSmem<DH, PASS>::bytes, stream, out, d_o, x, ld, K, V, plan, plan.E, F);
}

}  // namespace lmoe
