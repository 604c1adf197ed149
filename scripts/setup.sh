#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks and builds everything into build/.
# Sourced by scripts/train.sh and scripts/test.sh; safe to run again (it only installs what is missing).
#   BUILD_DIR (default build), CMAKE_ARGS (extra configure flags, e.g. -DCMAKE_CUDA_ARCHITECTURES=90)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(cmake ninja-build g++ libopenmpi-dev openmpi-bin bible-kjv python3 python3-torch python3-matplotlib)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
fi
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The CUDA toolkit (nvcc, cuBLAS, NCCL) is needed to build even where no GPU is present.
if ! command -v nvcc >/dev/null 2>&1; then
    for dir in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do
        [[ -x $dir/nvcc ]] && export PATH="$dir:$PATH" && break
    done
fi
if ! command -v nvcc >/dev/null 2>&1; then
    echo "setup: error: nvcc not found. Install the CUDA toolkit (12.4 or newer, with NCCL) and put nvcc on PATH." >&2
    exit 1
fi

build=${BUILD_DIR:-build}
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
cmake -S . -B "$build" -G Ninja ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build"
