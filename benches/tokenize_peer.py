#!/usr/bin/env python3
"""The peer of `moelab prepare`'s tokenization: Hugging Face tokenizers' Python batch encoding
(`Tokenizer.encode_batch`, the path datatrove's tokenizer step and Megatron-style preprocessing
use) on the same JSONL files with the same tokenizer.json and thread count. Reads every
`*.jsonl` file under CORPUS in sorted order, encodes the `text` field in batches of about 8 MB,
appends the EOS id to each document and writes the ids as uint16/uint32 to OUT, one file per
input, streamed (memory stays about one batch).

    RAYON_RS_NUM_THREADS=2 python benches/tokenize_peer.py CORPUS tokenizer.json OUT [--fast]

Prints one JSON line: seconds, text bytes, documents, tokens, MB/s.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from tokenizers import Tokenizer


def files_under(root):
    out = []
    for folder, _, names in os.walk(root):
        out.extend(os.path.join(folder, n) for n in names if n.endswith(".jsonl"))
    return sorted(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("tokenizer")
    ap.add_argument("out")
    ap.add_argument("--fast", action="store_true", help="encode_batch_fast (no offsets)")
    args = ap.parse_args()
    start = time.perf_counter()
    tok = Tokenizer.from_file(args.tokenizer)
    eos = tok.token_to_id("<|endoftext|>")
    dtype = np.uint16 if tok.get_vocab_size(True) <= 65536 else np.uint32
    encode = tok.encode_batch_fast if args.fast else tok.encode_batch
    os.makedirs(args.out, exist_ok=True)
    text_bytes = documents = tokens = 0
    for i, path in enumerate(files_under(args.corpus)):
        with open(path, "rb") as f, open(os.path.join(args.out, f"{i:04d}.bin"), "wb") as out:
            batch, size = [], 0

            def flush():
                nonlocal tokens
                for enc in encode(batch, add_special_tokens=False):
                    ids = enc.ids
                    ids.append(eos)
                    tokens += len(ids)
                    out.write(np.asarray(ids, dtype=dtype).tobytes())

            for line in f:
                text = json.loads(line)["text"]
                batch.append(text)
                size += len(text)
                text_bytes += len(text.encode("utf-8"))
                documents += 1
                if size >= 8 << 20:
                    flush()
                    batch, size = [], 0
            if batch:
                flush()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": round(seconds, 2),
        "text_bytes": text_bytes,
        "documents": documents,
        "tokens": tokens,
        "mb_per_s": round(text_bytes / 1e6 / seconds, 2),
        "threads": os.environ.get("RAYON_RS_NUM_THREADS", "all"),
        "method": "encode_batch_fast" if args.fast else "encode_batch",
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
