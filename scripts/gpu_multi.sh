#!/usr/bin/env bash
# One device run for the multi-GPU work (2, 4 or 8 GPUs): build both precisions, check R GPUs against
# one for both trainers (fp32 build), 50-step reproducibility, then training throughput (with the
# per-step time breakdown and bytes sent) of both trainers on 1, 2, ... GPUs, for each preset in
# PRESETS (default p1; empty: no training), STEPS steps each (default 30). TESTS=0 skips the checks and
# the fp32 build; TRAINERS and GPU_COUNTS narrow the training runs, so that the work can be split over
# several calls (each at most 10 minutes). Each training run's wall seconds go to the end of its log
# (start-up, the slow first step, the final evaluation and checkpoint are a large part of a short run).
# Logs come back as $OUT/logs.tgz (default out/), refreshed after every run; a short table is printed
# last, with each phase's seconds.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/device_logs.sh
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on shared machines
gpus=$(nvidia-smi -L | grep -c '^GPU')
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee "$logs/gpu.txt"
nvidia-smi topo -m >"$logs/topo.txt" 2>&1
targets=(test_multi_gpu train_latentmoe moe_ep_baseline data_prep)
cmake_build build "" "${targets[@]}"
echo "build: ${SECONDS} s"
if [ "${TESTS:-1}" = 1 ]; then
    cmake_build build32 -DLMOE_FP32=ON "${targets[@]}"
    timeout 360 bash tests/test_multi_gpu.sh build32 >"$logs/multi_fp32.log" 2>&1
    timeout 360 bash tests/test_multi_gpu.sh build >"$logs/multi_bf16.log" 2>&1
    echo "tests: ${SECONDS} s"
    pack_logs
fi
MPIRUN=(mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE)
for preset in ${PRESETS-p1}; do
    for trainer in ${TRAINERS:-train_latentmoe moe_ep_baseline}; do
        for R in ${GPU_COUNTS:-1 2 4 8}; do
            [ "$R" -le "$gpus" ] || continue
            log="$logs/${preset}_${trainer}_R$R.log" start=$SECONDS
            timeout 120 "${MPIRUN[@]}" -np $R ./build/$trainer --preset $preset --steps ${STEPS:-30} --eval-every 0 \
                --log-every 10 --train-data data/kjv_train.bin --val-data data/kjv_val.bin --checkpoint "$logs/run.ckpt" \
                >"$log" 2>&1
            echo "wall: $((SECONDS - start)) s" >>"$log"
            rm -f "$logs"/run.ckpt*
            pack_logs
        done
    done
done
echo "training: ${SECONDS} s"
if [ "${TESTS:-1}" = 1 ]; then
    echo "== R GPUs against one (fp32 build)"; grep -E "R = |loss:|worst|bytes sent|FAIL|passed|ok -" "$logs/multi_fp32.log"
    echo "== bf16 build"; grep -E "loss:|passed|ok -" "$logs/multi_bf16.log"
fi
echo "== training (bf16), per preset, trainer and R"
for f in "$logs"/p[0-9]_*.log; do [ -e "$f" ] || continue; basename "$f"; grep -E "^step .*/|time \(ms\)|done|error|wall" "$f" | tail -4; done
pack_logs
