#!/usr/bin/env bash
# One device run for work on the routed layers' kernels (docs/perf/expert_kernels.md): builds this
# tree in bf16 (sm_90a, the default) and the EXTRA_BUILDS (default "build32 build90 build80": fp32, sm_90
# with the mma.sync kernels, and sm_80 alone to see a binary refuse a GPU it was not built for; "" for
# a first check of a change in a few minutes) and, side by side, the benchmarks of OTHER_TREE; then
#   - the GPU tests of the routed layers, the model, the loss and optimizer and attention
#     (test_gpu_latentmoe, test_gpu_moe, test_gpu_locmoe, test_gpu_model, test_gpu_loss_optim,
#     test_gpu_attention, or those TESTS names) in each build, each cut off after 300 s (a kernel
#     that hangs fails its test instead of the whole call), and test_gpu_determinism;
#   - bench_latentmoe and bench_moe of both trees (stages, expert kernels, routing glue), and the
#     timing lines of both trees' test_gpu_attention, each cut off after 120 s;
#   - the layer benchmark (`--bench-layer 1`, p1 and p2, both trainers) ROUNDS times (default 3; 0 for
#     none), alternating trees;
#   - with KSWEEP=1, the layer benchmark of both trainers over k = 4, 8, 16, 32 at p1's k·fe (and E/k),
#     with its peak device memory; with .anchors/pytorch_ep_layer.py (carried), the plain PyTorch EP
#     anchor at p1 and p2 (docs/SPEC.md §9.1) in the same job;
#   - with TRAIN=1 and the KJV shards in data/ (carried), 12 p1 training steps of both trainers in both
#     trees;
#   - with NCU=1 (default), Nsight Compute's speed-of-light, occupancy, warp-stall, pipe, instruction
#     and scheduler sections, in detail, of the first p1 launches of the three LatentMoE expert
#     kernels, and the summary sections of the first six grouped-GEMM launches of bench_moe (p1's
#     four row GEMMs and two weight gradients; `ncu --clock-control none`; machines whose runtime
#     hides the counters only log the refusal).
#   - with BENCH=0, this tree's builds and tests only (OTHER_TREE is not built);
#   - with VARIANTS="DIR ..." (source trees, e.g. copies of this one with a kernel changed; not with
#     BENCH=0), each variant's bf16 build of bench_latentmoe, bench_moe and the VARIANT_TESTS
#     (default test_gpu_latentmoe test_gpu_moe): its tests and its stage benchmarks run after this
#     tree's, and its "kernel ..." lines are printed beside theirs (and its attention timing lines
#     where VARIANT_TESTS names test_gpu_attention).
#   bash scripts/gpu_kernels.sh OTHER_TREE    e.g. OTHER_TREE from `git archive REV | tar -x -C .before`
# Logs come back as $OUT/logs.tgz (scripts/device_logs.sh), refreshed after every phase; a short table
# is printed last. The tests in three builds are its longest phase (some 4 minutes on an H200 side
# by side, 8 one after another): with every benchmark and TRAIN=1 as well it does not fit one
# device call, so run the extra builds' tests with BENCH=0 in a call of their own, and the benchmarks
# (and TRAIN=1) with EXTRA_BUILDS="" in another. Even that second call holds TRAIN=1 with KSWEEP=1 or
# NCU=1, not both: with both it ran past 580 s in its last training run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -eq 1 ] && [ -f "$1/CMakeLists.txt" ] || { echo "usage: $0 OTHER_TREE (a source tree with a CMakeLists.txt)" >&2; exit 2; }
other=$(realpath "$1")
source scripts/device_logs.sh
export NCCL_NVLS_ENABLE=0
rounds=${ROUNDS:-3}
read -r -a tests <<<"${TESTS:-test_gpu_latentmoe test_gpu_moe test_gpu_locmoe test_gpu_model test_gpu_loss_optim test_gpu_attention}"
read -r -a extra <<<"${EXTRA_BUILDS-build32 build90 build80}"
declare -A build_flags=([build32]=-DLMOE_FP32=ON [build90]=-DCMAKE_CUDA_ARCHITECTURES=90
    [build80]=-DCMAKE_CUDA_ARCHITECTURES=80-real)
declare -A build_name=([build]=bf16 [build32]=fp32 [build90]=sm_90)
benches=(bench_latentmoe bench_moe train_latentmoe moe_ep_baseline)
(cmake_build build "" "${tests[@]}" "${benches[@]}" data_prep && touch "$logs/build.ok") &
for dir in "${extra[@]}"; do
    [ -n "${build_flags[$dir]:-}" ] || { echo "EXTRA_BUILDS: no build named $dir (build32, build90, build80)" >&2; exit 2; }
    if [ "$dir" = build80 ]; then targets=(train_latentmoe); else targets=("${tests[@]}"); fi
    (cmake_build "$dir" "${build_flags[$dir]}" "${targets[@]}" && touch "$logs/$dir.ok") &
done
trees=(build "${extra[@]}")
if [ "${BENCH:-1}" != 0 ]; then
    (cmake_build build_other "-S $other" "${benches[@]}" test_gpu_attention && touch "$logs/build_other.ok") &
    trees+=(build_other)
fi
variants=()
[ "${BENCH:-1}" != 0 ] && read -r -a variants <<<"${VARIANTS:-}"
read -r -a variant_tests <<<"${VARIANT_TESTS:-test_gpu_latentmoe test_gpu_moe}"
for i in "${!variants[@]}"; do
    [ -f "${variants[$i]}/CMakeLists.txt" ] || { echo "VARIANTS: ${variants[$i]} has no CMakeLists.txt" >&2; exit 2; }
    (cmake_build "build_variant$i" "-S $(realpath "${variants[$i]}")" bench_latentmoe bench_moe "${variant_tests[@]}" &&
        touch "$logs/build_variant$i.ok") &
    trees+=("build_variant$i")
done
wait
for dir in "${trees[@]}"; do [ -f "$logs/$dir.ok" ] || { echo "build of $dir failed"; exit 1; }; done
echo "build: ${SECONDS} s"

run_tests() {  # run_tests DIR: every GPU test of one build, a line each into $logs/tests.NAME.txt
    local t name=${build_name[$1]}
    for t in "${tests[@]}"; do
        timeout 300 ./$1/$t >"$logs/$t.$name.log" 2>&1; echo "$t $name: rc $? $(tail -n 1 "$logs/$t.$name.log")"
    done >"$logs/tests.$name.txt"
}
# With EXTRA_BUILDS the builds' tests run side by side, to fit one device call: the timing lines
# some tests print are then not measurements (take those from a run with EXTRA_BUILDS="").
for dir in build "${extra[@]}"; do
    [ "$dir" = build80 ] || run_tests "$dir" &
done
wait
for dir in build "${extra[@]}"; do [ "$dir" = build80 ] || cat "$logs/tests.${build_name[$dir]}.txt"; done >"$logs/tests.txt"
if [ -f "$logs/build80.ok" ]; then
    ./build80/train_latentmoe --preset tiny --steps 1 >"$logs/sm80.log" 2>&1
    echo "sm_80-only binary on this GPU: rc $? $(tail -n 1 "$logs/sm80.log")" >>"$logs/tests.txt"
fi
bash tests/test_gpu_determinism.sh build >"$logs/determinism.log" 2>&1
echo "test_gpu_determinism: rc $? $(tail -n 1 "$logs/determinism.log")" >>"$logs/tests.txt"
pack_logs
if [ "${BENCH:-1}" = 0 ]; then
    echo "tests: ${SECONDS} s"
    echo "== tests"; cat "$logs/tests.txt"
    exit 0
fi
for b in bench_latentmoe bench_moe; do
    timeout 120 ./build/$b >"$logs/$b.log" 2>&1
    timeout 120 ./build_other/$b >"$logs/$b.other.log" 2>&1
done
timeout 120 ./build_other/test_gpu_attention >"$logs/test_gpu_attention.other.log" 2>&1  # for its timing lines
for i in "${!variants[@]}"; do
    for t in "${variant_tests[@]}"; do
        timeout 300 "./build_variant$i/$t" >"$logs/$t.variant$i.log" 2>&1
        echo "$t variant $i (${variants[$i]}): rc $? $(tail -n 1 "$logs/$t.variant$i.log")" >>"$logs/tests.txt"
    done
    for b in bench_latentmoe bench_moe; do timeout 120 "./build_variant$i/$b" >"$logs/$b.variant$i.log" 2>&1; done
done
pack_logs
[ "$rounds" -gt 0 ] && layer_bench_rounds "$rounds"
pack_logs
if [ "${KSWEEP:-0}" = 1 ]; then
    for trainer in train_latentmoe moe_ep_baseline; do
        for k in 4 8 16 32; do
            echo "$trainer k $k: $(./build/$trainer --preset p1 --topk $k --experts $((64 * k / 8)) --expert-dim $((512 * 8 / k)) \
                --bench-layer 1 2>&1 | grep 'layer bench')"
        done
    done >"$logs/k_sweep.txt"
    pack_logs
fi
if [ -f .anchors/pytorch_ep_layer.py ]; then
    for shape in "p1 1024 64 512 8 8 1024" "p2 1024 128 256 16 8 1024"; do
        # shellcheck disable=SC2086  # the shape is the anchor's arguments
        timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node=1 .anchors/pytorch_ep_layer.py $shape
    done >"$logs/anchor.log" 2>&1
    pack_logs
fi
if [ "${TRAIN:-0}" = 1 ] && [ -f data/kjv_train.bin ]; then
    for trainer in train_latentmoe moe_ep_baseline; do
        for tree in build build_other; do
            timeout 90 ./$tree/$trainer --preset p1 --steps 12 --log-every 11 --eval-every 0 --eval-batches 1 \
                --train-data data/kjv_train.bin --val-data data/kjv_val.bin --checkpoint none \
                >"$logs/train_${trainer}_$tree.log" 2>&1
            pack_logs
        done
    done
fi
if [ "${NCU:-1}" = 1 ]; then
    timeout 200 ncu --clock-control none -k 'regex:expert_(rows_wgmma|weight_backward_mma)' -c 3 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
        --section SchedulerStats --print-details all \
        ./build/bench_latentmoe >"$logs/ncu.txt" 2>&1
    echo "ncu: rc $?" >>"$logs/ncu.txt"
    timeout 150 ncu --clock-control none -k 'regex:(rows_gemm|weight_grad)_wgmma' -c 6 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section InstructionStats ./build/bench_moe >"$logs/ncu_moe.txt" 2>&1
    echo "ncu: rc $?" >>"$logs/ncu_moe.txt"
    pack_logs
fi
echo "tests and benchmarks: ${SECONDS} s"

echo "== tests"; cat "$logs/tests.txt"
for b in bench_latentmoe bench_moe; do
    echo "== $b, this tree"; grep -E "^bench|glue|kernel|route|weight|gather|group|total" "$logs/$b.log" | head -60
    echo "== $b, $other"; grep -E "^bench|route|weight|gather|group|total" "$logs/$b.other.log" | head -40
done
for i in "${!variants[@]}"; do
    for b in bench_latentmoe bench_moe; do
        echo "== $b kernels, this tree | variant $i (${variants[$i]})"
        paste -d '|' <(grep -E "^bench|kernel" "$logs/$b.log") <(grep -E "^bench|kernel" "$logs/$b.variant$i.log") |
            sed -E 's/ +/ /g'
    done
done
echo "== attention, this tree | $other"; grep -h "timing attention" "$logs/test_gpu_attention.bf16.log" "$logs/test_gpu_attention.other.log" 2>/dev/null
for i in "${!variants[@]}"; do  # where VARIANT_TESTS names test_gpu_attention
    [ -f "$logs/test_gpu_attention.variant$i.log" ] &&
        { echo "== attention, variant $i (${variants[$i]})"; grep "timing attention" "$logs/test_gpu_attention.variant$i.log"; }
done
for f in ncu ncu_moe; do
    [ -f "$logs/$f.txt" ] && { echo "== $f"; grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Registers Per|Achieved Occupancy|ncu: rc" "$logs/$f.txt" | head -60; }
done
for log in "$logs"/train_*.log; do
    [ -f "$log" ] && echo "$(basename "$log" .log): $(grep '^done' "$log" || tail -n 1 "$log")" && grep "time (ms)" "$log" | tail -n 1
done
[ -f "$logs/k_sweep.txt" ] && { echo "== k sweep (p1, k·fe = 4096)"; cat "$logs/k_sweep.txt"; }
[ -f "$logs/anchor.log" ] && { echo "== PyTorch EP anchor"; grep RESULT "$logs/anchor.log"; }
if [ "$rounds" -gt 0 ]; then
    echo "== layer benchmark, forward+backward ms, median of $rounds rounds (this tree | other tree)"
    layer_bench_medians
fi
