#!/usr/bin/env python3
"""Peer for the batch-assembly benchmark: numpy.memmap over the same shards.

Assembles batches of n random seq_len+1 windows of one source's training shard into
uint32 (inputs, targets) arrays, as a typical numpy data loader (nanoGPT style) does, and
prints tokens/s. It does no mixing at all, so it is a lower bound on the work moelab does.

Usage: python3 benches/numpy_peer.py PREPARED_DIR
"""
import json
import sys
import time

import numpy as np


def main():
    root = sys.argv[1]
    manifest = json.load(open(f"{root}/manifest.json"))
    dtype = np.uint16 if manifest["dtype"] == "u16" else np.uint32
    shard = next(
        s
        for d in manifest["domains"]
        for src in d["sources"]
        for s in src["shards"]
        if s["split"] == "train" and s["counts"]["tokens"] > 100_000
    )
    data = np.memmap(f"{root}/{shard['tokens_file']}", dtype=dtype, mode="r")
    rng = np.random.default_rng(0)
    for seq_len, n in [(256, 16), (1024, 8), (2048, 4)]:
        starts = rng.integers(0, len(data) - seq_len - 1, size=(20000, n))
        t0 = time.perf_counter()
        for row in starts:
            x = np.stack([data[s : s + seq_len] for s in row]).astype(np.uint32)
            y = np.stack([data[s + 1 : s + 1 + seq_len] for s in row]).astype(np.uint32)
        dt = time.perf_counter() - t0
        tokens = starts.shape[0] * n * seq_len
        print(f"numpy memmap {n}x{seq_len}: {tokens / dt / 1e6:.1f} M tokens/s ({dt / starts.shape[0] * 1e6:.1f} us/batch)")
        del x, y


if __name__ == "__main__":
    main()
