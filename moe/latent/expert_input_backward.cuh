// Input gradient of the LatentMoE experts (SPEC §4), per copy p: with s = K_g x, a = GELU(s),
// o = V_g^T a,
//     dx_copy[p] = K_g^T (GELU'(s) ⊙ V_g do)
// computed for a tile of copies at once, fe in chunks c, the hidden activations recomputed:
//     S = X K_c^T        dA = dO V_c^T        dS = dA ⊙ GELU'(S)        dX += dS K_c
// Written per copy; gather_input_grad (moe/combine.cuh) sums a token row's copies.
// Three kernels, one launcher: expert_input_backward_kernel (fp32 SIMT),
// expert_input_backward_mma_kernel (tensor cores, S, dA and dS in registers) and, on Hopper's wgmma,
// expert_rows_wgmma_kernel's input-gradient pass (moe/latent/expert_rows_wgmma.cuh);
// expert_input_backward picks by floatX, then by the device code. The weight gradient, the other half
// of the backward, is moe/latent/expert_weight_backward.cuh.
#pragma once
#include "moe/latent/expert_rows_wgmma.cuh"
#include "moe/latent/expert_tiles.cuh"

namespace lmoe {

// fp32: one block per kSimtTileRows rows (part blockIdx.y of planner tile blockIdx.x), fe in chunks
// of kExpertChunk:  S = X K_c^T,  dA = dO V_c^T,  dS = dA ⊙ GELU'(S) → shared,  dX += dS K_c.
template <int DH>
__global__ void __launch_bounds__(kExpertThreads) expert_input_backward_kernel(floatX* dx_copy, const floatX* d_o,
                                                                               const floatX* x, int64_t ld,
                                                                               const floatX* K, const floatX* V,
                                                                               const RoutingPlan plan, int E, int F) {
    using S = ExpertTileSmem<DH>;
    extern __shared__ float smem[];
    float *Xs = smem, *dOs = Xs + S::rows_floats, *Ks = dOs + S::rows_floats, *Vs = Ks + S::chunk_floats;
    float* dSs = Vs + S::chunk_floats;
    if ((int)blockIdx.x >= *plan.num_tiles) return;
    const ExpertRowTile t = expert_row_tile<kSimtTileRows>(plan, blockIdx.x, blockIdx.y, E);
    const int g = t.g, h = t.h, p0 = t.p0, rows = t.rows;
    if (rows <= 0) return;
    const floatX *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int r = threadIdx.x / 4, cg = threadIdx.x % 4;

    load_tile_rows<DH>(Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    load_tile_rows<DH>(dOs, d_o, rows, [&](int i) { return (int64_t)(p0 + i) * DH; });
    float acc[DH / 4] = {};
    for (int f0 = 0; f0 < F; f0 += kExpertChunk) {
        __syncthreads();
        load_chunk<DH>(Ks, Kg + (int64_t)f0 * DH);
        load_chunk<DH>(Vs, Vg + (int64_t)f0 * DH);
        __syncthreads();
        float s[kExpertChunk / 4], da[kExpertChunk / 4];
        tile_times_chunk_t<DH>(s, Xs, Ks, r, cg);
        tile_times_chunk_t<DH>(da, dOs, Vs, r, cg);
#pragma unroll
        for (int i = 0; i < kExpertChunk / 4; i++) dSs[r * S::ld_chunk + cg + 4 * i] = da[i] * gelu_grad(s[i]);
        __syncthreads();
        hidden_times_chunk<DH>(acc, dSs, Ks, r, cg);  // dX += dS K_c
    }
    store_tile_row<DH>(dx_copy, acc, p0, r, rows, cg);
}

// Tensor cores: one block per planner tile, fe in chunks of FC:
//   S = X K_c^T,  dA = dO V_c^T,  dS = dA ⊙ GELU'(S),  dX += dS K_c      (S, dA, dS in registers).
template <int DH, int FC>
__global__ void __launch_bounds__(kMmaTileThreads, 2)
    expert_input_backward_mma_kernel(bf16* dx_copy, const bf16* d_o, const bf16* x, int64_t ld, const bf16* K,
                                     const bf16* V, const RoutingPlan plan, int E, int F) {
    using S = MmaTileSmem<DH, FC>;
    constexpr int MT = kMmaRowsPerWarp / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Xs = reinterpret_cast<bf16*>(smem_raw);  // (tile rows, dh)
    bf16* dOs = Xs + S::rows_elems;                 // (tile rows, dh)
    bf16* Ks = dOs + S::rows_elems;                 // 2 × (FC, dh)
    bf16* Vs = Ks + 2 * S::chunk_elems;             // 2 × (FC, dh)
    if ((int)blockIdx.x >= *plan.num_tiles) return;
    const ExpertRowTile t = expert_row_tile<kExpertTileRows>(plan, blockIdx.x, 0, E);
    const int g = t.g, h = t.h, p0 = t.p0, rows = t.rows;
    const KvChunks<DH, FC> chunks{Ks, Vs, K + (int64_t)g * F * DH, V + (int64_t)g * F * DH};
    const int m0 = threadIdx.x / 32 * kMmaRowsPerWarp;

    load_rows_async<DH, kExpertTileRows, kMmaTileThreads>(
        Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    load_rows_async<DH, kExpertTileRows, kMmaTileThreads>(dOs, d_o + (int64_t)p0 * DH, rows,
                                                          [](int i) { return (int64_t)i * DH; });
    chunks.load(0);
    cp_async_commit();
    float acc[MT][DH / 8][4] = {};
    for (int c = 0; c < F / FC; c++) {
        chunks.next(c, F);
        const bf16 *Kc = chunks.K(c), *Vc = chunks.V(c);
        float s[MT][FC / 8][4], da[MT][FC / 8][4];
        warp_mma_nt<DH, MT, FC>(s, Xs, S::ld, m0, Kc, S::ld, 0);
        warp_mma_nt<DH, MT, FC>(da, dOs, S::ld, m0, Vc, S::ld, 0);
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < FC / 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) da[mt][n][i] *= gelu_grad_fast(s[mt][n][i]);
        warp_mma_hidden<DH, MT, FC>(acc, da, Kc, S::ld);  // dX += dS K_c
    }
    warp_store_rows<DH, MT>(dx_copy, acc, p0, m0, rows);
}

// fe chunk width of the tensor-core input gradient: 32 keeps two blocks per SM (64 would halve that
// and spill), which measured faster than the wider chunk.
constexpr int kInputBackwardChunk = 32;

// dx_copy (copies, dh) from d_o (copies, dh): each copy's input gradient, before gather_input_grad.
inline void expert_input_backward(floatX* dx_copy, const floatX* d_o, const floatX* x, int64_t ld, const floatX* K,
                                  const floatX* V, const RoutingPlan& plan, int dh, int F, cudaStream_t stream) {
    const int max_tiles = plan.max_tiles, E = plan.E;
    dispatch_expert_kernel<kInputBackwardChunk>(
        dh, F,
        [&](auto head_dim, auto chunk) {
            constexpr int DH = decltype(head_dim)::value, FC = decltype(chunk)::value;
            if constexpr (DH == 64 || DH == 128) {
                if (F % kWgmmaRowsChunk == 0 && device_has_wgmma()) {
                    launch_rows_wgmma<DH, RowsPass::InputGrad>(dx_copy, d_o, x, ld, K, V, plan, F, stream);
                    return;
                }
            }
            launch_with_smem(expert_input_backward_mma_kernel<DH, FC>, dim3(max_tiles), kMmaTileThreads,
                             MmaTileSmem<DH, FC>::bytes(2, 2), stream, dx_copy, d_o, x, ld, K, V, plan, E, F);
        },
        [&](auto head_dim) {
            constexpr int DH = decltype(head_dim)::value;
            launch_with_smem(expert_input_backward_kernel<DH>, dim3(max_tiles, kExpertTileRows / kSimtTileRows),
                             kExpertThreads, ExpertTileSmem<DH>::bytes(2, 1), stream, dx_copy, d_o, x, ld, K, V, plan,
                             E, F);
        });
}

}  // namespace lmoe
