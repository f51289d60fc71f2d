#!/usr/bin/env bash
# Builds the GPU binary and the GPU test binary on a CPU-only machine and stages them, stripped
# and xz-compressed (candle's embedded PTX makes them ~60 MB each, ~14 MB together compressed),
# in .devcarry/ (git-ignored) for the device machine, where scripts/gpu-check.sh unpacks and runs
# them.
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
rm -rf .devcarry && mkdir -p .devcarry
for pair in "moelab:$CARGO_TARGET_DIR/release/moelab" "cuda_ops:$tests"; do
  name=${pair%%:*}
  strip -o ".devcarry/$name" "${pair#*:}"
  xz -T0 -6 ".devcarry/$name"
done
git rev-parse HEAD > .devcarry/commit
ls -la .devcarry
