#!/usr/bin/env python3
"""Generates a large domain-tagged JSONL corpus for the prepare benchmarks from the bundled
sample's real text (data/sample): documents are runs of the sample's paragraphs drawn with a
seeded generator, so the word statistics are those of real web, code and math text.

    python3 benches/gen_corpus.py OUT --bytes 2G --files 16
    python3 benches/gen_corpus.py OUT --one-document 50M

The corpus is written under OUT/<domain>/part-NNNN.jsonl (or OUT/books/one.txt for
--one-document). Keep it out of the repository and delete it afterwards.
"""

import argparse
import gzip
import json
import os
import random
import sys

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "sample")


def size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def paragraphs_by_domain():
    """{domain: [paragraph]} from every JSONL file of the sample."""
    out = {}
    for domain in sorted(os.listdir(SAMPLE)):
        folder = os.path.join(SAMPLE, domain)
        if not os.path.isdir(folder):
            continue
        for root, _, files in os.walk(folder):
            for name in sorted(files):
                path = os.path.join(root, name)
                opener = gzip.open if name.endswith(".gz") else open
                with opener(path, "rt", encoding="utf-8") as f:
                    for line in f:
                        text = json.loads(line)["text"]
                        out.setdefault(domain, []).extend(
                            p for p in text.split("\n\n") if p.strip()
                        )
    return out


def document(rng, paragraphs, target):
    parts, n = [], 0
    while n < target:
        p = paragraphs[rng.randrange(len(paragraphs))]
        parts.append(p)
        n += len(p) + 2
    return "\n\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--bytes", type=size, default=size("2G"), help="total JSONL bytes")
    ap.add_argument("--files", type=int, default=16, help="JSONL files (spread over domains)")
    ap.add_argument("--one-document", type=size, help="write one text document of this size instead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    paragraphs = paragraphs_by_domain()
    if args.one_document:
        all_paragraphs = [p for ps in paragraphs.values() for p in ps]
        os.makedirs(os.path.join(args.out, "books"), exist_ok=True)
        with open(os.path.join(args.out, "books", "one.txt"), "w", encoding="utf-8") as f:
            f.write(document(rng, all_paragraphs, args.one_document))
        # A second domain, so the dataset has more than the one document.
        os.makedirs(os.path.join(args.out, "web"), exist_ok=True)
        with open(os.path.join(args.out, "web", "page.txt"), "w", encoding="utf-8") as f:
            f.write(document(rng, all_paragraphs, 20_000))
        return
    domains = sorted(paragraphs)
    per_file = args.bytes // args.files
    written = 0
    for i in range(args.files):
        domain = domains[i % len(domains)]
        folder = os.path.join(args.out, domain)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"part-{i:04d}.jsonl")
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            while n < per_file:
                # Document lengths from 200 B to about 30 KB, most of a few KB.
                target = int(min(30_000, 200 + rng.expovariate(1 / 4000)))
                line = json.dumps({"text": document(rng, paragraphs[domain], target)}) + "\n"
                f.write(line)
                n += len(line)
        written += n
    print(f"wrote {written / 1e9:.2f} GB in {args.files} files under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
