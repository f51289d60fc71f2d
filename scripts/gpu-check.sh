#!/usr/bin/env bash
# Every GPU check in one go, for one call on the device machine (H200, CUDA 13.0 driver, torch,
# no Rust, no network). Build first on any machine: `bash scripts/build-gpu.sh` stages
# .devcarry/{moelab,cuda_ops}.xz; then run this with .devcarry carried (run tool: carry [".devcarry"]):
#
#   bash scripts/gpu-check.sh [ops] [train] [bench] [nccl]   # default: all four; logs under $OUT
#
# Expected wall time on the H200: ops ~1 min, train ~3 min, bench ~5 min (torch.compile is most of
# it); a device call is limited to 10 minutes, so split the stages over two calls if needed.
# Stages (each under its own timeout, so one hang cannot eat the device budget):
#   1. ops:   every CUDA op against its CPU reference on fresh random inputs, outputs poisoned
#             (tests/cuda_ops.rs: softmax, RMSNorm, RoPE, cross-entropy, grouped GEMM, swiglu,
#             MoE permute / un-permute, attention, sum of squares, fused AdamW, router top-k;
#             OPS_EXPECTED)
#   2. train: configs/gpu-smoke.toml, 30 steps on CUDA bf16 vs CPU f32, losses compared
#   3. bench: moelab bench on configs/gpu-b.toml, then the PyTorch peer (eager, torch.compile)
#   4. nccl:  configs/gpu-smoke.toml on CUDA through the NCCL collective at world size 1
#             (MOELAB_NCCL=1) against the plain CUDA run (libnccl from torch's nvidia-nccl wheel)
# The last lines printed are the summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# Unpack the binaries scripts/build-gpu.sh staged (xz; python3's lzma if xz is missing).
BIN_DIR=${TMPDIR:-/tmp}/moelab-gpu-bin
mkdir -p "$BIN_DIR"
for name in moelab cuda_ops; do
  if command -v xz > /dev/null; then xz -dc ".devcarry/$name.xz" > "$BIN_DIR/$name"
  else python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' ".devcarry/$name.xz" > "$BIN_DIR/$name"; fi
  chmod +x "$BIN_DIR/$name"
done
echo "binaries from commit $(cat .devcarry/commit 2>/dev/null || echo '?')"
BIN=$BIN_DIR/moelab
BENCH_CONFIG=${BENCH_CONFIG:-configs/gpu-b.toml}
SMOKE_CONFIG=${SMOKE_CONFIG:-configs/gpu-smoke.toml}
SMOKE_STEPS=${SMOKE_STEPS:-30}
PYTHON=${PYTHON:-python3}
# The binary links libnccl.so.2 (candle's nccl feature): torch's nvidia-nccl wheel provides it.
nccl_lib=$("$PYTHON" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib:+$nccl_lib:}$LD_LIBRARY_PATH
declare -a ROWS
STAGES=" ${*:-ops train bench nccl} "
want() { [[ $STAGES == *" $1 "* ]]; }

stage() { # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $((SECONDS - start)) s (log: $OUT/$name.log)"
  tail -5 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
echo "GPU: $(cat "$OUT/gpu.txt")"

# 1. ops
# Every kernel's rows must be in the log (a stale binary without a kernel's case fails here).
OPS_EXPECTED=(softmax_last_dim causal_softmax rms_norm rope cross_entropy grouped_matmul swiglu
  "moe permute [0-9]" "moe permute + unpermute" causal_attention flash_attention linear_cross_entropy
  sum_of_squares adamw_update router_topk "moe plan")
ops_missing() {
  local op
  for op in "${OPS_EXPECTED[@]}"; do grep -q "^$op" "$OUT/ops.log" || printf '%s, ' "$op"; done
}
if ! want ops; then :
elif stage ops 240 env MOELAB_POISON_OUTPUTS=1 "$BIN_DIR/cuda_ops" --test-threads 1 --nocapture \
    && ! grep -q '^skipped' "$OUT/ops.log" && [ -z "$(ops_missing)" ]; then
  ROWS+=("ops|PASS|$(grep -c ' ok$' "$OUT/ops.log") op/dtype/pass rows ok, $(grep -o 'seed [0-9]*' "$OUT/ops.log" | head -1)")
elif [ -f "$OUT/ops.log" ] && ! grep -q -E '^skipped|panicked|FAIL' "$OUT/ops.log" && [ -n "$(ops_missing)" ]; then
  ROWS+=("ops|FAIL|no rows for: $(ops_missing | cut -c1-70)")
else
  ROWS+=("ops|FAIL|$(grep -m1 -E 'skipped|panicked|FAIL|error' "$OUT/ops.log" | cut -c1-80)")
fi

# 2. train: CUDA bf16 vs CPU f32, same config, seed and data
if want train; then
common=(--set train.steps=$SMOKE_STEPS --set log.interval=5 --set train.eval_interval=0 --set checkpoint.interval=0)
stage train-cuda 240 $BIN train "$SMOKE_CONFIG" --run-dir "$OUT/smoke-cuda" "${common[@]}"
cuda_rc=$?
stage train-cpu 240 $BIN train "$SMOKE_CONFIG" --run-dir "$OUT/smoke-cpu" "${common[@]}" \
  --set run.device=cpu --set train.precision=f32 --set run.threads=16
cpu_rc=$?
if [ $cuda_rc -eq 0 ] && [ $cpu_rc -eq 0 ] && python3 scripts/compare_losses.py \
    "$OUT/smoke-cuda/metrics.jsonl" "$OUT/smoke-cpu/metrics.jsonl" --tolerance 0.02 > "$OUT/train-compare.log" 2>&1; then
  ROWS+=("train|PASS|$(tail -1 "$OUT/train-compare.log" | cut -c7-80)")
else
  ROWS+=("train|FAIL|cuda rc=$cuda_rc cpu rc=$cpu_rc; $(tail -1 "$OUT/train-compare.log" 2>/dev/null | cut -c1-60)")
fi
cat "$OUT/train-compare.log" 2>/dev/null | tail -8
fi

# 3. bench: moelab, then the peer in the same call
if want bench; then
stage bench-moelab 180 $BIN bench "$BENCH_CONFIG" --steps 20 --warmup 5 --json
stage bench-peer 300 "$PYTHON" scripts/peer_torch.py "$BENCH_CONFIG" --mode both --json
python3 - "$OUT" <<'PY' > "$OUT/bench-table.md"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = []
def objects(name):
    p = out / name
    if not p.exists():
        return []
    found = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found
for r in objects("bench-moelab.log"):
    rows.append(("moelab", r["tokens_per_s"], r["step_ms"], r.get("mfu"), (r.get("peak_memory_gb"), r.get("peak_reserved_gb")),
                 f'fwd {r["forward_ms"]:.1f} / bwd {r["backward_ms"]:.1f} / opt {r["optimizer_ms"]:.1f} ms; matmul {r["matmul_tflops"]:.0f} TFLOP/s'))
for r in objects("bench-peer.log"):
    rows.append((f'torch {r.get("mode")}', r.get("tokens_per_s"), r.get("step_ms_median"), r.get("mfu"),
                 (r.get("peak_mem_gb"), r.get("peak_reserved_gb")), f'fwd {r.get("fwd_ms", 0):.1f} / bwd {r.get("bwd_ms", 0):.1f} / opt {r.get("opt_ms", 0):.1f} ms'))
fmt = lambda v, f: "-" if v is None else format(v, f)
print("| who | tokens/s | step ms | MFU | peak GB allocated / reserved | split |")
print("| --- | ---: | ---: | ---: | ---: | --- |")
for who, tps, ms, mfu, mem, split in rows:
    mfu = "-" if mfu is None else f"{mfu * 100:.1f}%"
    mem = f"{fmt(mem[0], '.1f')} / {fmt(mem[1], '.1f')}"
    print(f"| {who} | {fmt(tps, ',.0f')} | {fmt(ms, '.1f')} | {mfu} | {mem} | {split} |")
PY
ROWS+=("bench|$( [ "$(grep -c '^| [mt]' "$OUT/bench-table.md")" = 3 ] && echo DONE || echo PART)|$(grep -c '^| [mt]' "$OUT/bench-table.md") of 3 rows (moelab, torch eager, torch compile)")
echo
echo "== bench ($BENCH_CONFIG) =="
cat "$OUT/bench-table.md"
fi
# 4. nccl: the same smoke run through NCCL (world size 1) against the plain CUDA run
if want nccl; then
common=(--set train.steps=$SMOKE_STEPS --set log.interval=5 --set train.eval_interval=0 --set checkpoint.interval=0)
[ -f "$OUT/smoke-cuda/metrics.jsonl" ] || stage train-cuda 240 $BIN train "$SMOKE_CONFIG" --run-dir "$OUT/smoke-cuda" "${common[@]}"
stage train-nccl 240 env MOELAB_NCCL=1 \
  $BIN train "$SMOKE_CONFIG" --run-dir "$OUT/smoke-nccl" "${common[@]}"
nccl_rc=$?
if [ $nccl_rc -eq 0 ] && python3 scripts/compare_losses.py \
    "$OUT/smoke-nccl/metrics.jsonl" "$OUT/smoke-cuda/metrics.jsonl" --tolerance 0.02 > "$OUT/nccl-compare.log" 2>&1; then
  ROWS+=("nccl|PASS|$(tail -1 "$OUT/nccl-compare.log" | cut -c7-80)")
else
  ROWS+=("nccl|FAIL|nccl rc=$nccl_rc; $(tail -1 "$OUT/nccl-compare.log" 2>/dev/null | cut -c1-60)")
fi
fi
echo
echo "== summary =="
printf '%-6s | %-4s | %s\n' check result detail
for row in "${ROWS[@]}"; do IFS='|' read -r a b c <<< "$row"; printf '%-6s | %-4s | %s\n' "$a" "$b" "$c"; done
