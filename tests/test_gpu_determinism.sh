#!/usr/bin/env bash
# Two 50-step GPU training runs of each trainer with the same seed and data must give bitwise
# identical losses and gradient norms at every step (SPEC §4: no floating-point atomics on the HP
# path; the MoE baseline keeps the same fixed orders). Compares the --log-file CSVs (step, loss, norm, val loss; the time column is dropped).
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
for trainer in train_latentmoe moe_ep_baseline; do
    for run in a b; do
        "$BUILD/$trainer" --device gpu --steps 50 --batch 8 --seq-len 64 --eval-every 0 --log-every 25 \
            --train-data data/t_train.bin --val-data data/t_val.bin --checkpoint "$run.ckpt" --log-file "$run.csv" \
            >"$run.out" 2>&1 || cat "$run.out"
        cut -d, -f1-4 "$run.csv" >"$run.losses" 2>/dev/null
    done
    if [ "$(wc -l <a.losses)" -eq 50 ] && cmp -s a.losses b.losses; then
        echo "ok - $trainer: two 50-step runs give identical losses; last: $(tail -n 1 a.losses)"
        passed=$((passed + 1))
    else
        echo "not ok - $trainer: the runs differ:"; diff a.losses b.losses | head -5
        failed=$((failed + 1))
    fi
    rm -f a.* b.*
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
