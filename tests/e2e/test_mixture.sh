#!/usr/bin/env bash
# The upcycling pipeline end to end on real data: seed -> branch (2 experts) -> mix (BTX,
# BAM, BAM shared-KV) -> train each mixture. Checks: every mixture trains and its loss falls;
# data parallelism over 2 ranks gives the 1-rank losses (step 1 to 1e-5, the rest to 1e-3:
# top-1 routing); resume is bitwise; frozen experts stay bitwise unchanged while the
# routers train; eval and generate read mixtures.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?} PY=${BAM_PYTHON:-/usr/bin/python3}
MPI=${MPIEXEC:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
TMP=$(mktemp -d /tmp/bam-test-mixture-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
cd "$SRC"
S=(--set data.dir="$DATA" --set eval.every=0 --set eval.max_tokens=2048)

"$BAM" pretrain --config tests/configs/tiny.ini "${S[@]}" --set train.steps=40 --set run.out_dir="$TMP/seed" >"$TMP/seed.log" 2>&1 &&
  "$BAM" branch --seed "$TMP/seed/ckpt" --domains code,math "${S[@]}" --set train.steps=20 --out "$TMP/br" >"$TMP/br.log" 2>&1
check "seed and two experts" $?

T=(--set train.steps=16 --set train.warmup_steps=2 --set train.log_every=1)
for m in btx bam bam-shared-kv; do
  "$BAM" mix --method $m --seed "$TMP/seed/ckpt" --experts "$TMP/br/code/ckpt,$TMP/br/math/ckpt" \
    --out "$TMP/mix-$m" >"$TMP/mix-$m.log" 2>&1
  check "$m: mixed" $?
  grep -q "train_mix = general:1,code:1,math:1" <("$BAM" inspect "$TMP/mix-$m/ckpt" 2>&1)
  check "$m: the mixture phase trains on equal shares of general, code and math" $?
  "$BAM" train --mixture "$TMP/mix-$m/ckpt" "${S[@]}" "${T[@]}" --out "$TMP/t1-$m" >"$TMP/t1-$m.log" 2>&1
  check "$m: trains on 1 rank" $?
  timeout 300 "$MPI" -np 2 --oversubscribe --bind-to none "$BAM" train --mixture "$TMP/mix-$m/ckpt" \
    "${S[@]}" "${T[@]}" --out "$TMP/t2-$m" >"$TMP/t2-$m.log" 2>&1
  check "$m: trains on 2 ranks" $?
  # Top-1 routing: a rounding difference may send a token whose two best experts tie to
  # within it elsewhere (tests/e2e/compare_runs.py), so step 1 (same parameters, same data)
  # agrees to 1e-5 and later steps to 1e-3; test_expert_parallel.sh keeps 1e-5 throughout
  # with continuous routing.
  "$PY" tests/e2e/compare_runs.py losses "$TMP/t1-$m/metrics.csv" "$TMP/t2-$m/metrics.csv" 16 --tol 1e-3 &&
    "$PY" -c 'import csv, sys; l = [float(r["loss"]) for r in csv.DictReader(open(sys.argv[1]))]; sys.exit(l[-1] >= l[0])' \
      "$TMP/t1-$m/metrics.csv"
  check "$m: loss falls; P=2 equals P=1 at step 1 to 1e-5, every step to 1e-3" $?
done

# Resume a mixture run: bitwise the same losses.
"$BAM" train --mixture "$TMP/mix-bam/ckpt" "${S[@]}" "${T[@]}" --out "$TMP/r" --stop-after 8 >"$TMP/r.log" 2>&1 &&
  "$BAM" train --mixture "$TMP/mix-bam/ckpt" "${S[@]}" "${T[@]}" --out "$TMP/r" --resume >>"$TMP/r.log" 2>&1 &&
  cmp -s <(cut -d, -f1-5 "$TMP/r/metrics.csv") <(cut -d, -f1-5 "$TMP/t1-bam/metrics.csv")
check "bam: stop at 8, resume: bitwise-identical losses" $?

# Frozen experts: expert tensors unchanged, routers trained.
"$BAM" train --mixture "$TMP/mix-bam/ckpt" "${S[@]}" "${T[@]}" --set mixture.freeze_experts=true \
  --out "$TMP/f" >"$TMP/f.log" 2>&1 &&
  "$BAM" export "$TMP/mix-bam/ckpt" --out "$TMP/f0.h5" >/dev/null && "$BAM" export "$TMP/f/ckpt" --out "$TMP/f1.h5" >/dev/null &&
  "$PY" - "$TMP/f0.h5" "$TMP/f1.h5" <<'PY'
import h5py, numpy as np, sys
a, b = h5py.File(sys.argv[1], "r")["params"], h5py.File(sys.argv[2], "r")["params"]
experts = [k for k in a if a[k].ndim == 4]
same = all(np.array_equal(a[k][...], b[k][...]) for k in experts)
moved = all(not np.array_equal(a[k][...], b[k][...]) for k in ("ffn_router", "att_router", "ln"))
print(f"     expert tensors {experts} unchanged: {same}; routers and norms trained: {moved}")
sys.exit(0 if experts and same and moved else 1)
PY
check "freeze_experts: experts bitwise unchanged, routers trained" $?

"$BAM" eval --checkpoint "$TMP/t1-bam-shared-kv/ckpt" --data "$DATA" --domains general,code,math --max-tokens 2048 >"$TMP/e.txt" 2>&1 &&
  grep -qE "^math +2048 " "$TMP/e.txt"
check "eval reads a mixture checkpoint" $?
"$BAM" eval --checkpoint "$TMP/t1-bam/ckpt" --data "$DATA" --domains general,code --max-tokens 2048 \
  --routing "$TMP/routing.csv" >"$TMP/er.txt" 2>&1 && grep -q "^routing on code" "$TMP/er.txt" &&
  "$PY" - "$TMP/routing.csv" <<'PY'
import collections, csv, sys
sums = collections.defaultdict(float)
for r in csv.DictReader(open(sys.argv[1])):
    if r["router"] in ("ffn", "att"):
        sums[(r["domain"], r["layer"], r["router"])] += float(r["value"])
ok = len(sums) == 2 * 2 * 2 and all(abs(v - 1) < 1e-4 for v in sums.values())
print(f"     {len(sums)} (domain, layer, router) rows; shares and soft gates sum to 1: {ok}")
sys.exit(0 if ok else 1)
PY
check "eval reports routing per domain and layer (shares and gates sum to 1)" $?
"$BAM" generate --checkpoint "$TMP/t1-btx/final.h5" --data "$DATA" --prompt "int main" --tokens 12 >"$TMP/g.txt" 2>&1 &&
  grep -q "^int main" "$TMP/g.txt"
check "generate samples from a mixture" $?
"$BAM" train --mixture "$TMP/mix-bam/ckpt" "${S[@]}" --set mixture.ep=2 --out "$TMP/ep" >"$TMP/ep.log" 2>&1
[[ $? != 0 ]] && grep -q "mixture.ep = 2 must divide the number of ranks (1)" "$TMP/ep.log"
check "ep = 2 on one rank is refused with a clear message (expert parallelism: test_expert_parallel.sh)" $?

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
