#!/usr/bin/env bash
# On a GPU machine (the device tool's, or yours): configure, build and run every test, with logs under
# $OUT (default out/). Prints the toolchain and the CTest summary last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on shared machines
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvcc --version | tail -1
    cmake --version | head -1
} 2>&1 | tee "$out/toolchain.txt"
cmake -B build -G Ninja ${CMAKE_ARGS:-} > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
ctest --test-dir build --output-on-failure 2>&1 | tee "$out/ctest.log" | tail -40
