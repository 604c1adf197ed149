#!/usr/bin/env bash
# One device run for model quality and the training table on one GPU (docs/quality.md,
# docs/perf/single_gpu.md): builds the trainers, then the phases named in PHASES (default all):
#   study  the p1 quality study: train_latentmoe and moe_ep_baseline over one epoch of KJV for the
#          seeds in SEEDS (default 1 2 3), with compare.sh's report and its layer benchmark over k for
#          the first (scripts/quality_study.sh p1 483); STUDY_SYSTEMS and STUDY_K_SWEEP narrow it (a
#          missing run: STUDY_SYSTEMS=moe_ep_baseline STUDY_K_SWEEP="" SEEDS=3); a study split over
#          calls is put together by scripts/study.py FOLDER1 FOLDER2;
#   train  p1 and p2 training of both trainers at --grad-accum 1 and 4 (tokens/s, MFU, step breakdown,
#          memory), then the layer benchmark of the three systems at p1 and p2 (LocMoE dropless and at
#          c_f 1.25);
#   arms   the small-preset arms named in SMALL_ARMS (default: the initialisation arms), seeds 1-3.
# Needs the KJV shards in data/ (carried). Each phase's folder comes back as $OUT/<phase>.tgz (default
# out/); a short table is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/device_logs.sh
export NCCL_NVLS_ENABLE=0 SETUP=0
read -r -a phases <<<"${PHASES:-study train arms}"
for phase in "${phases[@]}"; do
    [[ $phase == study || $phase == train || $phase == arms ]] ||
        { echo "gpu_quality: unknown phase '$phase' (phases: study train arms)" >&2; exit 2; }
done
has_phase() { [[ " ${phases[*]} " == *" $1 "* ]]; }
cmake_build build "" train_latentmoe moe_ep_baseline data_prep
echo "build: ${SECONDS} s"
data=(--train-data data/kjv_train.bin --val-data data/kjv_val.bin)
pack() { [[ -d $2 ]] && tar -czf "$out/$1.tgz" -C "$(dirname "$2")" "$(basename "$2")"; }

if has_phase study; then
    SYSTEMS="${STUDY_SYSTEMS:-train_latentmoe moe_ep_baseline}" K_SWEEP="${STUDY_K_SWEEP-4 8 16 32}" STUDY=$logs/study_p1 \
        timeout 540 bash scripts/quality_study.sh p1 483 >"$logs/study_p1.log" 2>&1
    [[ -d $logs/study_p1 ]] && cp "$logs/study_p1.log" "$logs/study_p1/"
    pack study_p1 "$logs/study_p1"
    echo "p1 study: ${SECONDS} s"
fi

if has_phase train; then
    mkdir -p "$logs/train"
    for preset in p1 p2; do
        for trainer in train_latentmoe moe_ep_baseline; do
            for accum in 1 4; do
                timeout 60 ./build/$trainer --preset $preset --grad-accum $accum --steps 12 --log-every 11 \
                    --eval-every 0 --eval-batches 1 "${data[@]}" --checkpoint none \
                    >"$logs/train/${trainer}_${preset}_ga$accum.log" 2>&1
            done
        done
    done
    for router in "" "--router locmoe" "--router locmoe --capacity-factor 1.25"; do
        for preset in p1 p2; do
            for trainer in train_latentmoe moe_ep_baseline; do
                [[ -n $router && $trainer == train_latentmoe ]] && continue
                # shellcheck disable=SC2086  # router is a list of flags
                echo "$trainer $preset $router: $(./build/$trainer --preset $preset $router --bench-layer 1 2>&1 |
                    grep 'layer bench')"
            done
        done
    done >"$logs/train/layer_bench.log"
    pack train "$logs/train"
    echo "training table and layer benchmark: ${SECONDS} s"
fi

read -r -a arms <<<"${SMALL_ARMS-latentmoe_init0.5 latentmoe_init2}"
if has_phase arms && [[ ${#arms[@]} -gt 0 ]]; then
    SEEDS="1 2 3" SYSTEMS="" ARMS="${arms[*]}" STUDY=$logs/study_small timeout 300 bash scripts/quality_study.sh small 967 \
        >"$logs/study_small.log" 2>&1
    [[ -d $logs/study_small ]] && cp "$logs/study_small.log" "$logs/study_small/"
    pack study_small "$logs/study_small"
    echo "small arms: ${SECONDS} s"
fi

if has_phase study; then echo "== p1 study"; cat "$logs/study_p1/study.md" 2>/dev/null || tail -5 "$logs/study_p1.log"; fi
if has_phase train; then
    echo "== training, 12 steps"
    for log in "$logs"/train/*_ga*.log; do
        echo "$(basename "$log" .log): $(grep '^done' "$log" || tail -n 1 "$log")"
        grep -E "^memory \(GPU\).*taken" "$log"
    done
    echo "== layer benchmark"; cat "$logs/train/layer_bench.log"
fi
if has_phase arms; then echo "== small arms"; grep -h "seed" "$logs/study_small.log" 2>/dev/null; fi
