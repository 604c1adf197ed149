#!/usr/bin/env bash
# The comparison a researcher runs: trains train_latentmoe, moe_ep_baseline and, when this build's
# moe_ep_baseline has a --router flag, its LocMoE router, all with the same preset, data, seed, flags
# and so the same token budget; on a GPU it then times one FFN layer of each over a sweep of k at fixed
# expert FLOPs (--bench-layer). It writes a report folder: each run's log and per-step CSV, the layer
# benchmark's table, and what scripts/report.py makes of them (report.json with every figure, PNG plots).
#
#   bash scripts/compare.sh [PRESET] [trainer flags...]     e.g. bash scripts/compare.sh small --steps 500
#
# PRESET defaults to small with a GPU and tiny without one (the CPU reference). The environment chooses:
#   REPORT=DIR         the report folder (default out/report-DATE-TIME); an existing one is refused
#   LAUNCH="mpirun --allow-run-as-root -np 4 -x NCCL_NVLS_ENABLE"   start every training run under it
#   DATA=PREFIX        the shards PREFIX_train.bin and PREFIX_val.bin (default data/kjv, made when missing)
#   BUILD_DIR=DIR      the build (default build); SETUP=0 uses it as it is instead of running scripts/setup.sh
#   SAMPLE=N           tokens each run generates at its end, kept in the report (default 200; 0: none)
#   K_SWEEP="2 4 8 16 32"   k of the layer benchmark, each with E and the expert size scaled to keep E/k
#                      and k·fe of the preset (on a GPU; a shape the kernels lack is noted and skipped;
#                      K_SWEEP="" runs no benchmark)
#   SYSTEMS="train_latentmoe moe_ep_baseline"   the systems to train (default: all three)
#   CHECKPOINTS=DIR    keep each run's checkpoint there (default: none is written, --checkpoint none)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if nvidia-smi -L >/dev/null 2>&1; then gpu=1; preset=small; else gpu=0; preset=tiny; fi
if [[ $# -gt 0 && $1 != --* ]]; then preset=$1; shift; fi
report=${REPORT:-out/report-$(date +%Y%m%d-%H%M%S)}
if [[ -e $report ]]; then
    echo "compare: error: the report folder $report exists; choose another REPORT (nothing was run)" >&2
    exit 2
fi
source scripts/python_with.sh
py=$(python_with matplotlib) || {
    echo "compare: error: no Python with matplotlib (scripts/setup.sh installs python3-matplotlib)" >&2
    exit 2
}
[[ ${SETUP:-1} == 0 ]] || bash scripts/setup.sh
build=${BUILD_DIR:-build}
data=${DATA:-data/kjv}
[[ -n ${DATA:-} ]] || bash data_prep/prepare_kjv.sh "$build/data_prep" "$data"
read -r -a launch <<<"${LAUNCH:-}"

# name and command of every system; LocMoE only where the binary accepts --router
systems=(train_latentmoe moe_ep_baseline)
declare -A command=([train_latentmoe]="$build/train_latentmoe" [moe_ep_baseline]="$build/moe_ep_baseline")
help=$("$build/moe_ep_baseline" --help)  # not piped into grep -q, which may close the pipe early
if grep -q -- '--router ' <<<"$help"; then
    systems+=(moe_ep_locmoe)
    command[moe_ep_locmoe]="$build/moe_ep_baseline --router locmoe"
else
    echo "compare: this moe_ep_baseline has no --router flag: LocMoE is left out"
fi
if [[ -n ${SYSTEMS+set} ]]; then
    read -r -a chosen <<<"$SYSTEMS"
    [[ ${#chosen[@]} -gt 0 ]] || { echo "compare: error: SYSTEMS is empty (systems: ${systems[*]})" >&2; exit 2; }
    for name in "${chosen[@]}"; do
        [[ -n ${command[$name]:-} ]] || { echo "compare: error: SYSTEMS names '$name' (systems: ${systems[*]})" >&2; exit 2; }
    done
    systems=("${chosen[@]}")
fi
mkdir -p "$report"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/compare.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

for name in "${systems[@]}"; do
    read -r -a cmd <<<"${command[$name]}"
    checkpoint=none
    [[ -z ${CHECKPOINTS:-} ]] || { mkdir -p "$CHECKPOINTS" && checkpoint=$CHECKPOINTS/$name.ckpt; }
    echo "=== $name --preset $preset $* (log: $report/$name.log)"
    "${launch[@]}" "${cmd[@]}" --preset "$preset" --train-data "${data}_train.bin" --val-data "${data}_val.bin" \
        --checkpoint "$checkpoint" --log-file "$report/$name.csv" --sample "${SAMPLE:-200}" "$@" \
        2>&1 | tee "$report/$name.log" | grep -E '^(step .*val|done)' || {
        echo "compare: error: $name failed; its log is $report/$name.log" >&2
        exit 1
    }
done

# The layer benchmark on one GPU (never under the launcher): forward + backward of one FFN layer of
# the preset's B·T tokens, for each k of the sweep.
bench=$report/layer_bench.tsv
sweep=${K_SWEEP-2 4 8 16 32}
if [[ $gpu == 1 && -n $sweep ]]; then
    printf 'system\tk\tE\texpert_dim\tforward_ms\tforward_backward_ms\ttflops\tgib\tnote\n' >"$bench"
    for name in "${systems[@]}"; do
        read -r -a cmd <<<"${command[$name]}"
        # "config: ... | <FFN>: [H h dh d ]E e fe|f f k k | ..."
        read -r E0 f0 k0 < <(sed -n 's/^config: .* E \([0-9]*\) fe\{0,1\} \([0-9]*\) k \([0-9]*\) |.*/\1 \2 \3/p' "$report/$name.log") ||
            { echo "compare: no E, expert size and k in $report/$name.log's config line: no layer benchmark"; continue; }
        for k in $sweep; do
            if (((E0 * k) % k0 || (f0 * k0) % k)); then
                printf '%s\t%s\t\t\t\t\t\t\t%s\n' "$name" "$k" "E/k and k·fe of the preset are not whole" >>"$bench"
                continue
            fi
            E=$((E0 * k / k0)) fe=$((f0 * k0 / k))
            if out=$("${cmd[@]}" --preset "$preset" "$@" --topk "$k" --experts "$E" --expert-dim "$fe" --bench-layer 1 \
                2>"$scratch/bench.err"); then
                # layer bench | GPU | FFN | N n tokens | forward a ms | forward+backward b ms | c TFLOP/s | d GiB on the device
                sed -n "s/^layer bench .*forward \([0-9.]*\) ms | forward+backward \([0-9.]*\) ms | \([0-9.]*\) TFLOP\/s | \([0-9.]*\) GiB.*/$name\t$k\t$E\t$fe\t\1\t\2\t\3\t\4\t/p" <<<"$out" >>"$bench"
            else
                printf '%s\t%s\t%s\t%s\t\t\t\t\t%s\n' "$name" "$k" "$E" "$fe" "$(tail -n 1 "$scratch/bench.err")" >>"$bench"
            fi
        done
        echo "layer bench: $name over k = $sweep"
    done
fi

"$py" scripts/report.py "$report" --preset "$preset" --launch "${LAUNCH:-}" --flags "$*" --systems "${systems[@]}"
