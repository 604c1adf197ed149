// The row-tile expert kernels on Hopper's wgmma (sm_90a builds), dh 64 or 128, fe in chunks of 64:
// the forward and the input gradient, which walk a planner tile's rows through the expert's fe the
// same way (moe/latent/expert_forward.cuh and expert_input_backward.cuh have their math and launch
// them when device_has_wgmma()). One block of two warpgroups per planner tile, warpgroup w owning
// rows 64w..64w+63; per chunk c (two stages of K_c, V_c in flight, every tile 128B-swizzled):
//   forward:        S = X_w K_c^T                      A = GELU(S)          O_w  += A V_c
//   input gradient: S = X_w K_c^T,  dA = dO_w V_c^T    A = dA ⊙ GELU'(S)    dX_w += A K_c
// S and dA are (64 × 64) fp32 in registers, A goes packed to bf16 straight into the register A
// operand of the last product, and the (64 × dh) result stays in registers until the end: the
// (rows × fe) hidden activations never leave the registers. The kernel exists in every build;
// without wgmma its body is empty and it is never launched.
#pragma once
#include "moe/latent/expert_tiles.cuh"
#include "tc/wgmma.cuh"

namespace lmoe {

enum class RowsPass { Forward, InputGrad };

constexpr int kWgmmaRowsChunk = 64, kWgmmaRowsThreads = 256;

// Shared memory: the X tile (and the dO tile), then two stages of K_c and V_c; 1 KB to align the tiles
// to 1024 bytes.
template <int DH, RowsPass PASS>
struct WgmmaRowsSmem {
    static constexpr int row_tiles = PASS == RowsPass::InputGrad ? 2 : 1;
    static constexpr int tile_elems = kExpertTileRows * DH, chunk_elems = kWgmmaRowsChunk * DH;
    static constexpr size_t bytes = (row_tiles * tile_elems + 4 * chunk_elems) * sizeof(bf16) + 1024;
};

// out (copies, dh): o (forward) or dx_copy (input gradient, from d_o).
template <int DH, RowsPass PASS>
__global__ void __launch_bounds__(kWgmmaRowsThreads, 1)
    expert_rows_wgmma_kernel(bf16* out, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                             const RoutingPlan plan, int E, int F) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(DH == 64 || DH == 128, "wgmma row tiles: dh 64 or 128");
    static_assert(kExpertTileRows == 2 * 64 && kWgmmaRowsThreads == 2 * 128, "two warpgroups of 64 rows per tile");
    constexpr int FC = kWgmmaRowsChunk, BR = kExpertTileRows, NT = kWgmmaRowsThreads;
    constexpr bool backward = PASS == RowsPass::InputGrad;
    using S = WgmmaRowsSmem<DH, PASS>;
    constexpr uint32_t tile_block = BR * 128, chunk_block = FC * 128;  // bytes of one 64-column block
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = wgmma_align_smem(smem_raw);
    bf16* Xs = reinterpret_cast<bf16*>(smem);  // (128, dh)
    bf16* dOs = Xs + S::tile_elems;             // (128, dh), the input gradient's
    bf16* Ks = Xs + S::row_tiles * S::tile_elems;  // 2 × (64, dh)
    bf16* Vs = Ks + 2 * S::chunk_elems;            // 2 × (64, dh)
    if ((int)blockIdx.x >= *plan.num_tiles) return;
    const ExpertRowTile t = expert_row_tile<kExpertTileRows>(plan, blockIdx.x, 0, E);
    const int g = t.g, h = t.h, p0 = t.p0, rows = t.rows;
    const bf16 *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int wg = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
    const auto contiguous = [](int i) { return (int64_t)i * DH; };
    auto load_chunk = [&](int c) {
        load_rows_swizzled_async<DH, FC, NT>(Ks + (c % 2) * S::chunk_elems, Kg + (int64_t)c * FC * DH, FC, contiguous);
        load_rows_swizzled_async<DH, FC, NT>(Vs + (c % 2) * S::chunk_elems, Vg + (int64_t)c * FC * DH, FC, contiguous);
    };
    const auto mnmajor = [](const void* tile, int k) { return wgmma_desc_mnmajor(tile, chunk_block, k); };

    load_rows_swizzled_async<DH, BR, NT>(Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    if constexpr (backward) load_rows_swizzled_async<DH, BR, NT>(dOs, d_o + (int64_t)p0 * DH, rows, contiguous);
    load_chunk(0);
    cp_async_commit();
    const int wg_rows = wg * 64 * 128;  // byte offset of this warpgroup's rows in a 64-column block
    const unsigned char* Xw = reinterpret_cast<const unsigned char*>(Xs) + wg_rows;
    const unsigned char* dOw = reinterpret_cast<const unsigned char*>(dOs) + wg_rows;
    float acc[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; i++) acc[i] = 0.f;
    for (int c = 0; c < F / FC; c++) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // chunk c (and the row tiles) have landed; both warpgroups are done with chunk c − 1
        if (c + 1 < F / FC) load_chunk(c + 1);  // into chunk c − 1's stage
        cp_async_commit();
        const bf16 *Kc = Ks + (c % 2) * S::chunk_elems, *Vc = Vs + (c % 2) * S::chunk_elems;
        float s[32], da[32];  // no initial values: the first product overwrites them
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < DH / 16; k++)
            wgmma_m64n64k16<0>(s, wgmma_desc_kmajor(Xw, tile_block, k), wgmma_desc_kmajor(Kc, chunk_block, k), k);
        if constexpr (backward) {
#pragma unroll
            for (int k = 0; k < DH / 16; k++)
                wgmma_m64n64k16<0>(da, wgmma_desc_kmajor(dOw, tile_block, k), wgmma_desc_kmajor(Vc, chunk_block, k), k);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(s);
        if constexpr (backward) wgmma_fence_operands(da);
#pragma unroll
        for (int i = 0; i < 32; i++) s[i] = backward ? da[i] * gelu_grad_fast(s[i]) : gelu_fast(s[i]);
        uint32_t a[FC / 16][4];
        wgmma_accumulators_as_a<FC / 16>(a, s);
        const bf16* B = backward ? Kc : Vc;  // (FC, dh), read MN-major
        wgmma_fence_operands(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FC / 16; kk++) {
            if constexpr (DH == 128) wgmma_m64n128k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
            else wgmma_m64n64k16_rs<1>(acc, a[kk], mnmajor(B, kk), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();  // a and this chunk's stage are free again
        wgmma_fence_operands(acc);
    }
#pragma unroll
    for (int i = 0; i < DH / 2; i += 2) {
        const int r = 64 * wg + 16 * warp + gq + 8 * (i / 2 % 2), col = 8 * (i / 4) + 2 * q;
        if (r < rows) *reinterpret_cast<uint32_t*>(out + (int64_t)(p0 + r) * DH + col) = pack_bf16x2(acc[i], acc[i + 1]);
    }
#endif
}

template <int DH, RowsPass PASS>
void launch_rows_wgmma(bf16* out, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                       const RoutingPlan& plan, int F, cudaStream_t stream) {
    launch_with_smem(expert_rows_wgmma_kernel<DH, PASS>, dim3(plan.max_tiles), kWgmmaRowsThreads,
                     WgmmaRowsSmem<DH, PASS>::bytes, stream, out, d_o, x, ld, K, V, plan, plan.E, F);
}

}  // namespace lmoe
