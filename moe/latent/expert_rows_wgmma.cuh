// The row-tile expert kernels on Hopper's wgmma (sm_90a builds), dh 64 or 128, fe in chunks of 64:
// the forward and the input gradient, which walk a planner tile's rows through the expert's fe the
// same way (moe/latent/expert_forward.cuh and expert_input_backward.cuh have their math and launch
// them when device_has_wgmma()). One block of two warpgroups per planner tile, warpgroup w owning
// rows 64w..64w+63; per chunk c (four stages of K_c, V_c, fetched three ahead; every tile 128B-swizzled):
//   forward:        S = X_w K_c^T                      A = GELU(S)          O_w  += A V_c
//   input gradient: S = X_w K_c^T,  dA = dO_w V_c^T    A = dA ⊙ GELU'(S)    dX_w += A K_c
// S and dA are (64 × 64) fp32 in registers, A goes packed to bf16 straight into the register A
// operand of the last product, and the (64 × dh) result stays in registers until the end, when it
// leaves through shared memory (tc/wgmma.cuh's epilogue): the (rows × fe) hidden activations never
// leave the registers. In the forward the products of chunk c + 1 are issued before chunk c's GELU
// is computed, so the tensor cores work while the ALUs do (two sets of S registers, used by even and
// odd chunks). The kernel exists in every build; without wgmma its body is empty and it is never
// launched.
#pragma once
#include "moe/latent/expert_tiles.cuh"
#include "tc/wgmma.cuh"

namespace lmoe {

enum class RowsPass { Forward, InputGrad };

constexpr int kWgmmaRowsChunk = 64, kWgmmaRowsThreads = 256, kWgmmaRowsStages = 4;

// Shared memory: the X tile (and the dO tile), then kWgmmaRowsStages stages of K_c and V_c, two
// mbarriers per stage; 1 KB to align the tiles to 1024 bytes.
template <int DH, RowsPass PASS>
struct WgmmaRowsSmem {
    static constexpr int row_tiles = PASS == RowsPass::InputGrad ? 2 : 1;
    static constexpr int tile_elems = kExpertTileRows * DH, chunk_elems = kWgmmaRowsChunk * DH;
    static constexpr size_t bytes = (row_tiles * tile_elems + 2 * kWgmmaRowsStages * chunk_elems) * sizeof(bf16) +
                                    2 * kWgmmaRowsStages * sizeof(uint64_t) + 1024;
};

// out (copies, dh): o (forward) or dx_copy (input gradient, from d_o).
template <int DH, RowsPass PASS>
__global__ void __launch_bounds__(kWgmmaRowsThreads, 1)
    expert_rows_wgmma_kernel(bf16* out, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                             const RoutingPlan plan, int E, int F) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(DH == 64 || DH == 128, "wgmma row tiles: dh 64 or 128");
    static_assert(kExpertTileRows == 2 * 64 && kWgmmaRowsThreads == 2 * 128, "two warpgroups of 64 rows per tile");
    constexpr int FC = kWgmmaRowsChunk, BR = kExpertTileRows, NT = kWgmmaRowsThreads, kStages = kWgmmaRowsStages;
    constexpr bool backward = PASS == RowsPass::InputGrad;
    using S = WgmmaRowsSmem<DH, PASS>;
    constexpr uint32_t tile_block = BR * 128, chunk_block = FC * 128;  // bytes of one 64-column block
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = wgmma_align_smem(smem_raw);
    bf16* Xs = reinterpret_cast<bf16*>(smem);  // (128, dh)
    bf16* dOs = Xs + S::tile_elems;             // (128, dh), the input gradient's
    bf16* Ks = Xs + S::row_tiles * S::tile_elems;  // kStages × (64, dh)
    bf16* Vs = Ks + kStages * S::chunk_elems;      // kStages × (64, dh)
    // A stage's full mbarrier: its chunk has landed (each thread arrives when its copies have); its
    // empty one: both warpgroups are done with it. No block barrier in the loop, so a warpgroup may
    // run ahead of the other and its GELU overlap the other's products.
    uint64_t* full = reinterpret_cast<uint64_t*>(Vs + kStages * S::chunk_elems);
    uint64_t* empty = full + kStages;
    if ((int)blockIdx.x >= *plan.num_tiles) return;
    if (threadIdx.x == 0)
        for (int s = 0; s < kStages; s++) {
            mbarrier_init(full + s, NT);
            mbarrier_init(empty + s, NT);
        }
    __syncthreads();  // initialised before anyone arrives
    const ExpertRowTile t = expert_row_tile<kExpertTileRows>(plan, blockIdx.x, 0, E);
    const int g = t.g, h = t.h, p0 = t.p0, rows = t.rows;
    const bf16 *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int chunks = F / FC;
    const int wg = threadIdx.x / 128;
    const auto contiguous = [](int i) { return (int64_t)i * DH; };
    auto fill = [&](int c) {  // chunk c into its stage, announced on the stage's full barrier
        load_rows_swizzled_async<DH, FC, NT>(Ks + (c % kStages) * S::chunk_elems, Kg + (int64_t)c * FC * DH, FC, contiguous);
        load_rows_swizzled_async<DH, FC, NT>(Vs + (c % kStages) * S::chunk_elems, Vg + (int64_t)c * FC * DH, FC, contiguous);
        cp_async_mbarrier_arrive(full + c % kStages);
    };
    auto wait_landed = [&](int c) {
        mbarrier_wait(full + c % kStages, c / kStages % 2);
        fence_proxy_async();
    };
    const auto mnmajor = [](const void* tile, int k) { return wgmma_desc_mnmajor(tile, chunk_block, k); };
    const int wg_rows = wg * 64 * 128;  // byte offset of this warpgroup's rows in a 64-column block
    const unsigned char* Xw = reinterpret_cast<const unsigned char*>(Xs) + wg_rows;
    const unsigned char* dOw = reinterpret_cast<const unsigned char*>(dOs) + wg_rows;
    // Issues S = X K_c^T (and dA = dO V_c^T) into s (and da), without waiting.
    auto issue_row_products = [&](float (&s)[32], float (&da)[32], int c) {
        const bf16 *Kc = Ks + (c % kStages) * S::chunk_elems, *Vc = Vs + (c % kStages) * S::chunk_elems;
        wgmma_fence();
        wgmma_m64n64_kmajor<DH / 16>(s, Xw, tile_block, Kc, chunk_block);
        if constexpr (backward) {
            wgmma_m64n64_kmajor<DH / 16>(da, dOw, tile_block, Vc, chunk_block);
        }
        wgmma_commit();
    };
    float acc[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; i++) acc[i] = 0.f;
    // The products of chunk c + 1 into s_next, da_next, once its K, V have landed.
    auto issue_next = [&](int c, float (&s_next)[32], float (&da_next)[32]) {
        if (c + 1 >= chunks) return;
        wait_landed(c + 1);
        issue_row_products(s_next, da_next, c + 1);
    };
    auto refill = [&](int c) {  // chunk c + 3 into the stage of chunk c − 1, once both warpgroups are done with it
        if (c + 3 >= chunks) return;
        if (c > 0) mbarrier_wait(empty + (c - 1) % kStages, (c - 1) / kStages % 2);
        fill(c + 3);
    };
    // Chunk c, whose S (and dA) are in s, da. In the forward the next chunk's products go to the tensor
    // cores first, so that they run while this chunk's GELU is worked out; the input gradient, whose
    // two sets of S and dA would not fit the registers beside its accumulators, issues them after.
    auto step = [&](int c, float (&s)[32], float (&da)[32], float (&s_next)[32], float (&da_next)[32]) {
        if constexpr (!backward) issue_next(c, s_next, da_next);
        // s, da were fenced after their wait; the hidden values go straight into the packed A operand
        // (no register of a product still in flight is written between its issue and its wait)
        uint32_t a[FC / 16][4];
#pragma unroll
        for (int kk = 0; kk < FC / 16; kk++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int j = 8 * kk + 2 * i;
                a[kk][i] = backward ? pack_bf16x2(da[j] * gelu_grad_fast(s[j]), da[j + 1] * gelu_grad_fast(s[j + 1]))
                                    : pack_bf16x2(gelu_fast(s[j]), gelu_fast(s[j + 1]));
            }
        const bf16* B = backward ? Ks + (c % kStages) * S::chunk_elems : Vs + (c % kStages) * S::chunk_elems;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FC / 16; kk++) {
            if constexpr (DH == 128) wgmma_m64n128k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
            else wgmma_m64n64k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
        }
        wgmma_commit();
        if constexpr (backward) {
            wgmma_wait<0>();  // a is free
            wgmma_fence_operands(acc);
            issue_next(c, s_next, da_next);
        }
        refill(c);  // with this chunk's products in flight, so that waiting for the other warpgroup costs little
        wgmma_wait<0>();  // the next chunk's S (dA) and this chunk's products are done: chunk c's stage is free
        mbarrier_arrive(empty + c % kStages);
        wgmma_fence_operands(acc);
        if (c + 1 < chunks) {
            wgmma_fence_operands(s_next);
            if constexpr (backward) wgmma_fence_operands(da_next);
        }
    };

    load_rows_swizzled_async<DH, BR, NT>(Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    if constexpr (backward) load_rows_swizzled_async<DH, BR, NT>(dOs, d_o + (int64_t)p0 * DH, rows, contiguous);
#pragma unroll
    for (int c = 0; c < kStages - 1; c++)  // chunk 0's barrier also announces the row tiles
        if (c < chunks) fill(c);
    wait_landed(0);
    // S (and dA) of even and odd chunks in the forward, of every chunk in the input gradient; the
    // products overwrite them
    float s0[32], da0[32], s1[32];
    issue_row_products(s0, da0, 0);
    wgmma_wait<0>();
    wgmma_fence_operands(s0);
    if constexpr (backward) {
        wgmma_fence_operands(da0);
        for (int c = 0; c < chunks; c++) step(c, s0, da0, s0, da0);
    } else {
        for (int c = 0; c < chunks; c += 2) {  // two chunks per pass, so that s0, s1 stay in registers
            step(c, s0, da0, s1, da0);
            if (c + 1 < chunks) step(c + 1, s1, da0, s0, da0);
        }
    }
    // The result leaves through this warpgroup's rows of the X tile, which its products no longer read.
    unsigned char* Ow = reinterpret_cast<unsigned char*>(Xs) + wg_rows;
    wgmma_accumulators_to_tile<DH>(Ow, tile_block, acc);
    warpgroup_barrier(wg);
    for_each_tile_piece<DH>(Ow, tile_block, [&](int r, int c, uint4 v) {
        if (64 * wg + r < rows) *reinterpret_cast<uint4*>(out + (int64_t)(p0 + 64 * wg + r) * DH + 8 * c) = v;
    });
#endif
}

template <int DH, RowsPass PASS>
void launch_rows_wgmma(bf16* out, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                       const RoutingPlan& plan, int F, cudaStream_t stream) {
    launch_with_smem(expert_rows_wgmma_kernel<DH, PASS>, dim3(plan.max_tiles), kWgmmaRowsThreads,
                     WgmmaRowsSmem<DH, PASS>::bytes, stream, out, d_o, x, ld, K, V, plan, plan.E, F);
}

}  // namespace lmoe
