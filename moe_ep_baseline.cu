// moe_ep_baseline: the same language model with standard MoE FFN layers (SPEC §2.2), trained with
// Expert Parallel (SPEC §3): the baseline Multi-Head LatentMoE is compared against.
#include "common/trainer.cuh"

int main(int argc, char** argv) {
    return lmoe::trainer_main(argc, argv, lmoe::FfnKind::MoE,
                              "Trains a standard MoE language model (Expert Parallel baseline).\n"
                              "Status: only the CPU reference path trains so far; the CUDA path is not written yet.");
}
