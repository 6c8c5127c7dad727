#!/usr/bin/env bash
# slurm/pipeline.sh through a real local Slurm cluster (slurm/local-cluster.sh, own folder and
# ports): the study of configs/tiny-pipeline.ini (its [pipeline] steps) on the test data as a
# chain of 10 jobs, beside the same study run locally by jobs/pipeline.sh. Checks:
#   - --dry-run prints the 10 sbatch commands and their afterok dependencies without Slurm;
#     submitting without sbatch fails with a clear message;
#   - a second submission for the same run is refused while the chain is queued;
#   - the mixture training train-bam-dm is requeued (scontrol requeue) once its first checkpoint
#     exists: it stops on the signal and its restart resumes from the checkpoint (or, had it
#     already passed its last step, resumes from the final checkpoint with nothing left to
#     train; had it finished, skips the stage);
#   - every job completes; --wait prints the report; every artifact, DONE marker, eval output,
#     routing CSV and stage log exists; report.md and results.csv have a row per model;
#   - the chain's numbers equal the local run's exactly: results.csv byte for byte, every
#     model's eval lines (loss, perplexity, bits per byte per domain), and eval/DONE, which holds
#     every evaluated checkpoint's identity (step, tokens, shard CRC-32Cs); the Slurm branch job
#     ran 3 ranks (one group per expert), the local one 1 rank;
#   - the dependencies were real (scontrol): branch started after seed ended, the five trainings
#     ran as five jobs that started after mix ended and overlapped in time, eval started after
#     the last training ended, report after eval;
#   - a chain whose seed fails (a bad --set) ends: --wait exits 1 naming the seed job and showing
#     its log, and the nine waiting jobs are cancelled instead of pending forever.
# The cluster is always stopped on exit. Environment: BAM_BIN, BAM_SOURCE_DIR, BAM_TEST_DATA.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?}
CL=$SRC/slurm/local-cluster.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export BAM_BIN=$BAM BAM_DATA=$DATA
# The config's [pipeline] section sets the steps; nothing in the environment may change them.
unset BAM_DOMAINS BAM_BRANCH_STEPS BAM_MIX_STEPS BAM_EVAL_TOKENS BAM_EVAL_DOMAINS BAM_SET \
  BAM_LAUNCHER BAM_BRANCH_RANKS RANKS BAM_SBATCH_ARGS
# Run outside any enclosing Slurm job: only our own cluster's settings count.
for v in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_' || true); do unset "$v"; done

pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
finish() { echo "$pass passed, $fail failed"; ((fail == 0)); exit $?; }
for c in slurmctld slurmd munged sbatch scontrol; do
  command -v $c >/dev/null 2>&1 || { check "$c installed (apt-get install slurm-wlm munge)" 1; finish; }
done
[[ -d $DATA && -n $(ls -A "$DATA" 2>/dev/null) ]] || { check "test data at $DATA (data/prepare.sh --test)" 1; finish; }

TMP=$(mktemp -d /tmp/bam-test-pipeline-slurm-XXXXXX)
chmod 0755 "$TMP"
CDIR=$TMP/cluster
LOCAL_PID=""
cleanup() {
  local rc=$?
  [[ -n $LOCAL_PID ]] && kill -TERM -- -"$LOCAL_PID" 2>/dev/null
  "$CL" stop --dir "$CDIR" >/dev/null 2>&1 || echo "warning: stopping the cluster failed"
  [[ -n $LOCAL_PID ]] && wait "$LOCAL_PID" 2>/dev/null
  if ((rc == 0 && fail == 0)); then rm -rf "$TMP"; else echo "kept $TMP (its runs and Slurm logs) for a look"; fi
  ((rc == 0 && fail == 0)) || exit $((rc ? rc : 1))
}
trap cleanup EXIT
trap 'exit 130' INT TERM
show() { # show FILE [LINES]: a file's last lines, indented
  [[ -f $1 ]] && tail -n "${2:-40}" "$1" | sed 's/^/     | /'
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
T0=$(date +%s.%N)
cd "$SRC" || exit 1
CFG=configs/tiny-pipeline.ini
MODELS=(seed expert-code expert-math expert-legal btx-dm bam-dm bam-cm bam-shared-kv-dm bam-shared-kv-cm)
TRAIN=(btx-dm bam-dm bam-cm bam-shared-kv-dm bam-shared-kv-cm)

# ---- 1. --dry-run needs no Slurm; a real submission without sbatch fails clearly.
mkdir -p "$TMP/nobin"
cp -s /usr/bin/* "$TMP/nobin/" 2>/dev/null
rm -f "$TMP/nobin/sbatch"
PATH=$TMP/nobin slurm/pipeline.sh $CFG --run "$TMP/dry" --dry-run >"$TMP/dry.txt" 2>&1
rc=$?
deps() { # deps STAGE: the --dependency of the stage's sbatch line
  grep "^JOB_$1=" "$TMP/dry.txt" | grep -o -- '--dependency=[^ ]*' | sed 's/--dependency=//'
}
ok=1
[[ $rc == 0 && $(grep -c '^JOB_[a-z_]*=$(sbatch ' "$TMP/dry.txt") == 10 && ! -e $TMP/dry ]] || ok=0
[[ -z $(deps seed) && $(deps branch) == 'afterok:$JOB_seed' && $(deps mix) == 'afterok:$JOB_branch' ]] || ok=0
for r in "${TRAIN[@]}"; do [[ $(deps "train_${r//-/_}") == 'afterok:$JOB_mix' ]] || ok=0; done
[[ $(deps eval) == 'afterok:$JOB_train_btx_dm:$JOB_train_bam_dm:$JOB_train_bam_cm:$JOB_train_bam_shared_kv_dm:$JOB_train_bam_shared_kv_cm' ]] || ok=0
[[ $(deps report) == 'afterok:$JOB_eval' ]] || ok=0
grep "^JOB_branch=" "$TMP/dry.txt" | grep -q -- '--ntasks=3 ' || ok=0
[[ $(grep -c -- '--requeue .*--signal=B:USR1@120 .*--kill-on-invalid-dep=yes' "$TMP/dry.txt") == 10 ]] || ok=0
check "--dry-run (no sbatch on PATH): 10 sbatch commands, afterok chain, 5 trainings on mix, eval on all 5, branch 3 ranks, requeue flags" $((1 - ok))
((ok)) || show "$TMP/dry.txt"
PATH=$TMP/nobin slurm/pipeline.sh $CFG --run "$TMP/nosbatch" >"$TMP/nosbatch.txt" 2>&1
rc=$?
[[ $rc != 0 ]] && grep -q "'sbatch' not found" "$TMP/nosbatch.txt" && grep -q "jobs/pipeline.sh" "$TMP/nosbatch.txt"
check "without sbatch: a clear error (exit $rc) pointing to jobs/pipeline.sh" $?

# ---- 2. The cluster, on two free ports away from Slurm's and the script's defaults.
port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
for ((i = 0; i < 50; i++)); do
  base=$((20000 + (RANDOM % 20000) * 2))
  port_free $base && port_free $((base + 1)) && break
done
export BAM_SLURM_CTLD_PORT=$base BAM_SLURM_SLURMD_PORT=$((base + 1))
"$CL" start --dir "$CDIR" >"$TMP/start.log" 2>&1
rc=$?
check "local cluster starts (ports $base/$((base + 1)))" $rc
if [[ $rc != 0 ]]; then show "$TMP/start.log"; finish; fi
export SLURM_CONF=$CDIR/slurm.conf

# ---- 3. The local run (in the background, its own process group) and the Slurm chain.
setsid jobs/pipeline.sh $CFG --run "$TMP/local" >"$TMP/local.log" 2>&1 &
LOCAL_PID=$!
S=$TMP/slurm
slurm/pipeline.sh $CFG --run "$S" --ranks 1 --cpus 1 --wait --wait-timeout 400 >"$TMP/wait.log" 2>&1 &
WAIT_PID=$!
for _ in $(seq 100); do [[ -s $S/slurm-jobs.txt ]] && break; sleep 0.1; done
declare -A ID=()
while read -r stage id; do ID[$stage]=$id; done <"$S/slurm-jobs.txt" 2>/dev/null
[[ ${#ID[@]} == 10 ]]; check "chain submitted: 10 jobs (${ID[*]:-none})" $?
if [[ ${#ID[@]} != 10 ]]; then sleep 1; show "$TMP/wait.log"; finish; fi

slurm/pipeline.sh $CFG --run "$S" --ranks 1 --cpus 1 >"$TMP/again.log" 2>&1
[[ $? != 0 ]] && grep -q "still in the queue" "$TMP/again.log"
check "a second submission for the same run is refused while the chain is queued" $?

# Requeue train-bam-dm as soon as its first checkpoint is published (ckpt/latest).
id=${ID[train-bam-dm]}
for _ in $(seq 1800); do
  [[ -e $S/train-bam-dm/ckpt/latest ]] && break
  kill -0 "$WAIT_PID" 2>/dev/null || break
  sleep 0.1
done
state=$(scontrol -o show job "$id" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
scontrol requeue "$id"
check "scontrol requeue of train-bam-dm (job $id, $state at the time) accepted" $?
was_running=0
[[ $state == RUNNING ]] && was_running=1

# ---- 4. Wait for both runs.
wait "$WAIT_PID"
rc=$?
echo "     chain and local run: $(elapsed "$T0")s since the test started"
[[ $rc == 0 ]] && grep -q "the chain finished" "$TMP/wait.log" && grep -q '^| bam-shared-kv-cm |' "$TMP/wait.log"
check "slurm/pipeline.sh --wait: the chain finishes (exit $rc) and prints the report" $?
[[ $rc == 0 ]] || show "$TMP/wait.log" 60
wait "$LOCAL_PID"
rc=$?
LOCAL_PID=""
check "the local run (jobs/pipeline.sh) finishes" $rc
[[ $rc == 0 ]] || show "$TMP/local.log"

declare -A START END STATE
bad=""
for s in "${!ID[@]}"; do
  info=$(scontrol -o show job "${ID[$s]}" 2>/dev/null)
  STATE[$s]=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info")
  exit_code=$(sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p' <<<"$info")
  START[$s]=$(date -d "$(sed -n 's/.* StartTime=\([^ ]*\).*/\1/p' <<<"$info")" +%s 2>/dev/null || echo 0)
  END[$s]=$(date -d "$(sed -n 's/.* EndTime=\([^ ]*\).*/\1/p' <<<"$info")" +%s 2>/dev/null || echo 0)
  [[ ${STATE[$s]} == COMPLETED && $exit_code == 0:0 ]] || bad+=" $s:${STATE[$s]:-gone}:$exit_code"
done
[[ -z $bad ]]; check "every job COMPLETED with exit 0:0${bad:+ (not:$bad)}" $?
for s in "${!ID[@]}"; do
  [[ ${STATE[$s]} == COMPLETED ]] || { echo "     --- $s (${ID[$s]})"; show "$S/logs/$s-${ID[$s]}.out"; }
done
if [[ -n $bad ]]; then # what each training left behind (a later stage may have failed on it)
  for d in "$S"/train-*; do
    echo "     --- $d"
    ls -la "$d" "$d/ckpt" 2>&1 | sed 's/^/     | /'
    show "$d/log.txt" 6
  done
fi

info=$(scontrol -o show job "$id")
restarts=$(sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' <<<"$info")
log=$S/logs/train-bam-dm-$id.out
tlog=$S/train-bam-dm/log.txt
if ((was_running)) && ! grep -q "stopping on signal" "$tlog" && grep -q "resumed from $S/train-bam-dm/ckpt/step-000010: step 10" "$tlog"; then
  # RUNNING when requeued, but past its last step (evaluating or writing final.h5): the
  # restart resumes from the final checkpoint with no step left and finishes the stage.
  [[ $restarts == 1 ]] && grep -q "restart 1 " "$log" && grep -q "wrote $S/train-bam-dm/final.h5" "$tlog"
  check "requeued after its last step (still RUNNING): restarted once, resumed from the final checkpoint" $?
elif ((was_running)); then
  [[ $restarts == 1 ]] && grep -q "restart 0 " "$log" && grep -q "restart 1 " "$log" &&
    grep -q "stopping on signal" "$tlog" && grep -q "resumed from $S/train-bam-dm/ckpt/step-" "$tlog"
  check "requeued while training: stopped on the signal, restarted once, resumed from its checkpoint" $?
else
  [[ $restarts == 1 ]] && grep -q "restart 1 " "$log" && grep -q "train bam dm (10 steps): skipped" "$log"
  check "requeued after it finished (it was $state): restarted once, the stage skipped" $?
fi
[[ $fail == 0 ]] || { show "$log"; show "$S/train-bam-dm/log.txt" 20; }

# ---- 5. Artifacts, report, equality with the local run.
missing=0
for f in seed/ckpt/latest experts/code/ckpt/latest experts/math/ckpt/latest experts/legal/ckpt/latest \
  mix-btx/ckpt/latest mix-bam/ckpt/latest mix-bam-shared-kv/ckpt/latest report/report.md report/results.csv; do
  [[ -e $S/$f ]] || { echo "     missing $f"; missing=1; }
done
for d in seed experts mix-btx mix-bam mix-bam-shared-kv eval report; do
  [[ -s $S/$d/DONE ]] || { echo "     missing $d/DONE"; missing=1; }
done
for m in "${MODELS[@]}"; do
  [[ -s $S/eval/$m.txt ]] || { echo "     missing eval/$m.txt"; missing=1; }
  [[ $m == seed || $m == expert-* ]] && continue
  [[ -s $S/train-$m/DONE && -e $S/train-$m/ckpt/latest && -s $S/eval/$m.routing.csv ]] ||
    { echo "     missing train-$m/DONE, its checkpoint or eval/$m.routing.csv"; missing=1; }
done
for s in "${!ID[@]}"; do
  grep -q "exited with status 0" "$S/logs/$s-${ID[$s]}.out" 2>/dev/null || { echo "     no finished log logs/$s-${ID[$s]}.out"; missing=1; }
done
check "every artifact, DONE marker, eval output, routing CSV and stage log (logs/<stage>-<jobid>.out)" $missing
bad=0
for m in "${MODELS[@]}"; do
  [[ $(grep -c "^| $m |" "$S/report/report.md") == 1 && $(grep -c "^$m," "$S/report/results.csv") == 1 ]] ||
    { echo "     no single row for $m"; bad=1; }
done
check "report.md and results.csv: one row per model (${#MODELS[@]})" $bad

cmp "$S/report/results.csv" "$TMP/local/report/results.csv"
check "results.csv of the chain equals the local run's byte for byte" $?
bad=0
for m in "${MODELS[@]}"; do
  a=$(grep -E '^(general|code|math|legal|reference|average) ' "$S/eval/$m.txt")
  b=$(grep -E '^(general|code|math|legal|reference|average) ' "$TMP/local/eval/$m.txt")
  [[ -n $a && $a == "$b" ]] || { echo "     eval/$m.txt differs"; diff <(echo "$a") <(echo "$b") | head -6; bad=1; }
done
cmp -s "$S/eval/DONE" "$TMP/local/eval/DONE" || { echo "     eval/DONE (checkpoint identities) differ"; bad=1; }
check "every model's eval lines and checkpoint identity (eval/DONE: step, tokens, shard CRCs) equal the local run's" $bad
echo "     $(grep -c ' = ' "$S/eval/DONE") lines of eval/DONE compared; e.g. $(grep '^bam-dm = ' "$S/eval/DONE")"

# ---- 6. The dependencies were real.
ok=1
trains=()
for r in "${TRAIN[@]}"; do trains+=("${ID[train-$r]}"); done
[[ $(printf '%s\n' "${trains[@]}" | sort -u | wc -l) == 5 ]] || { echo "     the trainings are not 5 jobs"; ok=0; }
((${START[branch]} >= ${END[seed]} && ${START[mix]} >= ${END[branch]})) || { echo "     branch/mix started early"; ok=0; }
last_train=0
for r in "${TRAIN[@]}"; do
  ((${START[train-$r]} >= ${END[mix]})) || { echo "     train-$r started before mix ended"; ok=0; }
  [[ $r == bam-dm && $was_running == 0 ]] && continue # requeued after it had finished
  ((${END[train-$r]} > last_train)) && last_train=${END[train-$r]}
done
((${START[eval]} >= last_train && ${START[report]} >= ${END[eval]})) || { echo "     eval/report started early"; ok=0; }
overlap=0
for a in "${TRAIN[@]}"; do
  for b in "${TRAIN[@]}"; do
    [[ $a < $b ]] || continue
    ((${START[train-$a]} < ${END[train-$b]} && ${START[train-$b]} < ${END[train-$a]})) && overlap=$((overlap + 1))
  done
done
((overlap >= 1)) || { echo "     no two trainings overlapped in time"; ok=0; }
scontrol -o show job "${ID[branch]}" | grep -q "NumTasks=3 " || { echo "     the branch job did not have 3 tasks"; ok=0; }
echo "     seed $(date -d @"${START[seed]}" +%T)-$(date -d @"${END[seed]}" +%T), mix ended $(date -d @"${END[mix]}" +%T)," \
  "trainings started $(for r in "${TRAIN[@]}"; do date -d @"${START[train-$r]}" +%T; done | sort | paste -sd' ' -)," \
  "eval $(date -d @"${START[eval]}" +%T)-$(date -d @"${END[eval]}" +%T); $overlap overlapping training pairs"
check "dependencies: seed < branch (3 tasks) < mix < 5 separate, overlapping training jobs < eval < report" $((1 - ok))

# ---- 7. A failing stage ends the chain.
BAM_SET="bogus.key=1" slurm/pipeline.sh $CFG --run "$TMP/bad" --wait --wait-timeout 120 >"$TMP/bad.log" 2>&1
rc=$?
[[ $rc == 1 ]] && grep -q "the seed job .* ended FAILED" "$TMP/bad.log" && grep -q "unknown section \[bogus\]" "$TMP/bad.log"
check "a failing seed: --wait exits 1 naming the seed job and showing its log" $?
[[ $fail == 0 ]] || show "$TMP/bad.log"
left=""
for _ in $(seq 150); do
  left=$(squeue -h -o '%i' | paste -sd' ' -)
  [[ -z $left ]] && break
  sleep 0.2
done
ncancel=0
while read -r s i; do
  [[ $s == seed ]] && continue
  scontrol -o show job "$i" 2>/dev/null | grep -q "JobState=CANCELLED" && ncancel=$((ncancel + 1))
done <"$TMP/bad/slurm-jobs.txt"
[[ -z $left && $ncancel == 9 ]]
check "the 9 jobs waiting for it are cancelled, not left pending (queue: '${left}')" $?

echo "     total $(elapsed "$T0")s"
finish
