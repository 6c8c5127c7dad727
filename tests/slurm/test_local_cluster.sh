#!/usr/bin/env bash
# A real single-node Slurm cluster (slurm/local-cluster.sh) in a fresh folder, on its own
# ports: the node comes up idle; `srun --mpi=pmix` and `mpirun` inside a batch allocation both
# form one 2-rank MPI world; slurm/pretrain.sbatch trains the tiny model on 2 ranks and writes
# its checkpoint; `scontrol requeue` reruns a job and appends to its output; `stop` cancels a
# running job and stops every daemon. The cluster is always stopped on exit.
# Environment: BAM_BIN, BAM_SOURCE_DIR, BAM_TEST_DATA (as set by CTest); BAM_RESUME_FLAG
# (default: --resume when the bam program knows it, else empty).
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?}
CL=$SRC/slurm/local-cluster.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Run outside any enclosing Slurm job: only our own cluster's settings count.
for v in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_' || true); do unset "$v"; done

for c in slurmctld slurmd munged sbatch; do
  command -v $c >/dev/null 2>&1 || { echo "FAIL $c not installed (apt-get install slurm-wlm munge)"; echo "0 passed, 1 failed"; exit 1; }
done

pass=0 fail=0
TMP=$(mktemp -d /tmp/bam-test-slurm-XXXXXX)
chmod 0755 "$TMP"
CDIR=$TMP/cluster
cleanup() {
  local rc=$?
  "$CL" stop --dir "$CDIR" >/dev/null 2>&1 || echo "warning: stopping the cluster failed"
  rm -rf "$TMP"
  ((rc == 0 && fail == 0)) || exit $((rc ? rc : 1))
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check() { # check NAME CONDITION-EXIT-CODE
  if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi
}
finish() { echo "$pass passed, $fail failed"; ((fail == 0)); exit $?; }
show() { # show FILE: a job's output, indented
  [[ -f $1 ]] && sed 's/^/     | /' "$1"
}

# Two free ports next to each other, away from Slurm's (6817/6818) and the script's defaults.
port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
for ((i = 0; i < 50; i++)); do
  base=$((20000 + (RANDOM % 20000) * 2))
  port_free $base && port_free $((base + 1)) && break
done
export BAM_SLURM_CTLD_PORT=$base BAM_SLURM_SLURMD_PORT=$((base + 1))

t0=$(date +%s.%N)
"$CL" start --dir "$CDIR" >"$TMP/start.log" 2>&1
rc=$?
secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
check "cluster starts (ports $base/$((base + 1)), ${secs}s)" $rc
if [[ $rc != 0 ]]; then show "$TMP/start.log"; finish; fi
grep -q "^export SLURM_CONF=$CDIR/slurm.conf$" "$TMP/start.log"; check "start prints the SLURM_CONF line" $?
export SLURM_CONF=$CDIR/slurm.conf
node=$(sinfo -h -N -o '%N %T %c')
echo "     node: $node"
re='^[^ ]+ idle ([0-9]+)$'
[[ $node =~ $re ]] && ((BASH_REMATCH[1] >= 4)); check "sinfo shows the node idle with >= 4 CPUs" $?
again=$("$CL" start --dir "$CDIR" 2>&1)
[[ $? == 0 && $again == *"already running"* ]]; check "start again: already running" $?
"$CL" status --dir "$CDIR" >/dev/null 2>&1; check "status: up" $?

# wait_job ID TIMEOUT: polls until the job ends; sets STATE, EXIT, RESTARTS.
wait_job() {
  local end=$((SECONDS + $2)) info
  STATE="" EXIT="" RESTARTS=""
  while ((SECONDS < end)); do
    info=$(scontrol -o show job "$1" 2>/dev/null)
    STATE=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info")
    EXIT=$(sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p' <<<"$info")
    RESTARTS=$(sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' <<<"$info")
    case "$STATE" in
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE) return 0 ;;
    esac
    sleep 0.2
  done
  STATE="${STATE:-unknown} (timed out after $2 s)"
  return 1
}
# wait_running ID TIMEOUT
wait_running() {
  local end=$((SECONDS + $2))
  while ((SECONDS < end)); do
    scontrol -o show job "$1" 2>/dev/null | grep -q "JobState=RUNNING" && return 0
    sleep 0.2
  done
  return 1
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

cd "$TMP" || exit 1
# (a) srun --mpi=pmix: bam prints its version on rank 0 only, so one line means one 2-rank
# world (two lines would mean two singletons: PMIx not wired up).
t0=$(date +%s.%N)
id=$(sbatch --parsable -n 2 -o "$TMP/a.out" --wrap "srun --mpi=pmix -n 2 $BAM version")
wait_job "$id" 30
echo "     srun job $id: $STATE, exit $EXIT, $(elapsed "$t0")s from submit to end"
[[ $STATE == COMPLETED && $EXIT == 0:0 ]]; check "srun --mpi=pmix job completes, exit 0" $?
[[ $(grep -c '^bam ' "$TMP/a.out") == 1 ]]; check "srun: one 2-rank MPI world (one version line)" $?
[[ $STATE == COMPLETED ]] || show "$TMP/a.out"

# (b) mpirun inside a 2-task allocation.
t0=$(date +%s.%N)
id=$(sbatch --parsable -n 2 -o "$TMP/b.out" --wrap "mpirun $BAM version")
wait_job "$id" 30
echo "     mpirun job $id: $STATE, exit $EXIT, $(elapsed "$t0")s from submit to end"
[[ $STATE == COMPLETED && $EXIT == 0:0 ]]; check "mpirun job completes, exit 0" $?
[[ $(grep -c '^bam ' "$TMP/b.out") == 1 ]]; check "mpirun: one 2-rank MPI world (one version line)" $?
[[ $STATE == COMPLETED ]] || show "$TMP/b.out"

# (c) slurm/pretrain.sbatch trains the tiny model on 2 ranks.
if [[ -z ${BAM_RESUME_FLAG+x} ]]; then
  if grep -qa -- "--resume" "$BAM"; then BAM_RESUME_FLAG=--resume; else BAM_RESUME_FLAG=""; fi
fi
export BAM_RESUME_FLAG
if [[ ! -d $DATA || -z $(ls -A "$DATA" 2>/dev/null) ]]; then
  check "pretrain.sbatch: test data at $DATA (run data/prepare.sh --test)" 1
else
  t0=$(date +%s.%N)
  id=$(cd "$SRC" && sbatch --parsable -n 2 -c 1 -o "$TMP/c.out" slurm/pretrain.sbatch tests/configs/tiny.ini \
    --set data.dir="$DATA" --set run.out_dir="$TMP/run" --set train.steps=20)
  wait_job "$id" 120
  echo "     pretrain job $id (resume flag '${BAM_RESUME_FLAG}'): $STATE, exit $EXIT, $(elapsed "$t0")s"
  [[ $STATE == COMPLETED && $EXIT == 0:0 ]]; check "pretrain.sbatch job completes, exit 0" $?
  test -f "$TMP/run/final.h5"; check "pretrain.sbatch wrote final.h5" $?
  grep -qE "step +20/20" "$TMP/c.out"; check "pretrain.sbatch log shows step 20/20" $?
  grep -q "2 rank(s) x 1 thread(s), launcher srun" "$TMP/c.out"; check "pretrain.sbatch: 2 ranks x 1 thread via srun" $?
  [[ $STATE == COMPLETED ]] || show "$TMP/c.out"
  # The same job through mpirun inside the allocation: the same losses, bit for bit.
  t0=$(date +%s.%N)
  id=$(cd "$SRC" && BAM_LAUNCHER=mpirun sbatch --parsable -n 2 -c 1 -o "$TMP/c2.out" slurm/pretrain.sbatch \
    tests/configs/tiny.ini --set data.dir="$DATA" --set run.out_dir="$TMP/run2" --set train.steps=20)
  wait_job "$id" 120
  echo "     pretrain job $id (BAM_LAUNCHER=mpirun): $STATE, exit $EXIT, $(elapsed "$t0")s"
  [[ $STATE == COMPLETED && $EXIT == 0:0 ]] && test -f "$TMP/run2/final.h5" && grep -qE "step +20/20" "$TMP/c2.out"
  check "pretrain.sbatch with BAM_LAUNCHER=mpirun completes and writes final.h5" $?
  [[ $STATE == COMPLETED ]] || show "$TMP/c2.out"
  [[ -s $TMP/run/metrics.csv ]] && cmp -s <(cut -d, -f1-5 "$TMP/run/metrics.csv") <(cut -d, -f1-5 "$TMP/run2/metrics.csv")
  check "srun and mpirun runs: identical losses" $?
fi

# (d) scontrol requeue reruns a job, which appends to its output.
id=$(sbatch --parsable --requeue --open-mode=append -o "$TMP/d.out" \
  --wrap 'echo "run ${SLURM_RESTART_COUNT:-0}"; [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] || sleep 300')
t0=$(date +%s.%N)
wait_running "$id" 20 && sleep 0.5 && scontrol requeue "$id"
check "scontrol requeue accepted" $?
wait_job "$id" 60
echo "     requeued job $id: $STATE, exit $EXIT, restarts $RESTARTS, $(elapsed "$t0")s from requeue to end"
[[ $STATE == COMPLETED && $RESTARTS == 1 ]] && grep -q "^run 0$" "$TMP/d.out" && grep -q "^run 1$" "$TMP/d.out"
check "requeued job reruns (restart count 1) and appends to its output" $?

# (f) Preemption: `scontrol requeue` of a running pretrain.sbatch job. Its ranks get SIGTERM,
# checkpoint and stop; the requeued job resumes from that checkpoint and finishes, and its log
# holds every step exactly once.
if [[ -n $BAM_RESUME_FLAG && -d $DATA ]]; then
  t0=$(date +%s.%N)
  id=$(cd "$SRC" && sbatch --parsable -n 2 -c 1 -o "$TMP/f.out" slurm/pretrain.sbatch tests/configs/tiny.ini \
    --set data.dir="$DATA" --set run.out_dir="$TMP/runf" --set train.steps=1500 --set train.log_every=50 \
    --set eval.every=0 --set ckpt.every=500)
  for _ in $(seq 300); do [[ -f $TMP/runf/metrics.csv ]] && (( $(wc -l <"$TMP/runf/metrics.csv") > 4 )) && break; sleep 0.1; done
  scontrol requeue "$id"
  check "preemption: scontrol requeue of a running pretrain job accepted" $?
  wait_job "$id" 240
  echo "     preempted pretrain job $id: $STATE, exit $EXIT, restarts $RESTARTS, $(elapsed "$t0")s"
  [[ $STATE == COMPLETED && $RESTARTS == 1 ]] && test -f "$TMP/runf/final.h5"
  check "preemption: the requeued job completes and writes final.h5" $?
  grep -q "stopping on signal" "$TMP/f.out" && grep -q "resumed from" "$TMP/f.out"
  check "preemption: checkpointed on SIGTERM, resumed from it" $?
  steps=$(cut -d, -f1 "$TMP/runf/metrics.csv" | tail -n +2)
  [[ $(sort -n <<<"$steps" | uniq -d | wc -l) == 0 && $(tail -1 <<<"$steps") == 1500 ]]
  check "preemption: every logged step once, up to 1500" $?
  [[ $fail == 0 ]] || show "$TMP/f.out"
fi

# (e) stop cancels a running job and stops every daemon it started.
id=$(sbatch --parsable -o /dev/null --wrap 'sleep 300')
wait_running "$id" 20
t0=$(date +%s.%N)
"$CL" stop --dir "$CDIR" >"$TMP/stop.log" 2>&1
rc=$?
echo "     stop: $(elapsed "$t0")s"
[[ $rc == 0 ]] && grep -q "cancelling jobs: $id" "$TMP/stop.log"; check "stop cancels the running job" $?
alive=0
for f in "$CDIR"/run/*.pid; do [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1; done
! "$CL" status --dir "$CDIR" >/dev/null 2>&1 && [[ $alive == 0 ]]; check "stop: no daemon left" $?
[[ $fail == 0 ]] || show "$TMP/stop.log"

finish
