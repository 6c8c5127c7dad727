#!/usr/bin/env bash
# bam report on a real pipeline run (jobs/pipeline.sh, configs/tiny-pipeline.ini, a few steps per
# stage on the test data). Checks: every file of the report exists; the PNGs are PNGs of some
# size; results.csv has one row per model whose perplexities and bits per byte equal the eval
# files' (parsed independently here), whose steps and tokens equal `bam inspect`'s and whose
# training FLOPs are 3 x forward FLOPs/token x tokens; report.md has the table rows with the same
# numbers and names the lowest-perplexity model per domain; a rerun (also under mpirun -np 2)
# gives byte-identical Markdown and CSV; a missing compute-matched run is shown as absent; the
# scripts redraw their figures; without gnuplot the report is still written and the command
# fails naming the figures; errors (no run folder, a deleted eval file, a corrupted metrics.csv
# line, a malformed routing line, an unfinished stage, a foreign --out folder) exit non-zero with
# one line naming the file, and leave the previous report and no temporary folder behind.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?}
PY=${BAM_PYTHON:-python3}
MPI=${MPIEXEC:-mpirun}
[[ -n $MPI ]] || MPI=mpirun
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
TMP=$(mktemp -d /tmp/bam-test-report-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
MODELS=(seed expert-code expert-legal expert-math btx-dm bam-dm bam-cm bam-shared-kv-dm bam-shared-kv-cm)
FIGS=(loss-stages loss-mixtures routing-ffn routing-att)

# expect_error NAME FRAGMENT -- COMMAND...: non-zero exit, one stderr line holding FRAGMENT
expect_error() {
  local name=$1 frag=$2; shift 3
  timeout 120 "$@" >"$TMP/out" 2>"$TMP/err"
  local rc=$? ok=1
  [[ $rc != 0 && $rc != 124 && $rc -lt 128 ]] || { echo "     exit code $rc"; ok=0; }
  [[ $(grep -c . "$TMP/err") == 1 ]] || { echo "     stderr:"; cat "$TMP/err"; ok=0; }
  grep -qF -- "$frag" "$TMP/err" || { echo "     stderr lacks '$frag': $(cat "$TMP/err")"; ok=0; }
  ((ok)) && echo "     $(cat "$TMP/err")"
  check "$name" $((1 - ok))
}

# ---- a run folder: the whole pipeline, a few steps per stage ----------------------------------
cd "$SRC"
BAM_BIN=$BAM BAM_DATA=$DATA BAM_BRANCH_STEPS=6 BAM_MIX_STEPS=6 BAM_EVAL_TOKENS=512 \
  BAM_SET="train.steps=10" jobs/pipeline.sh configs/tiny-pipeline.ini --run "$TMP/run" >"$TMP/pipeline.log" 2>&1
check "the pipeline makes a run folder" $? || true
[[ -s $TMP/run/eval/DONE ]] || { tail -20 "$TMP/pipeline.log"; echo "0 passed, 1 failed"; exit 1; }
RUN=$TMP/run REP=$TMP/run/report
rm -rf "$REP" # the pipeline's own report stage, if any: rebuilt here

# ---- the report ---------------------------------------------------------------------------------
"$BAM" report "$RUN" >"$TMP/r1.log" 2>&1
check "bam report RUN exits 0" $?
missing=0
for f in report.md results.csv .bam-report loss-train.dat loss-valid.dat routing-ffn.dat routing-att.dat; do
  [[ -s $REP/$f ]] || { echo "     missing $f"; missing=1; }
done
for g in "${FIGS[@]}"; do
  [[ -s $REP/$g.gp ]] || { echo "     missing $g.gp"; missing=1; }
  [[ -s $REP/$g.png ]] || { echo "     missing $g.png"; missing=1; }
done
ls -d "$RUN"/report.tmp-* "$RUN"/report.old-* 2>/dev/null && missing=1
check "report folder: report.md, results.csv, data, scripts and four figures (no temporary folder left)" $missing

pngs_ok() { # PNG signature, IHDR, at least 100 x 100 pixels, more than 10 kB
  "$PY" - "$@" <<'PY'
import struct, sys, os
bad = 0
for p in sys.argv[1:]:
    b = open(p, "rb").read()
    if b[:8] != b"\x89PNG\r\n\x1a\n" or b[12:16] != b"IHDR":
        print("     not a PNG:", p); bad = 1; continue
    w, h = struct.unpack(">II", b[16:24])
    if w < 100 or h < 100 or len(b) < 10000 or not b.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"):
        print(f"     trivial or truncated PNG: {p} {w}x{h} {len(b)} bytes"); bad = 1
sys.exit(bad)
PY
}
pngs_ok "$REP"/*.png
check "the figures are valid, non-trivial PNGs" $?

# Independent reading of the eval files, bam inspect and the report's CSV and Markdown.
for m in "${MODELS[@]}"; do
  case $m in seed) c=$RUN/seed/ckpt ;; expert-*) c=$RUN/experts/${m#expert-}/ckpt ;; *) c=$RUN/train-$m/ckpt ;; esac
  "$BAM" inspect "$c" | awk -v m="$m" '$1 == "step" || $1 == "tokens" || $1 == "flops_per_token_forward" { print m, $1, $NF }'
done >"$TMP/inspect.txt"
"$PY" - "$RUN" "$REP" "$TMP/inspect.txt" "${MODELS[@]}" <<'PY'
import csv, sys
run, rep, inspect, models = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
DOMS, AVG = ["general", "code", "legal", "math", "reference"], ["general", "code", "legal", "math"]
bad = []
def ev(m):  # eval/<m>.txt: domain -> (ppl, bpb), columns by the header's names
    res, cols = {}, None
    for line in open(f"{run}/eval/{m}.txt"):
        f = line.split()
        if f and f[0] == "domain":
            cols = f; continue
        if cols is None or not f or f[0] in ("average", "routing"):
            if cols is not None and res: break
            continue
        res[f[0]] = (float(f[cols.index("perplexity")]), float(f[cols.index("bits/B")]))
    return res
E = {m: ev(m) for m in models}
I = {}
for line in open(inspect):
    m, k, v = line.split(); I[(m, k)] = float(v)
rows = list(csv.DictReader(open(f"{rep}/results.csv")))
names = [r["model"] for r in rows]
if names != models: bad.append(f"results.csv rows {names}")
for r in rows:
    m = r["model"]
    for d in DOMS:
        if float(r[f"ppl_{d}"]) != E[m][d][0]: bad.append(f"{m} ppl_{d} {r[f'ppl_{d}']} != {E[m][d][0]}")
        if float(r[f"bpb_{d}"]) != E[m][d][1]: bad.append(f"{m} bpb_{d} {r[f'bpb_{d}']} != {E[m][d][1]}")
    avg = sum(E[m][d][0] for d in AVG) / 4
    if abs(float(r["ppl_avg"]) - avg) > 0.0051: bad.append(f"{m} ppl_avg {r['ppl_avg']} != {avg}")
    bavg = sum(E[m][d][1] for d in AVG) / 4
    if abs(float(r["bpb_avg"]) - bavg) > 0.000051: bad.append(f"{m} bpb_avg {r['bpb_avg']} != {bavg}")
    if int(r["steps"]) != I[(m, "step")] or int(r["tokens"]) != I[(m, "tokens")]:
        bad.append(f"{m} steps/tokens {r['steps']}/{r['tokens']} != bam inspect's")
    fl = 3 * I[(m, "flops_per_token_forward")] * I[(m, "tokens")]
    if abs(float(r["train_flops"]) - fl) > 1e-6 * fl: bad.append(f"{m} train_flops {r['train_flops']} != {fl}")
    want = ("seed" if m == "seed" else "branch" if m.startswith("expert-") else "train")
    if r["stage"] != want: bad.append(f"{m} stage {r['stage']}")
    if want == "train" and (r["method"], r["matching"]) != (m.rsplit("-", 1)[0], m.rsplit("-", 1)[1]):
        bad.append(f"{m} method/matching {r['method']}/{r['matching']}")
# report.md: the header, one row per model with the eval files' numbers, the lowest per domain
md = open(f"{rep}/report.md").read().splitlines()
hdr = [l for l in md if l.startswith("| model |")]
want_hdr = "| model | general | code | legal | math | Avg | reference | bits/B | steps | tokens | train FLOPs |"
if hdr != [want_hdr]: bad.append(f"report.md header {hdr}")
for m in models:
    rows_m = [l for l in md if l.startswith(f"| {m} |")]
    if len(rows_m) != 1: bad.append(f"report.md: {len(rows_m)} rows for {m}"); continue
    cells = [c.strip() for c in rows_m[0].strip("|").split("|")]
    got = [float(c) for c in cells[1:8]]
    want = [E[m][d][0] for d in AVG] + [sum(E[m][d][0] for d in AVG) / 4, E[m]["reference"][0],
                                        sum(E[m][d][1] for d in AVG) / 4]
    for g, w, tol in zip(got, want, [0] * 4 + [0.0051, 0, 0.000051]):
        if abs(g - w) > tol: bad.append(f"report.md {m}: {cells[1:8]} != {want}")
    if int(cells[8]) != I[(m, "step")] or int(cells[9]) != I[(m, "tokens")]:
        bad.append(f"report.md {m}: steps/tokens {cells[8:10]}")
for d in DOMS:
    best = min(models, key=lambda m: E[m][d][0])
    line = f"| {d} | {best} {E[best][d][0]:.2f} |"
    if not any(l.startswith(line) for l in md): bad.append(f"report.md: no line '{line}...'")
for s in ["## Cost per stage", "| 1. seed (pretrain) |", "| 2. branch (all experts) |", "| total |",
          "### Soft attention gates against uniform", "### FFN routing", "![",
          "- bam-dm (Ea = 4, uniform 0.250): layer 0 "]:
    if not any(s in l for l in md): bad.append(f"report.md lacks '{s}'")
for b in bad: print("    ", b)
sys.exit(1 if bad else 0)
PY
check "results.csv and report.md hold the eval files' numbers, bam inspect's steps and tokens, 3 x FLOPs/token x tokens, the lowest model per domain" $?

# The per-stage cost: the branch stage's FLOPs are the sum of the experts'.
"$PY" - "$REP" <<'PY'
import csv, sys
rows = {r["model"]: r for r in csv.DictReader(open(sys.argv[1] + "/results.csv"))}
branch = sum(float(r["train_flops"]) for m, r in rows.items() if m.startswith("expert-"))
line = [l for l in open(sys.argv[1] + "/report.md") if l.startswith("| 2. branch (all experts) |")][0]
got = float(line.split("|")[5])
sys.exit(0 if abs(got - branch) <= 1e-3 * branch else print(f"     branch FLOPs {got} != {branch}") or 1)
PY
check "per-stage cost: branch (all experts) = the experts' training FLOPs" $?

# ---- determinism ----------------------------------------------------------------------------------
cp "$REP/report.md" "$TMP/md1"; cp "$REP/results.csv" "$TMP/csv1"
"$BAM" report "$RUN" >/dev/null 2>&1 && cmp "$REP/report.md" "$TMP/md1" && cmp "$REP/results.csv" "$TMP/csv1"
check "a rerun replaces the report with byte-identical report.md and results.csv" $?
"$MPI" -np 2 --oversubscribe --bind-to none "$BAM" report "$RUN" --out "$TMP/rep-mpi" >"$TMP/mpi.log" 2>&1 &&
  cmp "$TMP/rep-mpi/report.md" "$TMP/md1" && cmp "$TMP/rep-mpi/results.csv" "$TMP/csv1"
check "under mpirun -np 2 (rank 0 writes): the same report.md and results.csv" $?

# ---- the scripts redraw their figures ---------------------------------------------------------
if command -v gnuplot >/dev/null; then
  (cd "$TMP/rep-mpi" && rm -f ./*.png && for g in "${FIGS[@]}"; do gnuplot "$g.gp" || exit 1; done) &&
    pngs_ok "$TMP"/rep-mpi/*.png
  check "gnuplot NAME.gp in the report folder redraws every figure" $?
fi

# ---- an absent optional run ----------------------------------------------------------------------
mkdir -p "$TMP/part"
cp -a "$RUN/seed" "$RUN/experts" "$RUN/eval" "$RUN"/mix-* "$RUN"/train-* "$TMP/part/"
rm -rf "$TMP/part/train-bam-cm"
"$BAM" report "$TMP/part" >/dev/null 2>"$TMP/err"
rc=$?
[[ $rc == 0 ]] && grep -q '^| bam-cm | - | - |' "$TMP/part/report/report.md" &&
  grep -q 'absent from this run (no folder `train-bam-cm`)' "$TMP/part/report/report.md" &&
  [[ $(grep -c . "$TMP/part/report/results.csv") == 9 ]] && ! grep -q '^bam-cm,' "$TMP/part/report/results.csv"
check "without train-bam-cm: bam-cm is shown as absent, results.csv has the 8 other models" $?

# ---- without gnuplot -----------------------------------------------------------------------------
BAM_GNUPLOT=$TMP/no-such-gnuplot "$BAM" report "$RUN" --out "$TMP/nogp" >/dev/null 2>"$TMP/err"
rc=$?
ok=0
[[ $rc != 0 && $(grep -c . "$TMP/err") == 1 ]] || ok=1
for g in "${FIGS[@]}"; do
  grep -qF "$g.png" "$TMP/err" || ok=1
  [[ -e $TMP/nogp/$g.png || ! -s $TMP/nogp/$g.gp ]] && ok=1
  grep -qF "*$g.png was not drawn*" "$TMP/nogp/report.md" || ok=1
done
grep -q "was not found" "$TMP/err" && cmp -s "$TMP/nogp/results.csv" "$TMP/csv1" || ok=1
echo "     $(cat "$TMP/err")"
check "gnuplot missing: non-zero exit naming every figure; report.md (saying so), results.csv, scripts written" $ok
printf '#!/bin/sh\necho "line 1: simulated gnuplot failure" >&2\nexit 1\n' >"$TMP/bad-gnuplot"
chmod +x "$TMP/bad-gnuplot"
expect_error "gnuplot failing: its message is passed on" "simulated gnuplot failure" -- \
  env BAM_GNUPLOT="$TMP/bad-gnuplot" "$BAM" report "$RUN" --out "$TMP/badgp"

# ---- errors ----------------------------------------------------------------------------------------
expect_error "no run folder" "$TMP/nowhere does not exist" -- "$BAM" report "$TMP/nowhere"
expect_error "no RUN_DIR argument" "RUN_DIR is required" -- "$BAM" report
expect_error "unknown option" "unexpected argument '--bogus'" -- "$BAM" report "$RUN" --bogus

# Each damage on a copy whose report exists: the command fails naming the file and the previous
# report stays as it was, with no temporary folder beside it.
damage() { # damage NAME FRAGMENT SHELL-COMMAND (run in the copy)
  rm -rf "$TMP/bad"; mkdir -p "$TMP/bad"
  cp -a "$RUN/seed" "$RUN/experts" "$RUN/eval" "$RUN"/mix-* "$RUN"/train-* "$REP" "$TMP/bad/"
  (cd "$TMP/bad" && eval "$3")
  expect_error "$1" "$2" -- "$BAM" report "$TMP/bad"
  cmp -s "$TMP/bad/report/report.md" "$TMP/md1" && ! ls -d "$TMP"/bad/report.tmp-* >/dev/null 2>&1
  check "  ... the previous report is intact, no temporary folder left" $?
}
damage "a deleted eval file" "$TMP/bad/eval/bam-dm.txt is missing" "rm eval/bam-dm.txt"
damage "a corrupted metrics.csv line" "$TMP/bad/train-bam-shared-kv-dm/metrics.csv:3:" \
  "sed -i '3s/.*/5,2560,0.1x,0.1,1,1,0,0/' train-bam-shared-kv-dm/metrics.csv"
damage "a metrics.csv line cut short" "$TMP/bad/seed/metrics.csv:2: 3 fields where the header has 8" \
  "sed -i '2s/^\([^,]*,[^,]*,[^,]*\).*/\1/' seed/metrics.csv"
damage "a malformed routing line" "$TMP/bad/eval/btx-dm.routing.csv:4:" \
  "sed -i '4s/,ffn,/,ffn/' eval/btx-dm.routing.csv"
damage "a malformed eval file" "$TMP/bad/eval/expert-math.txt:" \
  "sed -i 's/^\(code  *[0-9]*  *[0-9.]*\)  *[0-9.]*/\1 x/' eval/expert-math.txt"
damage "an unfinished stage" "stage train bam-dm is incomplete: $TMP/bad/train-bam-dm/DONE is missing" \
  "rm train-bam-dm/DONE"
damage "a missing expert" "stage branch (expert legal) is missing: $TMP/bad/experts/legal" "rm -rf experts/legal"
damage "a missing seed" "stage seed is missing: $TMP/bad/seed" "rm -rf seed"

mkdir -p "$TMP/foreign" && echo keep >"$TMP/foreign/notes.txt"
expect_error "--out naming a folder bam report did not make" "$TMP/foreign exists, is not empty" -- \
  "$BAM" report "$RUN" --out "$TMP/foreign"
[[ $(ls -A "$TMP/foreign") == notes.txt ]]
check "  ... that folder is untouched" $?

[[ $fail == 0 ]] || { echo "--- report log"; cat "$TMP/r1.log"; }
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
