// train_latentmoe: a GPT-style language model whose FFN layers are Multi-Head LatentMoE (SPEC §2.1),
// trained with Head Parallel (SPEC §3). Everything dense is the shared skeleton in common/.
#include "common/trainer.cuh"

int main(int argc, char** argv) {
    return lmoe::trainer_main(argc, argv, lmoe::FfnKind::LatentMoE,
                              "Trains a Multi-Head LatentMoE language model (Head Parallel).\n"
                              "Status: only the CPU reference path trains so far; the CUDA path is not written yet.");
}
