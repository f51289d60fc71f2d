#!/usr/bin/env python3
"""Rebuilds the bundled sample corpus in data/sample/ (see PROVENANCE.md).

Deterministic: the same machine sources give the same files. Real text comes from
  web/          the King James Bible (public domain), via Debian's `bible` command (bible-kjv)
  code/python/  CPython 3.11 standard-library modules that run as programs (PSF-2.0)
  code/rust/    `examples/*.rs` programs of MIT/Apache-2.0 crates in the local cargo registry
  code_text/    CPython 3.11 `pydoc_data.topics`: the language reference, prose with code (PSF-2.0)
and the math is generated here (seeded), because no real worked-math corpus is on the machine:
  math/structured/  problems with explicit, numbered derivation steps and a check
  math/plain/       the same problem families, statement and final answer only
  math_text/        word problems with worked solutions in prose

Usage: python3 data/sample/build_sample.py   (from the repository root; needs python3.11 and
`bible` for web/, `apt-get install bible-kjv`)
"""
import glob
import gzip
import json
import os
import random
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = "/root/.pyenv/versions/3.11.7/lib/python3.11"


def write_jsonl(rel, docs, gz=False):
    path = os.path.join(ROOT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    if gz:
        # mtime=0 keeps the archive byte-identical across rebuilds.
        with open(path, "wb") as f:
            with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
                g.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return len(data)


def take(items, budget):
    out, total = [], 0
    for it in items:
        if total + len(it) > budget:
            break
        out.append(it)
        total += len(it)
    return out


def web():
    books = ["Genesis", "Ruth", "Esther", "Jonah", "Luke", "Acts"]
    chapters = {"Genesis": 50, "Ruth": 4, "Esther": 10, "Jonah": 4, "Luke": 24, "Acts": 28}
    docs = []
    for book in books:
        for ch in range(1, chapters[book] + 1):
            out = subprocess.run(["bible", "-f", f"{book} {ch}:1-{ch}:200"], capture_output=True, text=True).stdout
            verses = [re.sub(r"^\S+\d+:\d+\s+", "", l).strip() for l in out.splitlines() if l.strip()]
            docs.append(f"{book}, chapter {ch}.\n\n" + " ".join(verses))
    return take(docs, 450_000)


def code_python():
    docs = []
    for path in sorted(glob.glob(f"{PY}/*.py")):
        text = open(path, encoding="utf-8").read()
        if "__main__" in text and 2_000 <= len(text) <= 40_000:
            docs.append(text)
    return take(docs, 300_000)


def code_rust():
    docs, crates = [], []
    for path in sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/*/examples/*.rs"))):
        crate_dir = path.split("/examples/")[0]
        try:
            manifest = open(os.path.join(crate_dir, "Cargo.toml"), encoding="utf-8").read()
        except OSError:
            continue
        m = re.search(r'^license\s*=\s*"([^"]+)"', manifest, re.M)
        text = open(path, encoding="utf-8", errors="replace").read()
        if not m or not ("MIT" in m.group(1) or "Apache-2.0" in m.group(1)):
            continue
        if "fn main" not in text or not (500 <= len(text) <= 15_000):
            continue
        docs.append(text)
        crates.append((os.path.basename(crate_dir), m.group(1), os.path.basename(path)))
    docs = take(docs, 200_000)
    return docs, crates[: len(docs)]


def code_text():
    sys.path.insert(0, PY)
    from pydoc_data.topics import topics  # noqa: E402

    docs = [f"{name}\n\n{topics[name]}" for name in sorted(topics)]
    return take(docs, 500_000)


# ---- generated math -------------------------------------------------------------------------

def linear(r):
    a, x, b = r.randint(2, 19), r.randint(-30, 30), r.randint(-99, 99)
    c = a * x + b
    q = f"Solve {a}x {'+' if b >= 0 else '-'} {abs(b)} = {c} for x."
    steps = [
        f"Step 1: {'Subtract' if b >= 0 else 'Add'} {abs(b)} {'from' if b >= 0 else 'to'} both sides: {a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}.",
        f"Step 2: Divide both sides by {a}: x = {c - b} / {a} = {x}.",
        f"Check: {a} * {x} {'+' if b >= 0 else '-'} {abs(b)} = {c}.",
    ]
    return q, steps, f"x = {x}"


def multiply(r):
    a, b = r.randint(12, 999), r.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    q = f"Compute {a} * {b}."
    steps = [
        f"Step 1: Split {b} = {tens} + {ones}.",
        f"Step 2: {a} * {tens} = {a * tens}.",
        f"Step 3: {a} * {ones} = {a * ones}.",
        f"Step 4: Add the partial products: {a * tens} + {a * ones} = {a * b}.",
    ]
    return q, steps, f"{a * b}"


def gcd(r):
    g = r.randint(2, 30)
    a, b = g * r.randint(5, 60), g * r.randint(2, 40)
    if a < b:
        a, b = b, a
    q = f"Find gcd({a}, {b}) with the Euclidean algorithm."
    steps, x, y, k = [], a, b, 1
    while y:
        steps.append(f"Step {k}: {x} = {x // y} * {y} + {x % y}.")
        x, y, k = y, x % y, k + 1
    steps.append(f"Step {k}: The last non-zero remainder is {x}.")
    return q, steps, f"gcd({a}, {b}) = {x}"


def fractions(r):
    from fractions import Fraction
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
    import math
    l = b * d // math.gcd(b, d)
    s = Fraction(a, b) + Fraction(c, d)
    q = f"Compute {a}/{b} + {c}/{d}."
    steps = [
        f"Step 1: The least common denominator of {b} and {d} is {l}.",
        f"Step 2: {a}/{b} = {a * (l // b)}/{l} and {c}/{d} = {c * (l // d)}/{l}.",
        f"Step 3: Add the numerators: {a * (l // b)} + {c * (l // d)} = {a * (l // b) + c * (l // d)}, giving {a * (l // b) + c * (l // d)}/{l}.",
        f"Step 4: Reduce: {a * (l // b) + c * (l // d)}/{l} = {s.numerator}/{s.denominator}.",
    ]
    return q, steps, f"{s.numerator}/{s.denominator}"


def quadratic(r):
    p, q_ = r.randint(-12, 12), r.randint(-12, 12)
    b, c = -(p + q_), p * q_
    poly = f"x^2 {'+' if b >= 0 else '-'} {abs(b)}x {'+' if c >= 0 else '-'} {abs(c)}"
    q = f"Solve {poly} = 0."
    steps = [
        f"Step 1: Look for two numbers with product {c} and sum {-b}: they are {p} and {q_}.",
        f"Step 2: Factor: (x {'-' if p >= 0 else '+'} {abs(p)})(x {'-' if q_ >= 0 else '+'} {abs(q_)}) = 0.",
        f"Step 3: Set each factor to zero: x = {p} or x = {q_}.",
    ]
    roots = sorted({p, q_})
    return q, steps, "x = " + " or x = ".join(map(str, roots))


def series(r):
    a, d, n = r.randint(1, 20), r.randint(1, 9), r.randint(5, 40)
    last = a + (n - 1) * d
    q = f"Find the sum of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ..., {last}."
    steps = [
        f"Step 1: The common difference is {d}, so the number of terms is ({last} - {a}) / {d} + 1 = {n}.",
        f"Step 2: The sum is n(first + last)/2 = {n} * ({a} + {last}) / 2 = {n * (a + last) // 2}.",
    ]
    return q, steps, f"{n * (a + last) // 2}"


def derivative(r):
    terms = [(r.randint(-9, 9), e) for e in sorted(r.sample(range(0, 7), 3), reverse=True)]
    terms = [(c, e) for c, e in terms if c != 0] or [(1, 2)]

    def fmt(ts):
        parts = []
        for c, e in ts:
            parts.append(f"{c}" if e == 0 else f"{c}x" if e == 1 else f"{c}x^{e}")
        return " + ".join(parts).replace("+ -", "- ") or "0"

    d = [(c * e, e - 1) for c, e in terms if e > 0]
    q = f"Differentiate f(x) = {fmt(terms)}."
    steps = [f"Step {i + 1}: d/dx {fmt([(c, e)])} = {fmt([(c * e, e - 1)]) if e else '0'}." for i, (c, e) in enumerate(terms)]
    steps.append(f"Step {len(terms) + 1}: Add the terms.")
    return q, steps, f"f'(x) = {fmt(d)}"


FAMILIES = [linear, multiply, gcd, fractions, quadratic, series, derivative]


def math_docs(seed, structured, budget, per_doc=4):
    r = random.Random(seed)
    docs, total = [], 0
    while total < budget:
        parts = []
        for _ in range(per_doc):
            q, steps, ans = r.choice(FAMILIES)(r)
            if structured:
                parts.append("Problem: " + q + "\n" + "\n".join(steps) + f"\nAnswer: {ans}")
            else:
                parts.append(f"{q}\n{ans}")
        doc = "\n\n".join(parts)
        docs.append(doc)
        total += len(doc)
    return docs


NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo", "Nia", "Omar", "Priya"]
THINGS = [("baker", "loaves", "bakes"), ("farmer", "apples", "picks"), ("printer", "pages", "prints"),
          ("potter", "bowls", "shapes"), ("beekeeper", "jars of honey", "fills"), ("gardener", "seedlings", "plants")]


def word_problem(r):
    name = r.choice(NAMES)
    kind = r.randrange(5)
    if kind == 0:
        job, things, verb = r.choice(THINGS)
        per, hours, sold = r.randint(6, 40), r.randint(3, 9), 0
        made = per * hours
        sold = r.randint(1, made - 1)
        q = f"{name} is a {job} who {verb} {per} {things} every hour for {hours} hours, then gives away {sold} of them. How many {things} are left?"
        a = (f"In {hours} hours {name} {verb} {per} x {hours} = {made} {things}. Giving away {sold} leaves "
             f"{made} - {sold} = {made - sold}. So {made - sold} {things} are left.")
    elif kind == 1:
        speed, t1, t2 = r.randint(30, 90), r.randint(1, 5), r.randint(1, 5)
        q = f"{name} drives at {speed} km/h for {t1} hours, rests, and then drives {t2} more hours at the same speed. How far does {name} travel?"
        a = (f"Distance is speed times time. The total driving time is {t1} + {t2} = {t1 + t2} hours, so the distance is "
             f"{speed} x {t1 + t2} = {speed * (t1 + t2)} km. The answer is {speed * (t1 + t2)} km.")
    elif kind == 2:
        price, pct = r.randint(20, 400), r.choice([10, 15, 20, 25, 30, 40, 50])
        off = price * pct / 100
        q = f"A coat costs {price} euros. In a sale the price drops by {pct}%. What does {name} pay?"
        a = (f"The discount is {pct}% of {price}, that is {price} x {pct} / 100 = {off:g} euros. "
             f"{name} pays {price} - {off:g} = {price - off:g} euros.")
    elif kind == 3:
        w, l = r.randint(3, 30), r.randint(3, 30)
        q = f"{name} fences a rectangular garden {w} m wide and {l} m long. How much fence is needed, and what is the garden's area?"
        a = (f"The perimeter of a rectangle is twice the sum of its sides: 2 x ({w} + {l}) = {2 * (w + l)} m of fence. "
             f"The area is width times length: {w} x {l} = {w * l} square metres.")
    else:
        a_, b_ = r.randint(2, 12), r.randint(2, 12)
        total = r.randint(3, 20) * (a_ + b_)
        share = total // (a_ + b_)
        q = f"{name} and a friend split {total} marbles in the ratio {a_}:{b_}. How many does each get?"
        a = (f"The ratio has {a_} + {b_} = {a_ + b_} parts, so one part is {total} / {a_ + b_} = {share} marbles. "
             f"{name} gets {a_} x {share} = {a_ * share} and the friend gets {b_} x {share} = {b_ * share}; "
             f"check: {a_ * share} + {b_ * share} = {total}.")
    return f"Question: {q}\nSolution: {a}"


def math_text_docs(seed, budget, per_doc=3):
    r = random.Random(seed)
    docs, total = [], 0
    while total < budget:
        doc = "\n\n".join(word_problem(r) for _ in range(per_doc))
        docs.append(doc)
        total += len(doc)
    return docs


def main():
    sizes = {}
    sizes["web/kjv.jsonl.gz"] = write_jsonl("web/kjv.jsonl.gz", web(), gz=True)
    sizes["code/python/stdlib_programs.jsonl"] = write_jsonl("code/python/stdlib_programs.jsonl", code_python())
    rust_docs, crates = code_rust()
    sizes["code/rust/crate_examples.jsonl"] = write_jsonl("code/rust/crate_examples.jsonl", rust_docs)
    sizes["code_text/python_reference.jsonl"] = write_jsonl("code_text/python_reference.jsonl", code_text())
    sizes["math/structured/derivations.jsonl"] = write_jsonl("math/structured/derivations.jsonl", math_docs(1, True, 250_000))
    sizes["math/plain/answers.jsonl"] = write_jsonl("math/plain/answers.jsonl", math_docs(2, False, 120_000, per_doc=8))
    sizes["math_text/word_problems.jsonl"] = write_jsonl("math_text/word_problems.jsonl", math_text_docs(3, 350_000))
    with open(os.path.join(ROOT, "rust_crates.tsv"), "w") as f:
        f.write("crate\tlicense\texample\n")
        for c in crates:
            f.write("\t".join(c) + "\n")
    for k, v in sizes.items():
        print(f"{k}\t{v} bytes (uncompressed)")


if __name__ == "__main__":
    main()
