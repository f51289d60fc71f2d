#!/usr/bin/env python3
"""Compares the training losses of two runs' metrics.jsonl step by step.

Used by scripts/gpu-check.sh: a CUDA bf16 run against a CPU f32 run of the same config, seed and
data. Both start from the same seeded weights and read the same batches, so their losses agree
up to bf16 rounding, which compounds slowly with steps. Exit 1 when a step differs by more than
--tolerance (relative), or when the runs logged different steps.

    python3 scripts/compare_losses.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl --tolerance 0.02
"""
import argparse
import json
import sys


def losses(path):
    out = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{number}: not JSON ({e})")
            if "loss" in row and not row.get("skipped"):
                out[row["step"]] = row["loss"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    a, b = losses(args.a), losses(args.b)
    if not a or sorted(a) != sorted(b):
        print(f"FAIL: logged steps differ: {sorted(a)} vs {sorted(b)}")
        return 1
    worst = 0.0
    print(f"{'step':>6} {'loss A':>10} {'loss B':>10} {'rel diff':>9}")
    for step in sorted(a):
        rel = abs(a[step] - b[step]) / max(abs(b[step]), 1e-12)
        worst = max(worst, rel)
        print(f"{step:>6} {a[step]:>10.5f} {b[step]:>10.5f} {rel:>9.2e}")
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"{verdict}: max relative loss difference {worst:.2e} (tolerance {args.tolerance})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
