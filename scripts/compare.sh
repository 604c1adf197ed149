#!/usr/bin/env bash
# EP against HP side by side: trains train_latentmoe and moe_ep_baseline with the same preset, data,
# seed and flags, then (on a GPU) times one FFN layer of each, and prints one table: model quality
# (final train and validation loss), throughput (median ms per step, tokens/s) and, for the layer,
# forward+backward ms and device memory. Logs and per-step CSVs go to out/compare/.
#   bash scripts/compare.sh [PRESET] [extra trainer flags...]     e.g. bash scripts/compare.sh small --steps 500
# Default preset: small with a GPU, tiny without (the CPU reference). One GPU; for several, run the
# trainers under mpirun as the README shows.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if nvidia-smi -L >/dev/null 2>&1; then gpu=1; preset=small; else gpu=0; preset=tiny; fi
if [[ $# -gt 0 && $1 != --* ]]; then preset=$1; shift; fi
bash scripts/setup.sh
build=${BUILD_DIR:-build}
bash data_prep/prepare_kjv.sh "$build/data_prep" data/kjv
out=out/compare
mkdir -p "$out"
rows=()
for trainer in train_latentmoe moe_ep_baseline; do
    echo "=== $trainer --preset $preset $* (log: $out/$trainer.log)"
    "$build/$trainer" --preset "$preset" --train-data data/kjv_train.bin --val-data data/kjv_val.bin \
        --checkpoint "$out/$trainer.ckpt" --log-file "$out/$trainer.csv" "$@" | tee "$out/$trainer.log" | grep -E "^(step .*val|done)"
    # done: train loss A -> B, val loss C (...); median step D ms, E tok/s[, MFU F%]
    summary=$(sed -n 's/^done: train loss [0-9.]* -> \([0-9.]*\), val loss \([0-9.]*\) .*median step \([0-9.]*\) ms, \([0-9]*\) tok\/s.*/\1 \2 \3 \4/p' "$out/$trainer.log")
    layer="- -"
    if [[ $gpu == 1 && ( $preset == p1 || $preset == p2 ) ]]; then
        # layer bench | GPU | FFN | N n tokens | forward a ms | forward+backward b ms | c TFLOP/s | d GiB on the device
        layer=$("$build/$trainer" --preset "$preset" --bench-layer 1 "$@" |
            sed -n 's/^layer bench .*forward+backward \([0-9.]*\) ms .* \([0-9.]*\) GiB on the device/\1 \2/p')
    fi
    rows+=("$trainer $summary $layer")
done
echo
printf '%-16s %11s %9s %11s %10s %16s %12s\n' trainer "train loss" "val loss" "ms/step" "tokens/s" "layer fwd+bwd ms" "layer GiB"
for row in "${rows[@]}"; do
    # shellcheck disable=SC2086  # the row is whitespace-separated fields
    printf '%-16s %11s %9s %11s %10s %16s %12s\n' $row
done
