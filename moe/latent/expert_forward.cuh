// Forward of the LatentMoE experts (SPEC §4), per copy p of token row x (one head's sub-token) routed
// to expert g = (head, e):
//     o[p] = V_g^T GELU(K_g x)            (unweighted: the combine step applies the gate)
// computed for a tile of copies at once, fe in chunks c, FlashAttention's structure without the
// softmax:
//     S = X K_c^T        A = GELU(S)        O += A V_c
// so the (rows × fe) hidden activations A never reach global memory.
// Three kernels, one launcher: expert_forward_kernel (fp32 SIMT), expert_forward_mma_kernel (tensor
// cores, where S and A stay in registers) and, on Hopper's wgmma, expert_rows_wgmma_kernel's forward
// pass (moe/latent/expert_rows_wgmma.cuh); expert_forward picks by floatX, then by the device code.
#pragma once
#include "moe/latent/expert_rows_wgmma.cuh"
#include "moe/latent/expert_tiles.cuh"

namespace lmoe {

// fp32: one block per kSimtTileRows rows (part blockIdx.y of planner tile blockIdx.x), fe in chunks
// of kExpertChunk, every product through shared memory:
//   S = X K_c^T,  A = GELU(S) → shared,  O += A V_c.
template <int DH>
__global__ void __launch_bounds__(kExpertThreads) expert_forward_kernel(floatX* o, const floatX* x, int64_t ld,
                                                                        const floatX* K, const floatX* V,
                                                                        const RoutingPlan plan, int E, int F) {
    using S = ExpertTileSmem<DH>;
    extern __shared__ float smem[];
    float *Xs = smem, *Ks = Xs + S::rows_floats, *Vs = Ks + S::chunk_floats, *As = Vs + S::chunk_floats;
    if ((int)blockIdx.x >= *plan.num_tiles) return;
    const ExpertRowTile t = expert_row_tile<kSimtTileRows>(plan, blockIdx.x, blockIdx.y, E);
    const int g = t.g, h = t.h, p0 = t.p0, rows = t.rows;
    if (rows <= 0) return;
    const floatX *Kg = K + (int64_t)g * F * DH, *Vg = V + (int64_t)g * F * DH;
    const int r = threadIdx.x / 4, cg = threadIdx.x % 4;  // this thread: row r, columns cg + 4i

    load_tile_rows<DH>(Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    float acc[DH / 4] = {};
    for (int f0 = 0; f0 < F; f0 += kExpertChunk) {
        __syncthreads();
        load_chunk<DH>(Ks, Kg + (int64_t)f0 * DH);
        load_chunk<DH>(Vs, Vg + (int64_t)f0 * DH);
        __syncthreads();
        float s[kExpertChunk / 4];
        tile_times_chunk_t<DH>(s, Xs, Ks, r, cg);  // S = X K_c^T
#pragma unroll
        for (int i = 0; i < kExpertChunk / 4; i++) As[r * S::ld_chunk + cg + 4 * i] = gelu(s[i]);
        __syncthreads();
        hidden_times_chunk<DH>(acc, As, Vs, r, cg);  // O += A V_c
    }
    store_tile_row<DH>(o, acc, p0, r, rows, cg);
}

// Tensor cores: one block per planner tile, fe in chunks of FC:
//   S = X K_c^T,  O += GELU(S) V_c      (S and GELU(S) in registers).
template <int DH, int FC>
__global__ void __launch_bounds__(kMmaTileThreads, 2)
    expert_forward_mma_kernel(bf16* o, const bf16* x, int64_t ld, const bf16* K, const bf16* V, const RoutingPlan plan,
                              int E, int F) {
    using S = MmaTileSmem<DH, FC>;
    constexpr int MT = kMmaRowsPerWarp / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Xs = reinterpret_cast<bf16*>(smem_raw);  // (tile rows, dh)
    bf16* Ks = Xs + S::rows_elems;                  // 2 × (FC, dh)
    bf16* Vs = Ks + 2 * S::chunk_elems;             // 2 × (FC, dh)
    if ((int)blockIdx.x >= *plan.num_tiles) return;
    const ExpertRowTile t = expert_row_tile<kExpertTileRows>(plan, blockIdx.x, 0, E);
    const int g = t.g, h = t.h, p0 = t.p0, rows = t.rows;
    const KvChunks<DH, FC> chunks{Ks, Vs, K + (int64_t)g * F * DH, V + (int64_t)g * F * DH};
    const int m0 = threadIdx.x / 32 * kMmaRowsPerWarp;

    load_rows_async<DH, kExpertTileRows, kMmaTileThreads>(
        Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    chunks.load(0);
    cp_async_commit();
    float acc[MT][DH / 8][4] = {};
    for (int c = 0; c < F / FC; c++) {
        chunks.next(c, F);
        float s[MT][FC / 8][4];
        warp_mma_nt<DH, MT, FC>(s, Xs, S::ld, m0, chunks.K(c), S::ld, 0);  // S = X K_c^T
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < FC / 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) s[mt][n][i] = gelu_fast(s[mt][n][i]);
        warp_mma_hidden<DH, MT, FC>(acc, s, chunks.V(c), S::ld);  // O += A V_c
    }
    warp_store_rows<DH, MT>(o, acc, p0, m0, rows);
}

// fe chunk width of the tensor-core forward: 64 measured fastest (fewer reloads of X from shared
// memory than 32, at the same two blocks per SM).
constexpr int kForwardChunk = 64;

// o (copies, dh) for every copy of the plan.
inline void expert_forward(floatX* o, const floatX* x, int64_t ld, const floatX* K, const floatX* V,
                           const RoutingPlan& plan, int dh, int F, cudaStream_t stream) {
    const int max_tiles = plan.max_tiles, E = plan.E;
    dispatch_expert_kernel<kForwardChunk>(
        dh, F,
        [&](auto head_dim, auto chunk) {
            constexpr int DH = decltype(head_dim)::value, FC = decltype(chunk)::value;
            if constexpr (DH == 64 || DH == 128) {
                if (F % kWgmmaRowsChunk == 0 && device_has_wgmma()) {
                    launch_rows_wgmma<DH, RowsPass::Forward>(o, nullptr, x, ld, K, V, plan, F, stream);
                    return;
                }
            }
            launch_with_smem(expert_forward_mma_kernel<DH, FC>, dim3(max_tiles), kMmaTileThreads,
                             MmaTileSmem<DH, FC>::bytes(1, 2), stream, o, x, ld, K, V, plan, E, F);
        },
        [&](auto head_dim) {
            constexpr int DH = decltype(head_dim)::value;
            launch_with_smem(expert_forward_kernel<DH>, dim3(max_tiles, kExpertTileRows / kSimtTileRows),
                             kExpertThreads, ExpertTileSmem<DH>::bytes(1, 1), stream, o, x, ld, K, V, plan, E, F);
        });
}

}  // namespace lmoe
