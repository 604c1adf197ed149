#!/usr/bin/env bash
# One device run for the single-GPU work of both trainers: build both precisions, run the GPU tests,
# benchmark the routed layers (bench_latentmoe, bench_moe) and the FFN layer next to the PyTorch EP
# anchor, and train the small preset of each trainer on the KJV shards (carried in data/); the sm_90
# build checks the mma.sync weight gradient that GPUs without wgmma run (test_gpu_latentmoe) and times
# it (bench_latentmoe).
# Logs come back as $OUT/logs.tgz (default out/), refreshed after every phase; a short table is
# printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/device_logs.sh
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
cmake_build build ""
cmake_build build32 -DLMOE_FP32=ON test_gpu_model test_gpu_latentmoe test_gpu_moe
cmake_build build90 -DCMAKE_CUDA_ARCHITECTURES=90 test_gpu_latentmoe bench_latentmoe  # the mma.sync fallback
echo "build: ${SECONDS} s"
ctest --test-dir build -L gpu --output-on-failure >"$logs/ctest_gpu.log" 2>&1
./build32/test_gpu_model >"$logs/model_fp32.log" 2>&1
./build32/test_gpu_latentmoe >"$logs/latentmoe_fp32.log" 2>&1
./build32/test_gpu_moe >"$logs/moe_fp32.log" 2>&1
pack_logs
./build/bench_latentmoe >"$logs/bench.log" 2>&1
./build/bench_moe >"$logs/bench_moe.log" 2>&1
./build90/test_gpu_latentmoe >"$logs/latentmoe_90.log" 2>&1
./build90/bench_latentmoe >"$logs/bench_90.log" 2>&1
./build/test_gpu_model >"$logs/model_bf16.log" 2>&1
pack_logs
# the independent PyTorch oracle on the fp32 GPU model's step
rm -rf "$logs/dumps"
./build32/test_gpu_model --dump "$logs/dumps" >/dev/null 2>&1
for dump in "$logs"/dumps/*; do
    python3 tests/torch_oracle.py "$dump" --tolerance 1e-4 --tie-margin 1e-4 >"$logs/oracle_$(basename "$dump").log" 2>&1
done
rm -rf "$logs/dumps"
pack_logs
# the layer benchmark (SPEC §6: N = 8192 tokens), ours and the plain-PyTorch EP anchor on the same GPU
for trainer in train_latentmoe moe_ep_baseline; do
    for preset in p1 p2; do ./build/$trainer --preset $preset --bench-layer 1 2>&1 | grep "layer bench"; done
done >"$logs/layer_bench.log"
if [ -f .anchors/pytorch_ep_layer.py ]; then
    python3 -m torch.distributed.run --standalone --nproc-per-node=1 .anchors/pytorch_ep_layer.py p1 1024 64 512 8 8 1024 \
        >"$logs/anchor.log" 2>&1
    python3 -m torch.distributed.run --standalone --nproc-per-node=1 .anchors/pytorch_ep_layer.py p2 1024 128 256 16 8 1024 \
        >>"$logs/anchor.log" 2>&1
fi
pack_logs
if [ -f data/kjv_train.bin ]; then
    for trainer in train_latentmoe moe_ep_baseline; do
        timeout 120 ./build/$trainer --preset small --steps ${STEPS:-300} --eval-every 100 --log-every 50 \
            --train-data data/kjv_train.bin --val-data data/kjv_val.bin --checkpoint "$logs/small.ckpt" \
            --log-file "$logs/small_$trainer.csv" >"$logs/small_$trainer.log" 2>&1
        rm -f "$logs/small.ckpt"
        pack_logs
    done
fi
echo "tests, benchmarks and training: ${SECONDS} s"
echo "== ctest (gpu label, bf16 build)"; grep -E "tests passed|Failed|\*\*\*|Skipped" "$logs/ctest_gpu.log"
echo "== whole model vs CPU reference, fp32 build"; grep -E "loss:|FAIL|passed" "$logs/model_fp32.log" | head -8
echo "== routed layers, fp32 build"; tail -n 1 "$logs/latentmoe_fp32.log" "$logs/moe_fp32.log"
echo "== sm_90 build (mma.sync weight gradient)"; grep -E "^bench|kernel expert weight" "$logs/bench_90.log"; tail -n 1 "$logs/latentmoe_90.log"
echo "== routed layer stages (bf16)"; grep -A12 "^bench" "$logs/bench.log" "$logs/bench_moe.log"
echo "== whole model vs CPU reference, bf16 build (worst three)"; grep "rel err" "$logs/model_bf16.log" | sort -k5 -g | tail -3
echo "== PyTorch oracle on the fp32 GPU dumps"; tail -n 1 "$logs"/oracle_*.log
echo "== layer benchmark, forward+backward of one FFN layer"; cat "$logs/layer_bench.log"
[ -f "$logs/anchor.log" ] && grep RESULT "$logs/anchor.log"
echo "== small preset training"
for trainer in train_latentmoe moe_ep_baseline; do
    grep -E "val|done|error" "$logs/small_$trainer.log" | tail -4
    [ -f "$logs/small_$trainer.csv" ] && echo "--log-file: $(wc -l <"$logs/small_$trainer.csv") lines, last: $(tail -n 1 "$logs/small_$trainer.csv")"
done
