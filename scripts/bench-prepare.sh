#!/usr/bin/env bash
# Side by side, in one run: `moelab prepare` against Hugging Face tokenizers' Python batch
# encoding (benches/tokenize_peer.py) on the same generated JSONL corpus, tokenizer and thread
# count, with wall time and peak RSS of each; then the peak RSS of preparing one long document.
#
#   cargo build --release -p moelab-cli
#   PY=.venv-hf/bin/python scripts/bench-prepare.sh        # PY: a Python with tokenizers + numpy
#
# Env: WORK (scratch folder, deleted at the end), SIDE_BYTES (corpus both sides encode, default
# 256M), BYTES (the large corpus moelab prepares for its peak RSS, default 2G), THREADS (default
# 2), DOC (the long document, default 50M). Needs /usr/bin/time (GNU time).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/moelab-bench-prepare}
PY=${PY:-python3}
MOELAB=${MOELAB:-target/release/moelab}
THREADS=${THREADS:-2}
BYTES=${BYTES:-2G}
SIDE_BYTES=${SIDE_BYTES:-256M}
DOC=${DOC:-50M}
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

measure() { # NAME COMMAND... : runs it under GNU time, prints wall, user+sys and peak RSS
  local name=$1
  shift
  /usr/bin/time -v "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
    tail -20 "$WORK/$name.err"
    exit 1
  }
  python3 - "$name" "$WORK/$name.err" <<'EOF'
import re, sys
name, path = sys.argv[1], sys.argv[2]
text = open(path).read()
def field(label):
    return re.search(re.escape(label) + r":\s*(.+)", text).group(1).strip()
wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
parts = [float(p) for p in wall.split(":")]
seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
rss = int(field("Maximum resident set size (kbytes)")) / 1024
print(f"{name}: wall {seconds:.1f} s, cpu {cpu:.1f} s, peak RSS {rss:.0f} MiB")
EOF
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 benches/gen_corpus.py "$WORK/corpus" --bytes "$SIDE_BYTES" --files 16
du -sb "$WORK/corpus" | awk '{printf "side-by-side corpus: %.2f GB of JSONL\n", $1 / 1e9}'
# The tokenizer both sides use: a byte-level BPE trained on the bundled sample.
"$MOELAB" prepare data/sample --out "$WORK/tok" --train-tokenizer 16384 >/dev/null 2>&1
TOK="$WORK/tok/tokenizer.json"
"$PY" -c "import tokenizers, sys; t = tokenizers.Tokenizer.from_file(sys.argv[1]); print('tokenizer: byte-level BPE,', t.get_vocab_size(True), 'ids; HF tokenizers', tokenizers.__version__)" "$TOK"

measure "moelab prepare ($THREADS threads)" "$MOELAB" prepare "$WORK/corpus" --out "$WORK/m" \
  --tokenizer "$TOK" --threads "$THREADS"
grep -m1 "documents kept" "$WORK/moelab prepare ($THREADS threads).err" || true
tail -1 "$WORK/moelab prepare ($THREADS threads).out"
rm -rf "$WORK/m"
RAYON_RS_NUM_THREADS=$THREADS measure "HF encode_batch ($THREADS threads)" \
  "$PY" benches/tokenize_peer.py "$WORK/corpus" "$TOK" "$WORK/p"
cat "$WORK/HF encode_batch ($THREADS threads).out"
rm -rf "$WORK/p"
RAYON_RS_NUM_THREADS=$THREADS measure "HF encode_batch_fast ($THREADS threads)" \
  "$PY" benches/tokenize_peer.py "$WORK/corpus" "$TOK" "$WORK/p" --fast
cat "$WORK/HF encode_batch_fast ($THREADS threads).out"
rm -rf "$WORK/p" "$WORK/corpus"

python3 benches/gen_corpus.py "$WORK/big" --bytes "$BYTES" --files 32 --seed 1
du -sb "$WORK/big" | awk '{printf "large corpus: %.2f GB of JSONL\n", $1 / 1e9}'
measure "moelab prepare, large corpus ($THREADS threads)" "$MOELAB" prepare "$WORK/big" \
  --out "$WORK/big-out" --tokenizer "$TOK" --threads "$THREADS"
grep -m1 "documents kept" "$WORK/moelab prepare, large corpus ($THREADS threads).err" || true
tail -1 "$WORK/moelab prepare, large corpus ($THREADS threads).out"
du -sb "$WORK/big-out" | awk '{printf "dataset: %.2f GB\n", $1 / 1e9}'
rm -rf "$WORK/big" "$WORK/big-out"

python3 benches/gen_corpus.py "$WORK/one" --one-document "$DOC"
du -sb "$WORK/one/books/one.txt" | awk '{printf "one document: %.1f MB\n", $1 / 1e6}'
measure "moelab prepare, one document, given tokenizer" "$MOELAB" prepare "$WORK/one" \
  --out "$WORK/one-given" --tokenizer "$TOK" --threads "$THREADS"
measure "moelab prepare, one document, training a BPE" "$MOELAB" prepare "$WORK/one" \
  --out "$WORK/one-trained" --train-tokenizer 16384 --threads "$THREADS"
