#!/usr/bin/env bash
# One device run for the single-GPU work of both trainers: build both precisions, run the GPU tests,
# benchmark the routed layers next to the PyTorch EP anchor, and train the small preset of each
# trainer on the KJV shards (carried in data/); the sm_90a build of test_gpu_latentmoe checks the
# wgmma weight gradient.
# Logs go to $OUT (default out/); a short table is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
(cmake -B build -G Ninja >/dev/null && cmake --build build) >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
(cmake -B build32 -G Ninja -DLMOE_FP32=ON >/dev/null && cmake --build build32 --target test_gpu_model test_gpu_latentmoe test_gpu_moe) \
    >"$out/build32.log" 2>&1 || { tail -30 "$out/build32.log"; exit 1; }
# the wgmma weight gradient is built only for sm_90a
(cmake -B build90a -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90a >/dev/null && cmake --build build90a --target test_gpu_latentmoe) \
    >"$out/build90a.log" 2>&1 || { tail -30 "$out/build90a.log"; exit 1; }
echo "build: ${SECONDS} s"
ctest --test-dir build -L gpu --output-on-failure >"$out/ctest_gpu.log" 2>&1
./build32/test_gpu_model >"$out/model_fp32.log" 2>&1
./build32/test_gpu_latentmoe >"$out/latentmoe_fp32.log" 2>&1
./build32/test_gpu_moe >"$out/moe_fp32.log" 2>&1
./build/test_gpu_latentmoe --bench >"$out/bench.log" 2>&1
./build/test_gpu_moe --bench >"$out/bench_moe.log" 2>&1
./build90a/test_gpu_latentmoe --bench >"$out/latentmoe_90a.log" 2>&1
./build/test_gpu_model >"$out/model_bf16.log" 2>&1
# the independent PyTorch oracle on the fp32 GPU model's step
rm -rf "$out/dumps"
./build32/test_gpu_model --dump "$out/dumps" >/dev/null 2>&1
for dump in "$out"/dumps/*; do
    python3 tests/torch_oracle.py "$dump" --tolerance 1e-4 --tie-margin 1e-4 >"$out/oracle_$(basename "$dump").log" 2>&1
done
rm -rf "$out/dumps"
# the layer benchmark (SPEC §6: N = 8192 tokens), ours and the plain-PyTorch EP anchor on the same GPU
for trainer in train_latentmoe moe_ep_baseline; do
    for preset in p1 p2; do ./build/$trainer --preset $preset --bench-layer 1 2>&1 | grep "layer bench"; done
done >"$out/layer_bench.log"
if [ -f .anchors/pytorch_ep_layer.py ]; then
    python3 -m torch.distributed.run --standalone --nproc-per-node=1 .anchors/pytorch_ep_layer.py p1 1024 64 512 8 8 1024 \
        >"$out/anchor.log" 2>&1
    python3 -m torch.distributed.run --standalone --nproc-per-node=1 .anchors/pytorch_ep_layer.py p2 1024 128 256 16 8 1024 \
        >>"$out/anchor.log" 2>&1
fi
if [ -f data/kjv_train.bin ]; then
    for trainer in train_latentmoe moe_ep_baseline; do
        timeout 120 ./build/$trainer --preset small --steps ${STEPS:-300} --eval-every 100 --log-every 50 \
            --train-data data/kjv_train.bin --val-data data/kjv_val.bin --checkpoint "$out/small.ckpt" \
            --log-file "$out/small_$trainer.csv" >"$out/small_$trainer.log" 2>&1
        rm -f "$out/small.ckpt"
    done
fi
echo "== ctest (gpu label, bf16 build)"; grep -E "tests passed|Failed|\*\*\*|Skipped" "$out/ctest_gpu.log"
echo "== whole model vs CPU reference, fp32 build"; grep -E "loss:|FAIL|passed" "$out/model_fp32.log" | head -8
echo "tests and benchmarks: ${SECONDS} s"
echo "== routed layers, fp32 build"; tail -n 1 "$out/latentmoe_fp32.log" "$out/moe_fp32.log"
echo "== sm_90a build (wgmma weight gradient)"; grep -E "^bench|kernel expert weight" "$out/latentmoe_90a.log"; tail -n 1 "$out/latentmoe_90a.log"
echo "== routed layer stages (bf16)"; grep -A12 "^bench" "$out/bench.log" "$out/bench_moe.log"
echo "== whole model vs CPU reference, bf16 build (worst three)"; grep "rel err" "$out/model_bf16.log" | sort -k5 -g | tail -3
echo "== PyTorch oracle on the fp32 GPU dumps"; tail -n 1 "$out"/oracle_*.log
echo "== layer benchmark, forward+backward of one FFN layer"; cat "$out/layer_bench.log"; grep RESULT "$out/anchor.log"
echo "== small preset training"
for trainer in train_latentmoe moe_ep_baseline; do
    grep -E "val|done|error" "$out/small_$trainer.log" | tail -4
    [ -f "$out/small_$trainer.csv" ] && echo "--log-file: $(wc -l <"$out/small_$trainer.csv") lines, last: $(tail -n 1 "$out/small_$trainer.csv")"
done
# the device returns at most 8 files: the logs travel as one archive
tar -czf "${TMPDIR:-/tmp}/logs.tgz" -C "$out" . && find "$out" -name '*.log' -delete && mv "${TMPDIR:-/tmp}/logs.tgz" "$out/"
