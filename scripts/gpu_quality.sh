#!/usr/bin/env bash
# One device run for model quality and the training table on one GPU (docs/quality.md,
# docs/perf/single_gpu.md): builds the trainers, then
#   1. the p1 quality study: train_latentmoe and moe_ep_baseline over one epoch of KJV, seeds 1-3, with
#      compare.sh's report (plots, layer benchmark over k) for seed 1 (scripts/quality_study.sh p1 483);
#   2. p1 and p2 training of both trainers at --grad-accum 1 and 4 (tokens/s, MFU, step breakdown);
#   3. the layer benchmark of the three systems at p1 and p2 (LocMoE dropless and at c_f 1.25);
#   4. the small-preset arms named in SMALL_ARMS (default: the initialisation arms), seeds 1-3.
# PHASES="study train arms" chooses the phases (default all three; a device call's 10 minutes hold the
# p1 study alone, or the other two together). Needs the KJV shards in data/ (carried). Each phase's
# folder comes back as $OUT/<phase>.tgz (default out/); a short table is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/device_logs.sh
export NCCL_NVLS_ENABLE=0 SETUP=0
cmake_build build "" train_latentmoe moe_ep_baseline data_prep
echo "build: ${SECONDS} s"
data=(--train-data data/kjv_train.bin --val-data data/kjv_val.bin)
pack() { tar -czf "$out/$1.tgz" -C "$(dirname "$2")" "$(basename "$2")"; }
phases=" ${PHASES:-study train arms} "

[[ $phases == *" study "* ]] && SYSTEMS="train_latentmoe moe_ep_baseline" K_SWEEP="4 8 16 32" STUDY=$logs/study_p1 \
    timeout 500 bash scripts/quality_study.sh p1 483 >"$logs/study_p1.log" 2>&1
if [[ -d $logs/study_p1 ]]; then
    cp "$logs/study_p1.log" "$logs/study_p1/"
    pack study_p1 "$logs/study_p1"
fi
echo "p1 study: ${SECONDS} s"

mkdir -p "$logs/train"
for preset in p1 p2; do
    [[ $phases == *" train "* ]] || break
    for trainer in train_latentmoe moe_ep_baseline; do
        for accum in 1 4; do
            timeout 60 ./build/$trainer --preset $preset --grad-accum $accum --steps 12 --log-every 11 --eval-every 0 \
                --eval-batches 1 "${data[@]}" --checkpoint none >"$logs/train/${trainer}_${preset}_ga$accum.log" 2>&1
        done
    done
done
for router in "" "--router locmoe" "--router locmoe --capacity-factor 1.25"; do
    [[ $phases == *" train "* ]] || break
    for preset in p1 p2; do
        for trainer in train_latentmoe moe_ep_baseline; do
            [[ -n $router && $trainer == train_latentmoe ]] && continue
            # shellcheck disable=SC2086  # router is a list of flags
            echo "$trainer $preset $router: $(./build/$trainer --preset $preset $router --bench-layer 1 2>&1 | grep 'layer bench')"
        done
    done
done >"$logs/train/layer_bench.log"
[[ $phases == *" train "* ]] && pack train "$logs/train"
echo "training table and layer benchmark: ${SECONDS} s"

read -r -a arms <<<"${SMALL_ARMS-latentmoe_init0.5 latentmoe_init2}"
if [[ $phases == *" arms "* && ${#arms[@]} -gt 0 ]]; then
    SYSTEMS="" ARMS="${arms[*]}" STUDY=$logs/study_small timeout 200 bash scripts/quality_study.sh small 967 \
        >"$logs/study_small.log" 2>&1
    if [[ -d $logs/study_small ]]; then
        cp "$logs/study_small.log" "$logs/study_small/"
        pack study_small "$logs/study_small"
    fi
fi
echo "small arms: ${SECONDS} s"

echo "== p1 study"; cat "$logs/study_p1/study.md" 2>/dev/null || tail -5 "$logs/study_p1.log"
echo "== training, 12 steps"
for log in "$logs"/train/*_ga*.log; do echo "$(basename "$log" .log): $(grep '^done' "$log" || tail -n 1 "$log")"; done
echo "== layer benchmark"; cat "$logs/train/layer_bench.log"
echo "== small arms"; grep -h "seed" "$logs/study_small.log" 2>/dev/null
