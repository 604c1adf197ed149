#!/usr/bin/env bash
# The main job: set up, prepare the default corpus (the King James Bible, offline), and train both
# models on it, Multi-Head LatentMoE first and the MoE baseline second. Extra arguments go to both
# trainers (e.g. --steps 100). With a GPU, train_latentmoe trains the small preset on it; the MoE
# baseline has no CUDA path yet and trains the tiny preset on the CPU. Without a GPU both train the
# tiny preset on the CPU reference, and say so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
build=${BUILD_DIR:-build}
bash data_prep/prepare_kjv.sh "$build/data_prep" data/kjv
data=(--train-data data/kjv_train.bin --val-data data/kjv_val.bin)
if nvidia-smi -L >/dev/null 2>&1; then
    latentmoe=(--preset small --eval-every 100 --log-every 25)
else
    echo "no GPU found: both trainers run the CPU reference on the tiny preset"
    latentmoe=(--preset tiny)
fi
echo; echo "=== train_latentmoe ==="
"$build/train_latentmoe" "${latentmoe[@]}" "${data[@]}" "$@"
echo; echo "=== moe_ep_baseline ==="
"$build/moe_ep_baseline" --preset tiny "${data[@]}" "$@"
