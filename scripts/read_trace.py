#!/usr/bin/env python3
"""Read a moelab trace directory with only `safetensors` + `numpy`, and check it is consistent.

Usage: python3 scripts/read_trace.py TRACE_DIR

Prints the metadata, every tensor's shape, and per MoE layer the domain x expert count matrix
rebuilt from `expert_ids`; checks it (and the token counts and gate sums) against
`counts.safetensors` and the shapes against `index.json`. Exits 1 on any mismatch.
"""
import json
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def fail(msg):
    print(f"MISMATCH: {msg}", file=sys.stderr)
    return 1


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    trace_dir = argv[1]
    trace_path = os.path.join(trace_dir, "trace.safetensors")
    counts_path = os.path.join(trace_dir, "counts.safetensors")
    with open(os.path.join(trace_dir, "index.json")) as f:
        index = json.load(f)
    with safe_open(trace_path, framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(trace_path)
    counts_file = load_file(counts_path)
    with safe_open(counts_path, framework="numpy") as f:
        counts_meta = f.metadata()

    errors = 0
    if meta.get("format") != "moelab-trace-v1":
        errors += fail(f"{trace_path}: format is {meta.get('format')!r}")
    layers = json.loads(meta["layers"])
    domains = json.loads(meta["domains"])
    n_experts = int(meta["n_experts"])
    top_k = int(meta["top_k"])
    print(f"trace {trace_dir}: checkpoint {meta['checkpoint']!r} step {meta['step']}")
    print(f"  MoE layers {layers}, domains {domains}, experts {n_experts}, top_k {top_k}")

    for doc in index["tensors"]:
        name = doc["name"]
        if name not in tensors:
            errors += fail(f"index.json lists {name} but trace.safetensors lacks it")
            continue
        arr = tensors[name]
        print(f"  {name:14s} {str(arr.dtype):8s} {tuple(arr.shape)}  {doc['meaning']}")
        if list(arr.shape) != doc["shape"]:
            errors += fail(f"{name}: shape {arr.shape} but index.json says {doc['shape']}")

    expert_ids = tensors["expert_ids"].astype(np.int64)  # (L, N, k)
    gates = tensors["gate_weights"].astype(np.float64)
    domain_ids = tensors["domain_ids"].astype(np.int64)  # (N,)
    n_layers, n_tokens, k = expert_ids.shape
    if (n_layers, k) != (len(layers), top_k):
        errors += fail(f"expert_ids shape {expert_ids.shape} vs {len(layers)} layers, top_k {top_k}")

    tokens = np.bincount(domain_ids, minlength=len(domains))
    rebuilt = np.zeros((n_layers, len(domains), n_experts), dtype=np.int64)
    gate_sums = np.zeros_like(rebuilt, dtype=np.float64)
    dom = np.repeat(domain_ids[:, None], k, axis=1)  # (N, k) domain of each slot
    for l in range(n_layers):
        np.add.at(rebuilt[l], (dom, expert_ids[l]), 1)
        np.add.at(gate_sums[l], (dom, expert_ids[l]), gates[l])
        print(f"\n  layer {layers[l]} (MoE layer {l}): tokens routed, domain x expert")
        print("    " + " " * 12 + "".join(f"{e:>8d}" for e in range(n_experts)))
        for d, name in enumerate(domains):
            print(f"    {name:12.12s}" + "".join(f"{c:>8d}" for c in rebuilt[l, d]))

    if counts_meta.get("format") != "moelab-router-log-v1":
        errors += fail(f"{counts_path}: format is {counts_meta.get('format')!r}")
    if not np.array_equal(counts_file["counts"], rebuilt):
        errors += fail("counts.safetensors `counts` differ from counts rebuilt from expert_ids")
    if not np.array_equal(counts_file["tokens"], tokens):
        errors += fail(f"counts.safetensors `tokens` {counts_file['tokens']} vs {tokens}")
    if not np.allclose(counts_file["gate_sums"], gate_sums, rtol=1e-9, atol=1e-9):
        errors += fail("counts.safetensors `gate_sums` differ from sums of gate_weights")
    if not np.array_equal(rebuilt.sum(axis=2), np.broadcast_to(tokens * k, rebuilt.shape[:2])):
        errors += fail("some token does not have exactly top_k assignments")

    if errors:
        print(f"\n{errors} mismatch(es)", file=sys.stderr)
        return 1
    print("\nOK: counts.safetensors matches expert_ids; shapes match index.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (OSError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
