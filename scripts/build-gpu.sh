#!/usr/bin/env bash
# Builds the GPU binary and the GPU test binary on a CPU-only machine and stages them, stripped,
# in .devcarry/ (git-ignored) for the device machine, where scripts/gpu-check.sh runs them.
#
#   bash scripts/build-gpu.sh            # then: run scripts/gpu-check.sh on the GPU with carry .devcarry
#
# CARGO_TARGET_DIR defaults to a fixed folder outside the clone so that candle's ~20-minute CUDA
# kernel build is paid once per machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-toolchain.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/moelab/cuda-target}
cargo build --release --features cuda -p moelab-cli
tests=$(cargo test --release --features cuda -p moelab-kernels --test cuda_ops --no-run \
  --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_ops":
        print(m["executable"])')
mkdir -p .devcarry
cp "$CARGO_TARGET_DIR/release/moelab" .devcarry/moelab
cp "$tests" .devcarry/cuda_ops
strip .devcarry/moelab .devcarry/cuda_ops
ls -la .devcarry
