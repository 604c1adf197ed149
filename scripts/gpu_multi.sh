#!/usr/bin/env bash
# One device run for the multi-GPU work (2, 4 or 8 GPUs): build both precisions, check R GPUs against
# one for both trainers (fp32 build), 50-step reproducibility, then (LAYER=1, the default) the layer
# benchmark under mpirun at every R of GPU_COUNTS above 1 — HP, EP with each --ep-exchange, and with
# .anchors/pytorch_ep_layer.py (carried) the plain PyTorch EP layer at the same R — then training
# throughput (with the per-step time breakdown and bytes sent) of both trainers on 1, 2, ... GPUs, for
# each preset in PRESETS (default p1; empty: no training), STEPS steps each (default 30). TESTS=0 skips the checks and
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
if [ "${LAYER:-1}" = 1 ]; then
    for R in ${GPU_COUNTS:-2 4 8}; do
        [ "$R" -gt 1 ] && [ "$R" -le "$gpus" ] || continue
        log="$logs/layer_R$R.log"
        for preset in p1 p2; do
            timeout 120 "${MPIRUN[@]}" -np $R ./build/train_latentmoe --preset $preset --bench-layer 1 >>"$log" 2>&1
            for exchange in device host; do
                timeout 120 "${MPIRUN[@]}" -np $R ./build/moe_ep_baseline --preset $preset --ep-exchange $exchange \
                    --bench-layer 1 >>"$log" 2>&1
            done
        done
        if [ -f .anchors/pytorch_ep_layer.py ]; then
            timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node=$R .anchors/pytorch_ep_layer.py \
                p1 1024 64 512 8 8 1024 >>"$log" 2>&1
            timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node=$R .anchors/pytorch_ep_layer.py \
                p2 1024 128 256 16 8 1024 >>"$log" 2>&1
        fi
        pack_logs
    done
    echo "layer: ${SECONDS} s"
fi
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
echo "== layer benchmark (bf16), per R: HP p1, EP p1 device, host; HP p2, EP p2 device, host; PyTorch EP p1, p2"
for f in "$logs"/layer_R*.log; do [ -e "$f" ] || continue; basename "$f"; grep -E "rank 0 |expert exchange|RESULT|error" "$f"; done
echo "== training (bf16), per preset, trainer and R"
for f in "$logs"/p[0-9]_*.log; do [ -e "$f" ] || continue; basename "$f"; grep -E "^step .*/|time \(ms\)|done|error|wall" "$f" | tail -4; done
pack_logs
