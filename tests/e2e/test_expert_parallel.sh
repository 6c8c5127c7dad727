#!/usr/bin/env bash
# Expert parallelism end to end on real data: a seed and three domain experts mixed into
# BTX, BAM and BAM shared-KV mixtures of E = 4 experts (top-2 FFN routing), each trained 20
# steps with P=1; P=2 ep=2; P=4 ep=2 (two groups) and P=4 ep=4 (oversubscribed, one thread
# per rank). Each rank holds only its own experts (expert sharding). Checks: the same losses
# and the same final evaluation to 1e-5 relative in every layout; the same layout twice
# is bitwise identical; a run stopped with one ep resumes with another and continues with
# the same losses; ep not dividing the ranks or the experts is refused with a clear message.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?} PY=${BAM_PYTHON:-/usr/bin/python3}
MPI=${MPIEXEC:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
TMP=$(mktemp -d /tmp/bam-test-ep-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
run() { # run NP OUT LOG args...: bam train on NP ranks
  local np=$1 out=$2 log=$3
  shift 3
  if [[ $np == 1 ]]; then
    "$BAM" train "$@" --out "$out" >"$log" 2>&1
  else
    timeout 600 "$MPI" -np "$np" --oversubscribe --bind-to none "$BAM" train "$@" --out "$out" >"$log" 2>&1
  fi
}
same() { # same A.csv B.csv N TOL: N loss rows, relative difference <= TOL
  "$PY" - "$@" <<'PY'
import csv, sys
a = [float(r["loss"]) for r in csv.DictReader(open(sys.argv[1]))]
b = [float(r["loss"]) for r in csv.DictReader(open(sys.argv[2]))]
n, tol = int(sys.argv[3]), float(sys.argv[4])
worst = max((abs(x - y) / abs(y) for x, y in zip(a, b)), default=1.0)
print(f"     loss {a[0]:.4f} -> {a[-1]:.4f}; worst relative difference {worst:.1e}")
sys.exit(0 if len(a) == len(b) == n and worst <= tol else 1)
PY
}
same_eval() { # same_eval A.csv B.csv TOL: the final evaluation, every domain, loss within TOL
  "$PY" - "$@" <<'PY'
import csv, sys
def final(p):
    rows = list(csv.DictReader(open(p)))
    last = max(int(r["step"]) for r in rows)
    return {r["domain"]: (float(r["loss"]), int(r["tokens"])) for r in rows if int(r["step"]) == last}
a, b, tol = final(sys.argv[1]), final(sys.argv[2]), float(sys.argv[3])
worst = max(abs(a[d][0] - b[d][0]) / abs(b[d][0]) for d in b) if a.keys() == b.keys() and b else 1.0
print(f"     final eval on {len(b)} domains; worst relative difference {worst:.1e}")
sys.exit(0 if a.keys() == b.keys() and all(a[d][1] == b[d][1] for d in b) and worst <= tol else 1)
PY
}
held() { # held LOG: "model: K, N parameters" and "this rank holds M of them": prints N M
  sed -n -e 's/^model: [a-z-]*, \([0-9]*\) parameters.*/\1/p' -e 's/.*this rank holds \([0-9]*\) of them.*/\1/p' "$1" | head -2 | tr '\n' ' '
}
cd "$SRC"
S=(--set data.dir="$DATA" --set eval.every=0 --set eval.max_tokens=2048)

"$BAM" pretrain --config tests/configs/tiny.ini "${S[@]}" --set train.steps=30 --set run.out_dir="$TMP/seed" >"$TMP/seed.log" 2>&1 &&
  "$BAM" branch --seed "$TMP/seed/ckpt" --domains code,math,legal "${S[@]}" --set train.steps=10 --out "$TMP/br" >"$TMP/br.log" 2>&1
check "seed and three domain experts" $?

declare -A held2
T=(--set train.steps=20 --set train.warmup_steps=2 --set train.log_every=1 --set train.batch_size=8)
for m in btx bam bam-shared-kv; do
  "$BAM" mix --method $m --ffn-top-k 2 --seed "$TMP/seed/ckpt" \
    --experts "$TMP/br/code/ckpt,$TMP/br/math/ckpt,$TMP/br/legal/ckpt" --out "$TMP/mix-$m" >"$TMP/mix-$m.log" 2>&1
  check "$m: mixed (4 experts)" $?
  M=(--mixture "$TMP/mix-$m/ckpt" "${S[@]}" "${T[@]}")
  run 1 "$TMP/$m-p1" "$TMP/$m-p1.log" "${M[@]}"
  check "$m: P=1" $?
  for layout in 2:2 4:2 4:4; do
    np=${layout%:*} ep=${layout#*:}
    run "$np" "$TMP/$m-p$np-ep$ep" "$TMP/$m-p$np-ep$ep.log" "${M[@]}" --set mixture.ep=$ep &&
      grep -q "expert parallelism: $((np / ep)) group" "$TMP/$m-p$np-ep$ep.log"
    check "$m: P=$np ep=$ep trains expert parallel" $?
    same "$TMP/$m-p1/metrics.csv" "$TMP/$m-p$np-ep$ep/metrics.csv" 20 1e-5
    check "$m: P=$np ep=$ep gives the P=1 losses to 1e-5" $?
    same_eval "$TMP/$m-p1/eval.csv" "$TMP/$m-p$np-ep$ep/eval.csv" 1e-5
    check "$m: P=$np ep=$ep evaluates (in lock step) to the P=1 losses to 1e-5" $?
    read -r total mine <<<"$(held "$TMP/$m-p$np-ep$ep.log")"
    echo "     parameters held per rank: ${mine:-?} of ${total:-?}"
    [[ -n ${mine:-} && -n ${total:-} && $mine -lt $total ]] && { [[ $ep != 4 ]] || [[ $mine -lt ${held2[$m]} ]]; }
    check "$m: P=$np ep=$ep: each rank holds only its experts (fewer with ep=4 than ep=2)" $?
    [[ $ep == 2 ]] && held2[$m]=${mine:-0}
  done
  run 2 "$TMP/$m-again" "$TMP/$m-again.log" "${M[@]}" --set mixture.ep=2 &&
    cmp -s <(cut -d, -f1-5,8 "$TMP/$m-again/metrics.csv") <(cut -d, -f1-5,8 "$TMP/$m-p2-ep2/metrics.csv")
  check "$m: P=2 ep=2 twice: bitwise-identical losses, gradient norms and aux losses" $?
done

# Stop with ep=2 on 4 ranks, resume with ep=4 on 4 ranks: the same losses continue.
M=(--mixture "$TMP/mix-bam/ckpt" "${S[@]}" "${T[@]}")
run 4 "$TMP/r" "$TMP/r1.log" "${M[@]}" --set mixture.ep=2 --stop-after 10 &&
  run 4 "$TMP/r" "$TMP/r2.log" "${M[@]}" --set mixture.ep=4 --resume &&
  same "$TMP/bam-p1/metrics.csv" "$TMP/r/metrics.csv" 20 1e-5
check "bam: stopped at 10 with ep=2, resumed with ep=4: the P=1 losses to 1e-5" $?
run 2 "$TMP/r2" "$TMP/r3.log" "${M[@]}" --set mixture.ep=2 --stop-after 10 &&
  run 1 "$TMP/r2" "$TMP/r4.log" "${M[@]}" --resume &&
  same "$TMP/bam-p1/metrics.csv" "$TMP/r2/metrics.csv" 20 1e-5
check "bam: stopped at 10 with P=2 ep=2, resumed on one rank: the P=1 losses to 1e-5" $?

# Refusals: ep must divide the ranks and the experts.
run 2 "$TMP/x1" "$TMP/x1.log" "${M[@]}" --set mixture.ep=4
[[ $? != 0 ]] && grep -q "mixture.ep = 4 must divide the number of ranks (2)" "$TMP/x1.log"
check "ep not dividing the ranks is refused" $?
run 3 "$TMP/x2" "$TMP/x2.log" "${M[@]}" --set mixture.ep=3 --set train.batch_size=9
[[ $? != 0 ]] && grep -q "ep = 3 does not divide the 4 FFN experts" "$TMP/x2.log"
check "ep not dividing the experts is refused" $?

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
