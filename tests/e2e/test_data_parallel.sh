#!/usr/bin/env bash
# Data parallelism, resume and resharding on real MPI ranks with the real test data:
#  - P = 1, 2, 4 at the same global batch give the same losses to 1e-5 relative;
#  - the same P twice is bitwise identical;
#  - stop + resume on the same P continues bitwise identically (losses and parameters);
#  - a checkpoint of P = 2 resumes on P = 1 and P = 4 with the same losses to 1e-5;
#  - SIGKILL in the middle of writing a checkpoint leaves the previous one intact, and
#    resuming from it gives the uninterrupted run's losses.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?} PY=${BAM_PYTHON:-/usr/bin/python3}
MPI=${MPIEXEC:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
TMP=$(mktemp -d /tmp/bam-test-dp-XXXXXX)
trap 'pkill -9 -f "$TMP" 2>/dev/null; rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
cd "$SRC"
STEPS=20
COMMON=(--config tests/configs/tiny.ini --set data.dir="$DATA" --set train.steps=$STEPS
        --set train.warmup_steps=4 --set train.log_every=1 --set eval.every=0 --set eval.max_tokens=2048)

run() { # run NAME NP [extra args...]
  local name=$1 np=$2; shift 2
  timeout 300 "$MPI" -np "$np" --oversubscribe --bind-to none "$BAM" pretrain "${COMMON[@]}" \
    --set run.out_dir="$TMP/$name" "$@" >>"$TMP/$name.log" 2>&1
}
losses() { cut -d, -f1,3 "$TMP/$1/metrics.csv" | tail -n +2; }
# compare_losses A B TOL [FROM]: same steps, |a-b| <= TOL*|b| for steps >= FROM
compare_losses() {
  "$PY" - "$TMP/$1/metrics.csv" "$TMP/$2/metrics.csv" "$3" "${4:-1}" <<'PY'
import csv, sys
a = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(open(sys.argv[1]))}
b = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(open(sys.argv[2]))}
tol, start = float(sys.argv[3]), int(sys.argv[4])
steps = [s for s in b if s >= start]
worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in steps) if all(s in a for s in steps) else float("inf")
print(f"     {len(steps)} steps from {start}: worst relative difference {worst:.2e} (tolerance {tol:g})")
sys.exit(0 if steps and worst <= tol else 1)
PY
}
same_params() { # bitwise-equal parameters of two checkpoints
  "$BAM" export "$1" --out "$TMP/pa.h5" >/dev/null && "$BAM" export "$2" --out "$TMP/pb.h5" >/dev/null &&
  "$PY" - "$TMP/pa.h5" "$TMP/pb.h5" <<'PY'
import h5py, numpy as np, sys
a, b = h5py.File(sys.argv[1], "r")["params"], h5py.File(sys.argv[2], "r")["params"]
sys.exit(0 if set(a) == set(b) and all(np.array_equal(a[k][...], b[k][...]) for k in a) else 1)
PY
}

for np in 1 2 4; do run "p$np" "$np"; check "P=$np trains $STEPS steps" $?; done
compare_losses p2 p1 1e-5; check "P=2 matches P=1 to 1e-5" $?
compare_losses p4 p1 1e-5; check "P=4 matches P=1 to 1e-5" $?
run p2b 2
cmp -s <(losses p2) <(losses p2b); check "P=2 twice: bitwise-identical losses" $?
same_params "$TMP/p2/ckpt" "$TMP/p2b/ckpt"; check "P=2 twice: bitwise-identical parameters" $?

# Stop at step 10, resume on the same rank count.
run r2 2 --stop-after 10
test "$(cat "$TMP/r2/ckpt/latest")" = "step-000010"; check "stop-after leaves a step-10 checkpoint" $?
"$BAM" inspect "$TMP/r2/ckpt" >"$TMP/inspect.txt" 2>&1 && grep -q "wq" "$TMP/inspect.txt" && grep -qi "step.*10" "$TMP/inspect.txt"
check "bam inspect prints tensors and step" $?
cp -r "$TMP/r2" "$TMP/r1" && cp -r "$TMP/r2" "$TMP/r4"
run r2 2 --resume
cmp -s <(losses p2) <(losses r2); check "resume on P=2: bitwise-identical losses" $?
same_params "$TMP/p2/ckpt" "$TMP/r2/ckpt"; check "resume on P=2: bitwise-identical parameters" $?
run r1 1 --resume; compare_losses r1 p2 1e-5 11; check "P=2 checkpoint resumed on P=1" $?
run r4 4 --resume; compare_losses r4 p2 1e-5 11; check "P=2 checkpoint resumed on P=4" $?

# SIGKILL while the step-15 checkpoint is being written.
run k2 2 --stop-after 10
BAM_CKPT_TEST_PAUSE_S=60 timeout 300 "$MPI" -np 2 --oversubscribe --bind-to none -x BAM_CKPT_TEST_PAUSE_S \
  "$BAM" pretrain "${COMMON[@]}" --set run.out_dir="$TMP/k2" --set ckpt.every=5 --resume >>"$TMP/k2.log" 2>&1 &
for _ in $(seq 600); do [[ -d "$TMP/k2/ckpt/.tmp-step-000015" ]] && break; sleep 0.1; done
sleep 1
pkill -9 -f "$TMP/k2" ; wait 2>/dev/null
test "$(cat "$TMP/k2/ckpt/latest")" = "step-000010" && test ! -d "$TMP/k2/ckpt/step-000015"
check "killed mid-checkpoint: latest still step-000010" $?
"$BAM" inspect "$TMP/k2/ckpt" >/dev/null 2>&1; check "the previous checkpoint still loads" $?
run k2 2 --resume
cmp -s <(losses p2) <(losses k2); check "resumed after the kill: the uninterrupted losses" $?

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
