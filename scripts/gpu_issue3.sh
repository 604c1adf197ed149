#!/usr/bin/env bash
# One device run for the single-GPU LatentMoE work: build both precisions, run the GPU tests, train
# the small preset on the KJV shards (carried in data/), and benchmark the routed layer.
# Logs go to $OUT (default out/); a short table is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
(cmake -B build -G Ninja >/dev/null && cmake --build build) >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
(cmake -B build32 -G Ninja -DLMOE_FP32=ON >/dev/null && cmake --build build32 --target test_gpu_model test_gpu_latentmoe) \
    >"$out/build32.log" 2>&1 || { tail -30 "$out/build32.log"; exit 1; }
ctest --test-dir build -L gpu --output-on-failure >"$out/ctest_gpu.log" 2>&1
./build32/test_gpu_model >"$out/model_fp32.log" 2>&1
./build32/test_gpu_latentmoe >"$out/latentmoe_fp32.log" 2>&1
./build/test_gpu_latentmoe --bench >"$out/bench.log" 2>&1
if [ -f data/kjv_train.bin ]; then
    ./build/train_latentmoe --preset small --steps ${STEPS:-300} --eval-every 100 --log-every 50 --lr 1e-3 \
        --train-data data/kjv_train.bin --val-data data/kjv_val.bin --checkpoint "$out/small.ckpt" >"$out/train_small.log" 2>&1
    rm -f "$out/small.ckpt"
fi
echo "== ctest (gpu label, bf16 build)"; grep -E "tests passed|Failed|\*\*\*|Skipped" "$out/ctest_gpu.log"
echo "== whole model vs CPU reference, fp32 build"; grep -E "loss:|FAIL|passed" "$out/model_fp32.log" | head -8
echo "== routed layer, fp32 build"; tail -1 "$out/latentmoe_fp32.log"
echo "== routed layer bench (bf16)"; grep -A8 "^bench" "$out/bench.log"
echo "== small preset training"; grep -E "^step .*(/|val)|done|error" "$out/train_small.log" | tail -12
