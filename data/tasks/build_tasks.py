#!/usr/bin/env python3
"""Rebuilds the bundled evaluation tasks in data/tasks/ (see README.md there).

Generated like the sample corpus (seeded, deterministic) but with their own seeds, names and
templates, and checked to be held out: no prompt occurs in any file of data/sample/.

  arith.jsonl           worked arithmetic word problems, short numeric answers (GSM8K-style)
  program_output.jsonl  small generated Python programs, predict the printed output (CruxEval-style)
  code_nl.jsonl         questions about Python code in prose, multiple choice (code-NL)

Usage: python3 data/tasks/build_tasks.py   (from the repository root)
"""
import glob
import gzip
import json
import os
import random

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(ROOT, "..", "sample")
N = 48

# Names and objects not used by data/sample/build_sample.py.
NAMES = ["Aiko", "Bruno", "Carmen", "Dmitri", "Esi", "Felix", "Greta", "Hamid", "Ines", "Jonas", "Kamala", "Luca"]
ITEMS = [("crates", "oranges"), ("boxes", "pencils"), ("bags", "marbles"), ("packs", "cards"), ("trays", "cups")]


def arith(r):
    name = r.choice(NAMES)
    kind = r.randrange(4)
    if kind == 0:
        box, thing = r.choice(ITEMS)
        n, per, extra = r.randint(2, 9), r.randint(3, 12), r.randint(1, 20)
        q = f"{name} has {n} {box} with {per} {thing} in each and finds {extra} more {thing}. How many {thing} does {name} have?"
        a = n * per + extra
    elif kind == 1:
        start, spent, earned = r.randint(50, 200), r.randint(5, 49), r.randint(5, 60)
        q = f"{name} starts the week with {start} dollars, spends {spent} dollars on books and earns {earned} dollars. How many dollars does {name} have now?"
        a = start - spent + earned
    elif kind == 2:
        rows, cols, missing = r.randint(3, 12), r.randint(3, 12), r.randint(1, 5)
        q = f"A hall has {rows} rows of {cols} chairs, and {missing} chairs are broken. How many chairs can be used?"
        a = rows * cols - missing
    else:
        groups, per = r.randint(2, 9), r.randint(2, 15)
        stickers = groups * per + r.randint(0, groups - 1)
        q = f"{name} has {stickers} stickers and gives {per} to each of {groups} friends. How many stickers are left?"
        a = stickers - groups * per
    return {"prompt": f"Question: {q}\nAnswer:", "answer": f" {a}"}


def program(r):
    kind = r.randrange(4)
    v = r.choice("xyzabn")
    if kind == 0:
        a, b = r.randint(2, 20), r.randint(2, 20)
        code = f"{v} = {a}\n{v} = {v} * {b} - {a}\nprint({v})"
        out = a * b - a
    elif kind == 1:
        n = r.randint(3, 8)
        code = f"total = 0\nfor i in range({n}):\n    total += i\nprint(total)"
        out = sum(range(n))
    elif kind == 2:
        xs = [r.randint(1, 30) for _ in range(r.randint(3, 6))]
        code = f"values = {xs}\nprint(max(values) - min(values))"
        out = max(xs) - min(xs)
    else:
        word = r.choice(["moelab", "router", "expert", "tensor", "shard", "budget"])
        k = r.randint(1, len(word) - 1)
        code = f"word = \"{word}\"\nprint(word[{k}:] + word[:{k}])"
        out = word[k:] + word[:k]
    return {"prompt": f"Program:\n{code}\nOutput:", "answer": f" {out}"}


FACTS = [
    ("Which keyword starts a function definition in Python?", "def", ["class", "lambda", "import"]),
    ("Which keyword starts a class definition in Python?", "class", ["def", "with", "try"]),
    ("Which built-in function returns the number of items in a list?", "len", ["sum", "max", "range"]),
    ("Which statement leaves a loop early?", "break", ["continue", "pass", "return"]),
    ("Which statement skips to the next iteration of a loop?", "continue", ["break", "pass", "yield"]),
    ("Which keyword handles an exception raised in a try block?", "except", ["finally", "raise", "else"]),
    ("Which built-in function turns a string of digits into an integer?", "int", ["str", "float", "len"]),
    ("Which method adds one item to the end of a list?", "append", ["extend", "insert", "pop"]),
    ("Which keyword imports a module?", "import", ["from", "as", "def"]),
    ("Which value does a function return when it has no return statement?", "None", ["0", "False", "an empty string"]),
    ("Which operator gives the remainder of an integer division?", "%", ["//", "/", "**"]),
    ("Which operator raises a number to a power?", "**", ["*", "^", "//"]),
    ("Which built-in function prints text to the screen?", "print", ["input", "open", "format"]),
    ("Which keyword creates an anonymous function?", "lambda", ["def", "yield", "async"]),
    ("Which built-in type holds key-value pairs?", "dict", ["list", "tuple", "set"]),
    ("Which built-in function reads a line typed by the user?", "input", ["print", "open", "read"]),
]


def code_nl(r, i):
    q, right, wrong = FACTS[i % len(FACTS)]
    choices = [right] + list(wrong)
    r.shuffle(choices)
    style = i // len(FACTS)
    lead = ["Question", "Q", "Python question"][style % 3]
    return {"prompt": f"{lead}: {q}\nAnswer:", "choices": [f" {c}" for c in choices], "label": choices.index(right)}


def corpus_text():
    text = []
    for path in glob.glob(os.path.join(SAMPLE, "**", "*.jsonl*"), recursive=True):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text.extend(json.loads(line)["text"] for line in f if line.strip())
    return "\n".join(text)


def main():
    corpus = corpus_text()
    tasks = {
        "arith.jsonl": [arith(random.Random(1000 + i)) for i in range(N)],
        "program_output.jsonl": [program(random.Random(2000 + i)) for i in range(N)],
        "code_nl.jsonl": [code_nl(random.Random(3000 + i), i) for i in range(N)],
    }
    for name, examples in tasks.items():
        for e in examples:
            question = e["prompt"].split("\n", 1)[0 if not e["prompt"].startswith("Program") else 1]
            if question.split(": ", 1)[-1] in corpus:
                raise SystemExit(f"{name}: an example occurs in data/sample (not held out): {question!r}")
        with open(os.path.join(ROOT, name), "w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        print(f"{name}\t{len(examples)} examples")


if __name__ == "__main__":
    main()
