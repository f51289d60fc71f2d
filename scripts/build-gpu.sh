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
# The kernels' build script watches kernels/*.cu by absolute path, so a target folder last built
# from another checkout would keep embedding that checkout's kernels: make it re-run here.
touch crates/moelab-kernels/build.rs
# --workspace as in CI: a -p build unifies other features and would rebuild candle's CUDA kernels.
cargo build --release --features cuda --workspace --all-targets
tests=$(cargo test --release --features cuda --workspace --no-run \
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
