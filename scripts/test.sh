#!/usr/bin/env bash
# Sets up, builds and runs every test. Tests labelled gpu report "skipped" on a machine without a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure
