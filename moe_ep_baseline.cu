// moe_ep_baseline: the same language model with standard MoE FFN layers (SPEC §2.2), trained with
// Expert Parallel (SPEC §3): the baseline Multi-Head LatentMoE is compared against. Everything dense
// is the shared skeleton in common/trainer.cuh.
//
// Status: the MoE layer's CUDA path is not written yet, so this trainer runs the CPU reference only
// (kHasGpuPath = false) and says so, also on a GPU machine.
#include "common/trainer.cuh"

namespace lmoe {

struct MoeFfn {
    static constexpr FfnKind kind = FfnKind::MoE;
    static constexpr bool kHasGpuPath = false;
    static const char* summary() {
        return "Trains a standard MoE language model (Expert Parallel baseline).\n"
               "Status: only the CPU reference path trains so far; the CUDA path is not written yet.";
    }
};

}  // namespace lmoe

#ifndef LMOE_NO_MAIN
int main(int argc, char** argv) { return lmoe::trainer_main<lmoe::MoeFfn>(argc, argv); }
#endif
