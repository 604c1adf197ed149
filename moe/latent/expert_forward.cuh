// Forward of the LatentMoE experts (SPEC §4), per copy p of token row x (one head's sub-token) routed
// to expert g = (head, e):
//     o[p] = V_g^T GELU(K_g x)            (unweighted: the combine step applies the gate)
// computed for a tile of copies at once, fe in chunks c, FlashAttention's structure without the
// softmax:
//     S = X K_c^T        A = GELU(S)        O += A V_c
// so the (rows × fe) hidden activations A never reach global memory.
// Three kernels, one launcher: expert_forward_kernel (fp32 SIMT), expert_forward_mma_kernel (tensor
// cores, where S and A stay in registers) and expert_forward_wgmma_kernel (the same on Hopper's
// wgmma); expert_forward picks by floatX, then by what the device code holds.
#pragma once
#include "moe/latent/expert_tiles.cuh"
#include "tc/wgmma.cuh"

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

// Tensor cores on wgmma (sm_90a builds on Hopper), dh 64 or 128, fe in chunks of 64: one block of two
// warpgroups per planner tile, warpgroup w owning its rows 64w..64w+63. Per chunk (two stages of K_c,
// V_c in flight, all tiles 128B-swizzled):
//   S (64 × 64, registers) = X_w K_c^T                    (X, K_c K-major)
//   A = GELU(S), packed to bf16 in registers, as it stands the A operand of
//   O_w (64 × dh, registers) += A V_c                     (V_c MN-major)
// The kernel exists in every build (the launcher picks it by device_has_wgmma); without wgmma its
// body is empty and it is never launched.
constexpr int kWgmmaForwardChunk = 64, kWgmmaForwardThreads = 256;

template <int DH>
struct WgmmaForwardSmem {
    static constexpr int x_elems = kExpertTileRows * DH, chunk_elems = kWgmmaForwardChunk * DH;
    static constexpr size_t bytes = (x_elems + 4 * chunk_elems) * sizeof(bf16) + 1024;  // + alignment to 1024
};

template <int DH>
__global__ void __launch_bounds__(kWgmmaForwardThreads, 1)
    expert_forward_wgmma_kernel(bf16* o, const bf16* x, int64_t ld, const bf16* K, const bf16* V,
                                const RoutingPlan plan, int E, int F) {
#if defined(LMOE_HAS_WGMMA)
    static_assert(DH == 64 || DH == 128, "wgmma forward: dh 64 or 128");
    constexpr int FC = kWgmmaForwardChunk, BR = kExpertTileRows, NT = kWgmmaForwardThreads;
    using S = WgmmaForwardSmem<DH>;
    constexpr uint32_t x_block = BR * 128, chunk_block = FC * 128;  // bytes of one 64-column block
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_address(smem_raw) & 1023)) & 1023);
    bf16* Xs = reinterpret_cast<bf16*>(smem);  // (128, dh)
    bf16* Ks = Xs + S::x_elems;                 // 2 × (64, dh)
    bf16* Vs = Ks + 2 * S::chunk_elems;         // 2 × (64, dh)
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
    // K-major operands step 32 bytes per k16 inside a 64-column block; MN-major ones 16 rows.
    auto kmajor = [](const void* tile, uint32_t block_bytes, int k) {
        return wgmma_desc(reinterpret_cast<const unsigned char*>(tile) + (k / 4) * block_bytes + (k % 4) * 32, 16, 1024);
    };
    auto mnmajor = [](const void* tile, int k) {
        return wgmma_desc(reinterpret_cast<const unsigned char*>(tile) + k * 16 * 128, chunk_block, 1024);
    };

    load_rows_swizzled_async<DH, BR, NT>(Xs, x, rows, GatheredRows<DH>{plan, ld, p0, h});
    load_chunk(0);
    cp_async_commit();
    const unsigned char* Xw = reinterpret_cast<const unsigned char*>(Xs) + wg * 64 * 128;  // this warpgroup's rows
    float acc[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; i++) acc[i] = 0.f;
    for (int c = 0; c < F / FC; c++) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // chunk c (and X) have landed; both warpgroups are done with chunk c − 1
        if (c + 1 < F / FC) load_chunk(c + 1);  // into chunk c − 1's stage
        cp_async_commit();
        const bf16 *Kc = Ks + (c % 2) * S::chunk_elems, *Vc = Vs + (c % 2) * S::chunk_elems;
        float s[32];  // no initial values: the first product overwrites them
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < DH / 16; k++) wgmma_m64n64k16<0>(s, kmajor(Xw, x_block, k), kmajor(Kc, chunk_block, k), k);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(s);
        uint32_t a[FC / 16][4];
        wgmma_accumulators_as_a<FC / 16>(a, s, [](float v) { return gelu_fast(v); });
        wgmma_fence_operands(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FC / 16; kk++) {
            if constexpr (DH == 128) wgmma_m64n128k16_rs<1>(acc, a[kk], mnmajor(Vc, kk), 1);
            else wgmma_m64n64k16_rs<1>(acc, a[kk], mnmajor(Vc, kk), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();  // a and this chunk's stage are free again
        wgmma_fence_operands(acc);
    }
#pragma unroll
    for (int i = 0; i < DH / 2; i += 2) {
        const int r = 64 * wg + 16 * warp + gq + 8 * (i / 2 % 2), col = 8 * (i / 4) + 2 * q;
        if (r < rows) *reinterpret_cast<uint32_t*>(o + (int64_t)(p0 + r) * DH + col) = pack_bf16x2(acc[i], acc[i + 1]);
    }
#endif
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
                if (F % kWgmmaForwardChunk == 0 && device_has_wgmma()) {
                    launch_with_smem(expert_forward_wgmma_kernel<DH>, dim3(max_tiles), kWgmmaForwardThreads,
                                     WgmmaForwardSmem<DH>::bytes, stream, o, x, ld, K, V, plan, E, F);
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
