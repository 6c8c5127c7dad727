#!/usr/bin/env bash
# bam branch on real ranks and real data: from a tiny seed, 4 ranks train 2 experts at the
# same time (two groups of two); 1 rank trains them one after another. Each expert records
# its lineage, starts from the seed's parameters, and improves more on its own domain than
# on the other expert's domain.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?} PY=${BAM_PYTHON:-/usr/bin/python3}
MPI=${MPIEXEC:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
TMP=$(mktemp -d /tmp/bam-test-branch-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
cd "$SRC"

"$BAM" pretrain --config tests/configs/tiny.ini --set data.dir="$DATA" --set train.steps=60 \
  --set eval.every=0 --set run.out_dir="$TMP/seed" >"$TMP/seed.log" 2>&1
check "tiny seed trains" $?

BR=(--seed "$TMP/seed/ckpt" --domains code,math --set train.steps=40 --set train.warmup_steps=4
    --set eval.every=20 --set data.eval_domains=code,math --set eval.max_tokens=4096)
timeout 300 "$MPI" -np 4 --oversubscribe --bind-to none "$BAM" branch "${BR[@]}" --out "$TMP/b4" >"$TMP/b4.log" 2>&1
check "branch on 4 ranks exits 0" $?
grep -q "on 2 groups of 2 ranks" "$TMP/b4.log" && grep -q "^\[code\] expert 1/2: code, mix code:0.9,general:0.1, peak lr 0.0015, ranks 0-1" "$TMP/b4.log" &&
  grep -q "^\[math\] expert 2/2: math, mix math:0.9,general:0.1, peak lr 0.0015, ranks 2-3" "$TMP/b4.log"
check "two groups of two ranks, one expert each, 10% general at half the seed's lr" $?
# Both groups were training at the same time: each logged a step before the other finished.
"$PY" - "$TMP/b4.log" <<'PY'; check "the two experts trained concurrently" $?
import sys
lines = open(sys.argv[1]).read().splitlines()
first = {d: min(i for i, l in enumerate(lines) if l.startswith(f"[{d}] step")) for d in ("code", "math")}
last = {d: max(i for i, l in enumerate(lines) if l.startswith(f"[{d}] step")) for d in ("code", "math")}
sys.exit(0 if first["code"] < last["math"] and first["math"] < last["code"] else 1)
PY
for d in code math; do
  test -f "$TMP/b4/$d/final.h5" && "$BAM" inspect "$TMP/b4/$d/ckpt" >"$TMP/$d.inspect" 2>&1 &&
    grep -q "domain = $d" "$TMP/$d.inspect" && grep -q "seed_id = " "$TMP/$d.inspect"
  check "expert $d: checkpoint with lineage (domain, seed_id)" $?
done
"$PY" - "$TMP/b4/code/eval.csv" "$TMP/b4/math/eval.csv" <<'PY'; check "each expert improves most on its own domain" $?
import csv, sys
ok = True
for path, own, other in ((sys.argv[1], "code", "math"), (sys.argv[2], "math", "code")):
    rows = list(csv.DictReader(open(path)))
    loss = lambda step, d: next(float(r["loss"]) for r in rows if int(r["step"]) == step and r["domain"] == d)
    last = max(int(r["step"]) for r in rows)
    gain_own, gain_other = loss(0, own) - loss(last, own), loss(0, other) - loss(last, other)
    print(f"     {own} expert: own-domain loss -{gain_own:.3f}, {other} loss -{gain_other:.3f}")
    ok &= gain_own > 0 and gain_own > gain_other
sys.exit(0 if ok else 1)
PY

# One rank: the two experts one after another.
timeout 300 "$BAM" branch "${BR[@]}" --out "$TMP/b1" >"$TMP/b1.log" 2>&1
check "branch on 1 rank exits 0" $?
grep -q "on 1 group of 1 rank" "$TMP/b1.log" && test -f "$TMP/b1/code/final.h5" && test -f "$TMP/b1/math/final.h5"
check "one rank trains both experts one after another" $?

# Bad input
"$BAM" branch --seed "$TMP/seed/ckpt" --domains code,general >"$TMP/e.log" 2>&1
[[ $? != 0 ]] && grep -q "'general' is the seed's domain" "$TMP/e.log"; check "general is not an expert domain" $?
timeout 60 "$MPI" -np 3 --oversubscribe "$BAM" branch "${BR[@]}" --out "$TMP/b3" >"$TMP/e3.log" 2>&1
[[ $? != 0 ]] && grep -q "cannot be split evenly" "$TMP/e3.log"; check "3 ranks for 2 experts is refused" $?

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
