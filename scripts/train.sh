#!/usr/bin/env bash
# The main job: set up, prepare the default corpus (the King James Bible, offline), and train both
# models on it, Multi-Head LatentMoE first and the MoE baseline second. Extra arguments go to both
# trainers (e.g. --steps 100). With a GPU both train the small preset on it; without one both train
# the tiny preset on the CPU reference, and say so. Each ends with a 200-token sample of its model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
build=${BUILD_DIR:-build}
bash data_prep/prepare_kjv.sh "$build/data_prep" data/kjv
data=(--train-data data/kjv_train.bin --val-data data/kjv_val.bin)
if nvidia-smi -L >/dev/null 2>&1; then
    preset=(--preset small --eval-every 100 --log-every 25)
else
    echo "no GPU found: both trainers run the CPU reference on the tiny preset"
    preset=(--preset tiny)
fi
for trainer in train_latentmoe moe_ep_baseline; do
    echo; echo "=== $trainer ==="
    "$build/$trainer" "${preset[@]}" "${data[@]}" --sample 200 "$@"
done
