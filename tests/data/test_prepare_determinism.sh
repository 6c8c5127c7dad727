#!/usr/bin/env bash
# Data preparation is deterministic: re-running the text and tokenizer stages of
# `data/prepare.py --test` (downloads reused from data/cache) into a fresh directory gives
# byte-identical text, tokenizer and token files to the prepared test data, and the token
# files are well-formed (ids < vocab, attributes, EOS per document, val non-empty and
# disjoint from train).
#
# Env: BAM_SOURCE_DIR (repo root), BAM_TEST_DATA (a directory made by prepare.py --test).
set -uo pipefail

SRC="${BAM_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}"
REF="${BAM_TEST_DATA:-$SRC/data/prepared/test}"
PY=/usr/bin/python3
pass=0
fail=0
ok() { echo "PASS $*"; pass=$((pass + 1)); }
bad() { echo "FAIL $*"; fail=$((fail + 1)); }
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit $?; }

if [ ! -f "$REF/manifest.json" ]; then
  bad "no prepared test data at $REF (run: data/prepare.sh --test --out data/prepared/test)"
  finish
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/bam-prep-test.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Same arguments as the reference run, read from its manifest.
mapfile -t ARGS < <("$PY" - "$REF/manifest.json" <<'EOF'
import json, sys
a = json.load(open(sys.argv[1]))["args"]
print("--vocab=%d" % a["vocab"])
print("--max-mib-per-domain=%r" % a["max_mib_per_domain"])
print("--min-val-kib=%d" % a["min_val_kib"])
print("--tok-sample-mib=%r" % a["tok_sample_mib"])
print("--domains=%s" % ",".join(a["domains"]))
print("--sotu-domain=%s" % a["sotu_domain"])
EOF
)
echo "re-running prepare.py --test ${ARGS[*]} into $TMP/out"
if "$PY" "$SRC/data/prepare.py" --test "${ARGS[@]}" --cache "$SRC/data/cache" --out "$TMP/out" \
    > "$TMP/prepare.log" 2>&1; then
  ok "prepare.py --test ran ($(tail -1 "$TMP/prepare.log"))"
else
  tail -20 "$TMP/prepare.log"
  bad "prepare.py --test failed"
  finish
fi

# The downloads must be the very packages the reference was made from.
if "$PY" - "$REF/manifest.json" "$TMP/out/manifest.json" <<'EOF'
import json, sys
a, b = (json.load(open(p))["packages"] for p in sys.argv[1:3])
diff = sorted(k for k in set(a) | set(b) if a.get(k, {}).get("sha256") != b.get(k, {}).get("sha256"))
if diff:
    print("packages differ from the reference's: " + ", ".join(diff))
    sys.exit(1)
EOF
then ok "same package files as the reference"; else bad "package files differ"; fi

DOMAINS=$("$PY" -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["args"]["domains"]))' "$REF/manifest.json")
files="tokenizer/spm.vocab tokenizer/spm.model"
for d in $DOMAINS; do
  files="$files text/$d/train.jsonl text/$d/val.jsonl tokens/$d.h5"
done
for f in $files; do
  if [ ! -f "$REF/$f" ]; then bad "$f missing in $REF"
  elif cmp -s "$REF/$f" "$TMP/out/$f"; then ok "$f identical"
  else bad "$f differs between runs"; fi
done

# Well-formed token files (checked on the reference).
"$PY" - "$REF" $DOMAINS > "$TMP/checks.txt" 2>&1 <<'EOF'
import hashlib, json, sys
import h5py
import numpy as np
ref, domains = sys.argv[1], sys.argv[2:]
def report(cond, msg):
    print(("PASS " if cond else "FAIL ") + msg)
identity = hashlib.sha256(open(ref + "/tokenizer/spm.vocab", "rb").read()).hexdigest()[:16]
n_vocab = len(open(ref + "/tokenizer/spm.vocab", "rb").read().decode().split("\n")) - 1
for d in domains:
    keys = {}
    for split in ("train", "val"):
        docs = [json.loads(l) for l in open("%s/text/%s/%s.jsonl" % (ref, d, split), encoding="utf-8")]
        keys[split] = {x["key"] for x in docs}
        with h5py.File("%s/tokens/%s.h5" % (ref, d), "r") as f:
            attrs_ok = (f.attrs.get("domain") == d and f.attrs.get("tokenizer") == identity
                        and int(f.attrs.get("vocab_size", -1)) == n_vocab and int(f.attrs.get("eos_id", -1)) == 2)
            if split == "train":
                report(attrs_ok, "%s.h5 file attributes (domain, tokenizer %s, vocab_size %d, eos_id 2)"
                       % (d, identity, n_vocab))
            ds = f[split]
            t = ds[...]
            report(ds.dtype == np.uint16 and t.ndim == 1 and t.size > 0 and int(t.max()) < n_vocab,
                   "%s/%s: %d uint16 tokens, all < vocab_size" % (d, split, t.size))
            nd, tb = int(ds.attrs.get("n_docs", -1)), int(ds.attrs.get("text_bytes", -1))
            want_tb = sum(len(x["text"].encode("utf-8")) for x in docs)
            report(nd == len(docs) and tb == want_tb and int((t == 2).sum()) == nd and t[-1] == 2,
                   "%s/%s: n_docs %d, text_bytes %d, one EOS after each document" % (d, split, nd, tb))
    report(len(keys["val"]) > 0 and not (keys["train"] & keys["val"]),
           "%s: val non-empty (%d docs) and disjoint from train (%d docs)"
           % (d, len(keys["val"]), len(keys["train"])))
EOF
cat "$TMP/checks.txt"
pass=$((pass + $(grep -c '^PASS' "$TMP/checks.txt")))
fail=$((fail + $(grep -c '^FAIL' "$TMP/checks.txt")))
if ! grep -q '^PASS' "$TMP/checks.txt"; then bad "token file checks did not run"; fi
finish
