#!/usr/bin/env python3
"""Per-op breakdown of `moelab bench` from a single-threaded `perf record --call-graph dwarf`.

    RAYON_NUM_THREADS=1 perf record -F 1000 -e cpu-clock --call-graph dwarf,65528 -o perf.data \
        target/release/moelab bench configs/tiny.toml --steps 30 --warmup 2
    perf script -i perf.data -F ip,sym | python3 scripts/profile_ops.py

With one thread, candle's own ops and GEMMs run on the main thread, whose samples carry the whole
stack from the step down: each is charged to the phase (forward, backward, optimizer) and to the
first op below it (a moelab model function in the forward, the candle op or custom-op backward
that backprop called in the backward). Work our kernels hand to rayon runs on its one worker
thread, whose stacks end at the pool: those samples are charged to "pool" and the innermost
moelab kernel (or gemm) on their stack.
"""
import collections
import re
import sys

PHASES = [
    ("optimizer", re.compile(r"moelab_train::optim::")),
    ("backward", re.compile(r"candle_core::backprop::.*backward")),
    ("forward", re.compile(r"MoeTransformer::forward|Learner::forward|loss")),
]
STEP = re.compile(r"Learner::step")
POOL = re.compile(r"rayon_core::registry::WorkerThread")
KERNEL = re.compile(r"moelab_kernels::[a-z_]+::[A-Za-z_]+|gemm_common::gemm|__expf")
OP = re.compile(
    r"(moelab_kernels::[a-z_]+::[A-Za-z_]+|moelab_model::[a-z_]+::[A-Za-z_]+::[a-z_]+|"
    r"candle_core::tensor::Tensor::[a-z_0-9]+|candle_core::[a-z_]+::[A-Za-z_]+::[a-z_0-9]+|"
    r"moelab_train::[a-z_:]+::[A-Za-z_]+::[a-z_]+)"
)


def samples(lines):
    stack = []
    for line in lines:
        line = line.rstrip()
        if not line:
            if stack:
                yield stack
            stack = []
            continue
        parts = line.split(None, 1)
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]+", parts[0]):
            stack.append(parts[1])
    if stack:
        yield stack


def main():
    by_op = collections.Counter()
    by_phase = collections.Counter()
    total = 0
    for stack in samples(sys.stdin):
        frames = list(reversed(stack))  # root first
        in_step = any(STEP.search(f) for f in frames)
        if not in_step and any(POOL.search(f) for f in frames):
            kernels = [m.group(0) for f in frames if (m := KERNEL.search(f))]
            if kernels:
                total += 1
                by_phase["pool"] += 1
                by_op[("pool", kernels[0])] += 1
            continue
        if not any(STEP.search(f) for f in frames):
            continue
        total += 1
        phase, start = "other", 0
        for i, f in enumerate(frames):
            for name, pat in PHASES:
                if pat.search(f):
                    phase, start = name, i
                    break
            else:
                continue
            break
        by_phase[phase] += 1
        op = "(self)"
        # the innermost named op below the phase frame
        named = [m.group(1) for f in frames[start + 1:] if (m := OP.search(f))]
        skip = ("Tensor::backward", "backprop", "custom_op::", "storage::Storage", "Tensor::apply_op")
        named = [n for n in named if not any(s in n for s in skip)]
        if named:
            op = named[0] if phase == "backward" else (named[-1] if not named[-1].startswith("candle") else named[-1])
            if phase == "forward":
                model = [n for n in named if n.startswith("moelab_model")]
                leaf = named[-1]
                op = (model[-1] + " > " if model else "") + leaf.split("::")[-1]
        by_op[(phase, op)] += 1
    print(f"{total} samples in the step and in the pool's kernels")
    for phase, n in by_phase.most_common():
        print(f"{phase:10} {100 * n / total:5.1f}%")
    print()
    for (phase, op), n in by_op.most_common(45):
        if 100 * n / total >= 0.3:
            print(f"{100 * n / total:5.1f}%  {phase:9} {op}")


if __name__ == "__main__":
    main()
