#!/usr/bin/env bash
# The main job: set up, prepare the default corpus (the King James Bible, offline), and train both
# models on it, Multi-Head LatentMoE first and the MoE baseline second. Extra arguments go to both
# trainers (e.g. --steps 100). The CUDA training path is not written yet, so both train the CPU
# reference on the tiny preset, on a GPU machine too, and say so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
build=${BUILD_DIR:-build}
bash data_prep/prepare_kjv.sh "$build/data_prep" data/kjv
for trainer in train_latentmoe moe_ep_baseline; do
    echo
    echo "=== $trainer ==="
    "$build/$trainer" --preset tiny --train-data data/kjv_train.bin --val-data data/kjv_val.bin "$@"
done
