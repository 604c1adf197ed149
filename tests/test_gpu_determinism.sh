#!/usr/bin/env bash
# Two 50-step GPU training runs of each system with the same seed and data must give bitwise
# identical losses and gradient norms at every step (SPEC §4: no floating-point atomics on the HP
# path; the MoE baseline keeps the same fixed orders, LocMoE's capacity drop too). Compares the
# --log-file CSVs: step, loss, norm, val loss, and for LocMoE its L_aux, L_loc and rows dropped (the
# time columns are dropped).
#   bash tests/test_gpu_determinism.sh BUILD_DIR      exit 77 (skipped) without a GPU
set -u
BUILD=$(cd "${1:?usage: test_gpu_determinism.sh BUILD_DIR}" && pwd)
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "skipped: no GPU found"
    exit 77
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_det.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
cd "$TMP" || exit 1
for i in $(seq 1 3000); do echo "line $i: the quick brown fox jumps over the lazy dog, again and again."; done >text.txt
"$BUILD/data_prep" --out data/t text.txt >/dev/null || exit 1
passed=0 failed=0
# a capacity of 1.0 drops copies in the first steps, so the drop's fixed order is exercised
systems=("train_latentmoe" "moe_ep_baseline" "moe_ep_baseline --router locmoe --capacity-factor 1")
for system in "${systems[@]}"; do
    read -r -a cmd <<<"$system"
    for run in a b; do
        "$BUILD/${cmd[0]}" "${cmd[@]:1}" --device gpu --steps 50 --batch 8 --seq-len 64 --eval-every 0 --log-every 25 \
            --train-data data/t_train.bin --val-data data/t_val.bin --checkpoint "$run.ckpt" --log-file "$run.csv" \
            >"$run.out" 2>&1 || cat "$run.out"
        cut -d, -f1-4,16-18 "$run.csv" >"$run.losses" 2>/dev/null
    done
    if [ "$(wc -l <a.losses)" -eq 50 ] && cmp -s a.losses b.losses; then
        echo "ok - $system: two 50-step runs give identical losses; last: $(tail -n 1 a.losses)"
        passed=$((passed + 1))
    else
        echo "not ok - $system: the runs differ:"; diff a.losses b.losses | head -5
        failed=$((failed + 1))
    fi
    rm -f a.* b.*
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
