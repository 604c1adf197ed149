// Checks shared by the GPU tests of the two routed layers (test_gpu_latentmoe, test_gpu_moe): the
// router's choices against the CPU reference's top-k, and the routing plan's grouping of the copies.
#pragma once
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/reference.h"
#include "moe/routing_plan.cuh"
#include "tests/gpu_test_utils.cuh"

namespace gpu_test {

// The router's choices sel (H, M, k), downloaded from plan.sel, must be the reference's top-k of
// every (head h, row t): the logits of x[t, h·D : (h + 1)·D] (rows ld apart) through R (H, D, E),
// plus bias (H, E). A row whose choices differ is counted as a near-tie where two neighbouring
// biased scores among its first k + 1 are within rounding of each other, and fails otherwise.
inline void check_router(const std::string& name, const lmoe::RoutingPlan& plan, const std::vector<int>& sel,
                         const double* x, int ld, const double* R, int D, const float* bias) {
    const int H = plan.H, M = plan.M, E = plan.E, k = plan.k;
    int mismatched = 0, near_ties = 0;
    std::vector<double> logits(E);
    std::vector<int> ref_sel(k);
    for (int h = 0; h < H; h++)
        for (int t = 0; t < M; t++) {
            const float* bias_h = bias + h * E;
            ref::router_logits(logits.data(), x + (int64_t)t * ld + h * D, R + (int64_t)h * D * E, D, E);
            ref::select_topk(ref_sel.data(), logits.data(), bias_h, E, k);
            const int* got = sel.data() + ((int64_t)h * M + t) * k;
            if (std::equal(ref_sel.begin(), ref_sel.end(), got)) continue;
            std::vector<double> scores(E);
            for (int e = 0; e < E; e++) scores[e] = logits[e] + bias_h[e];
            std::sort(scores.rbegin(), scores.rend());
            bool tie = false;
            for (int j = 0; j < k && j + 1 < E; j++) tie |= scores[j] - scores[j + 1] < 1e-4 * (1 + std::abs(scores[j]));
            (tie ? near_ties : mismatched)++;
        }
    std::printf("  router: %d of %d choices differ from the reference (%d at near-ties)\n", mismatched + near_ties,
                H * M, near_ties);
    CHECK_MSG(mismatched == 0, name + ": router top-k differs from the reference away from ties");
}

// The plan must be a stable grouping: every copy (h, t, j) once, in its group h·E + sel[h, t, j],
// rows increasing inside a group; and the tile list must cut every group into kExpertTileRows-row
// tiles. `groups` names the groups in the failure message. Returns the group offsets (H·E + 1).
inline std::vector<int> check_plan(const std::string& name, const lmoe::RoutingPlan& plan, const std::vector<int>& sel,
                                   const char* groups) {
    const int H = plan.H, M = plan.M, E = plan.E, k = plan.k, G = plan.groups();
    const int64_t copies = plan.copies();
    auto offset = download(plan.group_offset, G + 1), row = download(plan.copy_row, copies);
    auto pos = download(plan.copy_pos, copies);
    auto tg = download(plan.tile_group, plan.max_tiles), ts = download(plan.tile_start, plan.max_tiles);
    bool ok = offset[0] == 0 && offset[G] == copies;
    std::vector<int> seen(copies, 0);
    for (int h = 0; h < H; h++)
        for (int t = 0; t < M; t++)
            for (int j = 0; j < k; j++) {
                const int64_t slot = ((int64_t)h * M + t) * k + j;
                const int p = pos[slot], e = sel[slot];
                if (p < 0 || p >= copies || e < 0 || e >= E) { ok = false; continue; }
                seen[p]++;
                const int g = h * E + e;
                ok &= row[p] == t && offset[g] <= p && p < offset[g + 1];
            }
    for (int64_t p = 0; p < copies; p++) ok &= seen[p] == 1;
    for (int g = 0; g < G; g++)
        for (int p = offset[g] + 1; p < offset[g + 1]; p++) ok &= row[p - 1] < row[p];
    CHECK_MSG(ok, name + ": the grouping is not a stable partition of the copies by " + groups);
    int tiles = download(plan.num_tiles, 1)[0], expected = 0;
    for (int g = 0; g < G; g++) expected += (int)ceil_div(offset[g + 1] - offset[g], lmoe::kExpertTileRows);
    bool tiles_ok = tiles == expected && tiles <= plan.max_tiles;
    for (int i = 0; tiles_ok && i < tiles; i++)
        tiles_ok &= ts[i] >= offset[tg[i]] && ts[i] < offset[tg[i] + 1] &&
                    (ts[i] - offset[tg[i]]) % lmoe::kExpertTileRows == 0;
    CHECK_MSG(tiles_ok, name + ": the tile list does not cover the groups");
    return offset;
}

}  // namespace gpu_test
