#!/usr/bin/env bash
# Model quality at matched compute (docs/quality.md): scripts/compare.sh's systems once per seed, then
# arms that each change one setting of one trainer, all on the same data, seeds and token budget, every
# evaluation over the whole validation split. scripts/study.py then writes study.json, study.md (mean
# and spread over the seeds of every arm, expert loads per layer) and study_val_loss.png.
#
#   bash scripts/quality_study.sh PRESET STEPS [trainer flags...]    e.g. bash scripts/quality_study.sh small 967
#
# One epoch of the KJV train shard (3,963,971 tokens) is 967 steps of small's 4,096 tokens and 483 of
# p1's 8,192. The environment chooses:
#   STUDY=DIR      the folder (default out/study-PRESET-DATE-TIME); an existing one is refused
#   SEEDS="1 2 3"  the seeds of every system and arm
#   SYSTEMS="..."  compare.sh's systems to train over the seeds (default all; "": none, the arms alone)
#   ARMS="..."     the arms, names from the table below (default: all of them at small, none elsewhere:
#                  their flags are written for small's shapes and learning rate)
#   EVAL_EVERY=N   steps between validations (default STEPS / 8)
#   LAUNCH, BUILD_DIR, DATA, SETUP, K_SWEEP as for compare.sh (LAUNCH starts the arms too; the layer
#                  benchmark runs with the first seed only)
# A study can be run in parts (other SEEDS, SYSTEMS or ARMS, each into its own STUDY folder) and put
# together by `python3 scripts/study.py FIRST_FOLDER OTHER_FOLDERS... --arms ...`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash scripts/quality_study.sh PRESET STEPS [trainer flags...]" >&2
    exit 2
fi
preset=$1 steps=$2
shift 2
fail() { echo "quality_study: error: $* (nothing was run)" >&2; exit 2; }

# arm: trainer and the one setting it changes (small's shapes: d 512, H 8 × dh 64, E 32, fe 256, k 4, lr 1e-3)
arm_names=(latentmoe_heads4 latentmoe_heads16 latentmoe_bias0 moe_bias0 latentmoe_bias0.02 moe_bias0.02
    latentmoe_lr2e-3 moe_lr2e-3 latentmoe_lr5e-4 moe_lr5e-4 latentmoe_lr2.5e-4 moe_lr2.5e-4
    latentmoe_init0.5 latentmoe_init2 locmoe_cf1 locmoe_cf1.25)
declare -A arms=(
    [latentmoe_heads4]="train_latentmoe --latent-heads 4 --head-dim 128"  # H·dh = d and the expert FLOPs kept
    [latentmoe_heads16]="train_latentmoe --latent-heads 16 --head-dim 32"
    [latentmoe_bias0]="train_latentmoe --bias-rate 0"
    [moe_bias0]="moe_ep_baseline --bias-rate 0"
    [latentmoe_bias0.02]="train_latentmoe --bias-rate 0.02"
    [moe_bias0.02]="moe_ep_baseline --bias-rate 0.02"
    [latentmoe_lr2e-3]="train_latentmoe --lr 2e-3"
    [moe_lr2e-3]="moe_ep_baseline --lr 2e-3"
    [latentmoe_lr5e-4]="train_latentmoe --lr 5e-4"
    [moe_lr5e-4]="moe_ep_baseline --lr 5e-4"
    [latentmoe_lr2.5e-4]="train_latentmoe --lr 2.5e-4"
    [moe_lr2.5e-4]="moe_ep_baseline --lr 2.5e-4"
    [latentmoe_init0.5]="train_latentmoe --latent-init-scale 0.5"  # W_mh, W_mg start at half SPEC §2's std
    [latentmoe_init2]="train_latentmoe --latent-init-scale 2"
    [locmoe_cf1]="moe_ep_baseline --router locmoe --capacity-factor 1"
    [locmoe_cf1.25]="moe_ep_baseline --router locmoe --capacity-factor 1.25"
)
all_arms=("${arm_names[@]}")
if [[ -n ${ARMS+set} ]]; then
    read -r -a arm_names <<<"$ARMS"
elif [[ $preset != small ]]; then
    arm_names=()
fi
for arm in "${arm_names[@]}"; do
    [[ -n ${arms[$arm]:-} ]] || fail "no arm '$arm' (arms: ${all_arms[*]})"
done
[[ -z ${SYSTEMS+set} || -n ${SYSTEMS// /} || ${#arm_names[@]} -gt 0 ]] || fail "SYSTEMS=\"\" and no arms: nothing to train"
study=${STUDY:-out/study-$preset-$(date +%Y%m%d-%H%M%S)}
[[ ! -e $study ]] || fail "the folder $study exists; choose another STUDY"
source scripts/python_with.sh
py=$(python_with matplotlib) || fail "no Python with matplotlib (scripts/setup.sh installs python3-matplotlib)"
read -r -a seeds <<<"${SEEDS:-1 2 3}"
read -r -a launch <<<"${LAUNCH:-}"
build=${BUILD_DIR:-build}
data=${DATA:-data/kjv}
[[ ${SETUP:-1} == 0 ]] || bash scripts/setup.sh
[[ -n ${DATA:-} ]] || bash data_prep/prepare_kjv.sh "$build/data_prep" "$data"
export SETUP=0 DATA=$data
unset CHECKPOINTS  # a study keeps no checkpoints (each seed's would replace the last)
# the whole validation split (the trainer caps --eval-batches at what the shard holds)
common=(--steps "$steps" --eval-every "${EVAL_EVERY:-$(((steps + 7) / 8))}" --eval-batches 1000000
    --log-every 100 "$@")

mkdir -p "$study/arms"
compare_seed() { REPORT=$study/seed$1 SAMPLE=0 bash scripts/compare.sh "$preset" "${common[@]}" --seed "$1"; }
if [[ -z ${SYSTEMS+set} || -n ${SYSTEMS// /} ]]; then
    for seed in "${seeds[@]}"; do
        if [[ $seed == "${seeds[0]}" ]]; then compare_seed "$seed"; else K_SWEEP="" compare_seed "$seed"; fi
    done
fi
for arm in "${arm_names[@]}"; do
    read -r -a cmd <<<"${arms[$arm]}"
    for seed in "${seeds[@]}"; do
        run=$study/arms/$arm.seed$seed
        "${launch[@]}" "$build/${cmd[0]}" "${cmd[@]:1}" --preset "$preset" "${common[@]}" --seed "$seed" \
            --train-data "${data}_train.bin" --val-data "${data}_val.bin" --checkpoint none --log-file "$run.csv" \
            >"$run.log" 2>&1 || { echo "quality_study: error: $arm seed $seed failed; its log is $run.log" >&2; exit 1; }
        echo "$arm seed $seed: $(grep '^done' "$run.log")"
    done
done

"$py" scripts/study.py "$study" --arms "${arm_names[@]}" --describe "$(
    for arm in "${arm_names[@]}"; do printf '%s=%s;' "$arm" "${arms[$arm]}"; done)"
