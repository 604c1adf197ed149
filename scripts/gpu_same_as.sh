#!/usr/bin/env bash
# Does this tree compute what another checkout computes, as fast? For a change that must not alter
# the GPU's arithmetic (a move, a rename, a new type): builds both trainers in both trees (bf16), then
#   - trains each trainer with the same flags in both trees (small preset on the KJV shards in data/,
#     and a few p1 steps) and requires the logged loss and gradient norm of every step to be equal,
#     byte for byte;
#   - times the layer benchmark (p1, p2, both trainers) ROUNDS times, alternating between the trees,
#     and prints the median of each.
#   bash scripts/gpu_same_as.sh OTHER_TREE    e.g. OTHER_TREE from `git archive REV | tar -x -C .baseline`
# Logs come back as $OUT/logs.tgz (scripts/device_logs.sh); the comparison table is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -eq 1 ] && [ -f "$1/CMakeLists.txt" ] || { echo "usage: $0 OTHER_TREE (a source tree with a CMakeLists.txt)" >&2; exit 2; }
other=$(realpath "$1")
[ -f data/kjv_train.bin ] || { echo "$0: data/kjv_train.bin missing (bash data_prep/prepare_kjv.sh)" >&2; exit 2; }
source scripts/device_logs.sh
export NCCL_NVLS_ENABLE=0
rounds=${ROUNDS:-3}
cmake_build build "" train_latentmoe moe_ep_baseline
cmake_build build_other "-S $other" train_latentmoe moe_ep_baseline
echo "build: ${SECONDS} s"

data=(--train-data data/kjv_train.bin --val-data data/kjv_val.bin)
runs=("small --steps 60 --eval-every 0" "p1 --steps 12 --eval-every 0")
same=0 differ=0
for trainer in train_latentmoe moe_ep_baseline; do
    for run in "${runs[@]}"; do
        name="${trainer}_${run%% *}"
        for tree in build build_other; do
            # shellcheck disable=SC2086  # run is a list of flags
            ./$tree/$trainer --preset $run "${data[@]}" --log-every 1000 --checkpoint "$logs/$name.ckpt" \
                --log-file "$logs/$name.$tree.csv" >"$logs/$name.$tree.log" 2>&1
            rm -f "$logs/$name.ckpt"
        done
        if cmp -s <(cut -d, -f1-4 "$logs/$name.build.csv") <(cut -d, -f1-4 "$logs/$name.build_other.csv") &&
            [ -s "$logs/$name.build.csv" ]; then
            same=$((same + 1)); echo "$name: losses, norms and validation loss equal ($(wc -l <"$logs/$name.build.csv") steps)"
        else
            differ=$((differ + 1)); echo "$name: DIFFERENT"; diff "$logs/$name.build.csv" "$logs/$name.build_other.csv" | head -5
        fi
    done
done | tee "$logs/equality.txt"
pack_logs

layer_bench_rounds "$rounds"
pack_logs
echo "checks and benchmarks: ${SECONDS} s"

echo "== training, this tree against $other"; cat "$logs/equality.txt"
echo "== layer benchmark, forward+backward ms, median of $rounds rounds (this tree | other tree)"
layer_bench_medians
for trainer in train_latentmoe moe_ep_baseline; do
    for tree in build build_other; do
        echo "$trainer p1 $tree: $(grep '^done' "$logs/${trainer}_p1.$tree.log")"
    done
done
