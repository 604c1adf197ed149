#!/usr/bin/env bash
# One device run for the dense part of the step: flash attention and the optimizer. Builds both
# precisions and an sm_90 build (mma.sync attention), runs the GPU tests of attention (all three
# builds), loss/optimizer and the whole model (bf16 and fp32),
# the determinism test, then times attention against PyTorch's fused attention (the anchor
# attention_block.py, carried in .anchors/) at B·T = 8192 tokens for T = 1024, 4096, 8192, and trains
# 12 steps for the step breakdown (KJV shards carried in data/): train_latentmoe p1 at those lengths,
# both trainers at p1 and p2 (T = 1024) with --grad-accum 1 and 4.
#   bash scripts/gpu_dense.sh          logs in $OUT/logs.tgz (default out/), a short table last
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/device_logs.sh
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
(cmake_build build "" test_gpu_attention test_gpu_loss_optim test_gpu_model train_latentmoe moe_ep_baseline data_prep &&
    touch "$logs/build.ok") &
(cmake_build build32 -DLMOE_FP32=ON test_gpu_attention test_gpu_loss_optim test_gpu_model && touch "$logs/build32.ok") &
# the mma.sync kernels that wgmma replaces in the default build
(cmake_build build90 -DCMAKE_CUDA_ARCHITECTURES=90 test_gpu_attention && touch "$logs/build90.ok") &
wait
for dir in build build32 build90; do [ -f "$logs/$dir.ok" ] || { echo "build of $dir failed"; exit 1; }; done
echo "build: ${SECONDS} s"
for test in test_gpu_attention test_gpu_loss_optim test_gpu_model; do ./build/$test >"$logs/$test.log" 2>&1; done
for test in test_gpu_attention test_gpu_loss_optim test_gpu_model; do ./build32/$test >"$logs/${test}_fp32.log" 2>&1; done
./build90/test_gpu_attention >"$logs/test_gpu_attention_sm90.log" 2>&1
bash tests/test_gpu_determinism.sh build >"$logs/determinism.log" 2>&1
pack_logs
lengths=(1024 4096 8192)
if [ -f .anchors/attention_block.py ]; then
    for T in "${lengths[@]}"; do python3 .anchors/attention_block.py $((8192 / T)) "$T" 8 1024; done >"$logs/anchor.log" 2>&1
fi
if [ -f data/kjv_train.bin ]; then
    # preset trainer T grad-accum
    runs=("p1 train_latentmoe 1024 1" "p1 moe_ep_baseline 1024 1" "p1 train_latentmoe 4096 1" "p1 train_latentmoe 8192 1"
        "p1 train_latentmoe 1024 4" "p1 moe_ep_baseline 1024 4" "p2 train_latentmoe 1024 1" "p2 moe_ep_baseline 1024 1"
        "p2 train_latentmoe 1024 4" "p2 moe_ep_baseline 1024 4")
    for run in "${runs[@]}"; do
        read -r preset trainer T ga <<<"$run"
        timeout 120 ./build/$trainer --preset "$preset" --seq-len "$T" --batch $((8192 / T)) --grad-accum "$ga" \
            --steps 12 --eval-every 0 --log-every 12 --train-data data/kjv_train.bin --val-data data/kjv_val.bin \
            --checkpoint none >"$logs/${preset}_${trainer}_T${T}_ga$ga.log" 2>&1
    done
fi
pack_logs
echo "tests, benchmarks and training: ${SECONDS} s"
for log in test_gpu_attention test_gpu_loss_optim test_gpu_model test_gpu_attention_fp32 test_gpu_loss_optim_fp32 \
    test_gpu_model_fp32 test_gpu_attention_sm90; do
    echo "== $log: $(tail -n 1 "$logs/$log.log")"
    grep -E "FAIL|NO$" "$logs/$log.log" | head -5
done
echo "== determinism: $(tail -n 1 "$logs/determinism.log")"
echo "== attention (ours), forward+backward"; grep "timing attention" "$logs/test_gpu_attention.log"
echo "== the same, sm_90 build (mma.sync)"; grep "timing attention" "$logs/test_gpu_attention_sm90.log"
echo "== optimizer"; grep -E "adamw_update n=|global_norm_squared n=" "$logs/test_gpu_loss_optim.log"
echo "== PyTorch SDPA and attention block"; [ -f "$logs/anchor.log" ] && grep RESULT "$logs/anchor.log"
echo "== training, 12 steps"
for log in "$logs"/p[12]_*.log; do
    echo "$(basename "$log" .log): $(grep '^done' "$log")"
    grep "time (ms)" "$log" | tail -n 1
    grep "taken by the model" "$log"
done
