#!/usr/bin/env bash
# Multi-GPU checks (SPEC §8.4), on every R in {2, 4, 8} the machine has GPUs for: test_multi_gpu (R GPUs
# against one for Head and Expert Parallel, bytes against SPEC §3) and, on the largest R, two 50-step
# training runs of each trainer that must give identical losses. Exit 77 (skipped) with fewer than two GPUs.
#   bash tests/test_multi_gpu.sh BUILD_DIR
set -u
BUILD=$(cd "${1:?usage: test_multi_gpu.sh BUILD_DIR}" && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$gpus" -lt 2 ]; then
    echo "skipped: $gpus GPU(s), need at least 2"
    exit 77
fi
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on shared machines
MPIRUN=(mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE)
passed=0 failed=0
for R in 2 4 8; do
    [ "$R" -le "$gpus" ] || continue
    if "${MPIRUN[@]}" -np "$R" "$BUILD/test_multi_gpu"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
R=2
[ "$gpus" -ge 4 ] && R=4
[ "$gpus" -ge 8 ] && R=8
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_mgpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
for i in $(seq 1 3000); do echo "line $i: the quick brown fox jumps over the lazy dog, again and again."; done >"$TMP/text.txt"
"$BUILD/data_prep" --out "$TMP/t" "$TMP/text.txt" >/dev/null
determinism() {  # two 50-step runs of one trainer on R GPUs must give the same losses
    local trainer=$1
    shift
    for run in a b; do
        "${MPIRUN[@]}" -np "$R" "$BUILD/$trainer" --steps 50 --batch 4 --seq-len 64 "$@" --eval-every 0 --log-every 25 \
            --train-data "$TMP/t_train.bin" --val-data "$TMP/t_val.bin" --checkpoint "$TMP/$run.ckpt" \
            --log-file "$TMP/$run.csv" >"$TMP/$run.out" 2>&1 || cat "$TMP/$run.out"
        cut -d, -f1-4 "$TMP/$run.csv" >"$TMP/$run.losses" 2>/dev/null
    done
    if [ "$(wc -l <"$TMP/a.losses")" -eq 50 ] && cmp -s "$TMP/a.losses" "$TMP/b.losses"; then
        echo "ok - $trainer: two 50-step runs on $R GPUs give identical losses; last: $(tail -n 1 "$TMP/a.losses")"
        passed=$((passed + 1))
    else
        echo "not ok - $trainer: two 50-step runs on $R GPUs differ"; diff "$TMP/a.losses" "$TMP/b.losses" | head -5
        failed=$((failed + 1))
    fi
    rm -f "$TMP"/[ab].*
}
determinism train_latentmoe --latent-heads 8 --head-dim 16
determinism moe_ep_baseline
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
