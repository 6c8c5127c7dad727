#!/usr/bin/env bash
# The BTX-versus-BAM study (jobs/pipeline.sh) as a chain of Slurm jobs, one per stage:
#
#   seed ──> branch ──> mix ──┬─> train-btx-dm ───────────┐
#                             ├─> train-bam-dm             │
#                             ├─> train-bam-cm             ├──> eval ──> report
#                             ├─> train-bam-shared-kv-dm   │
#                             └─> train-bam-shared-kv-cm ──┘
#
# usage: slurm/pipeline.sh CONFIG [--run DIR] [--ranks N] [--cpus C] [--branch-ranks N]
#                          [--partition P] [--time T] [--dry-run] [--wait] [--wait-timeout S]
#
# Each job runs slurm/pipeline-stage.sbatch, i.e. `jobs/pipeline.sh CONFIG --run DIR --stage S`,
# and starts only when the jobs it reads from ended successfully (--dependency=afterok:...);
# the five mixture trainings are separate jobs that run in parallel. Jobs: seed (--ranks N tasks
# x --cpus C CPUs), branch (--branch-ranks tasks, default N x the number of expert domains:
# bam branch gives every expert its own group of N ranks), mix (the three mixtures, 1 task),
# one per training (N x C), eval (N x C), report (1 task). --kill-on-invalid-dep=yes: when a job
# fails, the jobs waiting for it are cancelled instead of pending forever.
#
# Requeue-safe: every job carries --requeue and --signal=B:USR1@120 (before a --time limit the
# stage checkpoints and requeues itself), and a requeued (or resubmitted) job resumes its stage
# from the DONE markers and checkpoints. Submitting the chain again for the same run reuses every
# finished stage; it is refused while a previous chain for that run is still in the queue.
#
# Prints the job ids (also written to RUN/slurm-jobs.txt, one "stage jobid" line each) and how to
# follow them. Stage logs: RUN/logs/<stage>-<jobid>.out (appended to when requeued); each
# stage's bam output is in its folder's log.txt as with jobs/pipeline.sh.
#   --dry-run        print the sbatch commands without submitting (no Slurm needed)
#   --wait           wait for the chain (polling scontrol, else sacct), print each job's state
#                    changes and the report; on a failed job print its log and exit 1
#   --wait-timeout S give up waiting after S seconds (exit 3; the jobs keep running)
# Submit from the folder that relative paths in the config resolve against (the repository
# root for configs/*.ini). Environment: BAM_SBATCH_ARGS (extra sbatch options for every job,
# e.g. "--account=a --qos=q --mem=8G"), and what jobs/pipeline.sh reads (BAM_BIN, BAM_DATA,
# BAM_SET, BAM_*_STEPS, BAM_EVAL_*, BAM_LAUNCHER), which the jobs inherit (sbatch --export=ALL).
set -uo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
usage() {
  sed -n '10,11s/^# *//p' "$0" >&2
  exit 2
}
die() { echo "slurm/pipeline: $*" >&2; exit 2; }

CONFIG="" RUN="" RANKS=1 CPUS=1 BRANCH_RANKS="" PARTITION="" TIME="" DRY=0 WAIT=0 WAIT_TIMEOUT=0
while (($#)); do
  case "$1" in
    --run) [[ $# -ge 2 ]] || usage; RUN=$2; shift 2 ;;
    --ranks) [[ $# -ge 2 ]] || usage; RANKS=$2; shift 2 ;;
    --cpus) [[ $# -ge 2 ]] || usage; CPUS=$2; shift 2 ;;
    --branch-ranks) [[ $# -ge 2 ]] || usage; BRANCH_RANKS=$2; shift 2 ;;
    --partition|-p) [[ $# -ge 2 ]] || usage; PARTITION=$2; shift 2 ;;
    --time|-t) [[ $# -ge 2 ]] || usage; TIME=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --wait) WAIT=1; shift ;;
    --wait-timeout) [[ $# -ge 2 ]] || usage; WAIT=1; WAIT_TIMEOUT=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "slurm/pipeline: unknown option '$1'" >&2; usage ;;
    *) [[ -z $CONFIG ]] || usage; CONFIG=$1; shift ;;
  esac
done
[[ -n $CONFIG ]] || usage
[[ -f $CONFIG ]] || die "config '$CONFIG' not found (working folder $(pwd))"
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
for v in RANKS CPUS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, not '${!v}'"
done
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds, not '$WAIT_TIMEOUT'"
if ((!DRY)); then
  for c in sbatch scontrol squeue; do
    command -v $c >/dev/null 2>&1 ||
      die "'$c' not found: this submits to a Slurm cluster (Debian: apt-get install slurm-wlm; a local one: slurm/local-cluster.sh start, then export SLURM_CONF=...). Without Slurm run the same stages locally: jobs/pipeline.sh $CONFIG"
  done
fi

# The config's settings (this also checks the config's [pipeline] section).
settings=$("$SRC/jobs/pipeline.sh" "$CONFIG" --settings) || exit 2
setting() { sed -n "s/^$1=//p" <<<"$settings"; }
DOMAINS=$(setting domains)
read -r -a TRAININGS <<<"$(setting trainings)"
IFS=, read -r -a DOM <<<"$DOMAINS"
[[ -n $BRANCH_RANKS ]] || BRANCH_RANKS=$((RANKS * ${#DOM[@]}))
[[ $BRANCH_RANKS =~ ^[1-9][0-9]*$ ]] || die "--branch-ranks must be a positive integer, not '$BRANCH_RANKS'"

[[ -n $RUN ]] || RUN=$SRC/runs/pipeline/$(basename "$CONFIG" .ini)
RUN=$(realpath -m "$RUN")
LOGS=$RUN/logs
JOBS_FILE=$RUN/slurm-jobs.txt

in_queue() { # in_queue ID...: "id name state" of those jobs still in the queue
  squeue -h -o '%i %j %T' 2>/dev/null | awk -v ids=" $* " 'index(ids, " " $1 " ")'
}
# A previous chain for this run still in the queue would run the same stages twice at once.
if ((!DRY)) && [[ -s $JOBS_FILE ]]; then
  queued=$(in_queue $(awk '{ print $2 }' "$JOBS_FILE"))
  [[ -z $queued ]] || die "a chain for $RUN is still in the queue (from $JOBS_FILE):
$queued
wait for it or cancel it (scancel $(awk '{ printf "%s ", $1 }' <<<"$queued")) first"
fi

COMMON=(--requeue --open-mode=append --signal=B:USR1@120 --kill-on-invalid-dep=yes
        --chdir="$(pwd)" --export="ALL,BAM_ROOT=$SRC")
[[ -n $PARTITION ]] && COMMON+=(--partition="$PARTITION")
[[ -n $TIME ]] && COMMON+=(--time="$TIME")
if [[ -n ${BAM_SBATCH_ARGS:-} ]]; then read -r -a extra <<<"$BAM_SBATCH_ARGS"; COMMON+=("${extra[@]}"); fi
STAGE_SCRIPT=$SRC/slurm/pipeline-stage.sbatch
PARGS=("$CONFIG" --run "$RUN" --ranks "$RANKS" --branch-ranks "$BRANCH_RANKS")

STAGES=() IDS=()
cancel_submitted() {
  ((${#IDS[@]})) || return 0
  echo "slurm/pipeline: cancelling the jobs already submitted: ${IDS[*]}" >&2
  scancel "${IDS[@]}" 2>/dev/null || true
}
# submit NAME DEPENDENCY-IDS(colon separated) TASKS CPUS STAGE: sets JOB to the job id
submit() {
  local name=$1 deps=$2 tasks=$3 cpus=$4 stage=$5 out
  local cmd=(sbatch --parsable --job-name="bam-$name" --output="$LOGS/$name-%j.out"
             --ntasks="$tasks" --cpus-per-task="$cpus" "${COMMON[@]}")
  [[ -n $deps ]] && cmd+=(--dependency="afterok:$deps")
  cmd+=("$STAGE_SCRIPT" "${PARGS[@]}" --stage "$stage")
  if ((DRY)); then
    JOB="\$JOB_${name//-/_}"
    local a line="" plain='^[A-Za-z0-9_./=:,%@+$-]+$'
    for a in "${cmd[@]}"; do
      if [[ $a =~ $plain ]]; then line+=" $a"; else line+=" $(printf '%q' "$a")"; fi
    done
    echo "JOB_${name//-/_}=\$(${line# })"
  else
    if ! out=$("${cmd[@]}" 2>&1); then
      echo "slurm/pipeline: submitting the $name job failed: $out" >&2
      cancel_submitted
      exit 1
    fi
    JOB=${out%%;*}
    [[ $JOB =~ ^[0-9]+$ ]] || { echo "slurm/pipeline: sbatch said '$out' for the $name job" >&2; cancel_submitted; exit 1; }
  fi
  STAGES+=("$name") IDS+=("$JOB")
}

((DRY)) || mkdir -p "$LOGS" || die "cannot create $LOGS"
((DRY)) && echo "# slurm/pipeline.sh --dry-run: the chain for $RUN (not submitted)"
submit seed "" "$RANKS" "$CPUS" seed; seed=$JOB
submit branch "$seed" "$BRANCH_RANKS" "$CPUS" branch; branch=$JOB
submit mix "$branch" 1 1 mix; mix=$JOB
train_ids=()
for r in "${TRAININGS[@]}"; do
  submit "train-$r" "$mix" "$RANKS" "$CPUS" "train-$r"
  train_ids+=("$JOB")
done
submit eval "$(IFS=:; echo "${train_ids[*]}")" "$RANKS" "$CPUS" eval; eval_id=$JOB
submit report "$eval_id" 1 1 report
((DRY)) && exit 0

{
  for i in "${!STAGES[@]}"; do echo "${STAGES[i]} ${IDS[i]}"; done
} >"$JOBS_FILE"
ALL=$(IFS=,; echo "${IDS[*]}")
echo "slurm/pipeline: $CONFIG -> $RUN: ${#IDS[@]} jobs submitted"
for i in "${!STAGES[@]}"; do printf '  %-24s %s\n' "${STAGES[i]}" "${IDS[i]}"; done
echo "  follow:  squeue -j $ALL"
echo "           sacct -j $ALL -X -o JobID,JobName%28,State,Start,End,Elapsed,ExitCode   (with accounting)"
echo "  logs:    $LOGS/<stage>-<jobid>.out; result: $RUN/report/report.md"
echo "  cancel:  scancel ${IDS[*]}"
((WAIT)) || exit 0

# ---- --wait: poll until every job ended.
job_state() { # job_state ID STAGE: the job's state; from the DONE marker once Slurm forgot it
  local s dir
  s=$(scontrol -o show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  if [[ -z $s ]] && command -v sacct >/dev/null 2>&1; then
    s=$(sacct -n -X -P -j "$1" -o State 2>/dev/null | head -1 | cut -d' ' -f1)
  fi
  if [[ -z $s ]]; then
    case $2 in
      branch) dir=experts ;; mix) dir=mix-bam-shared-kv ;; *) dir=$2 ;;
    esac
    if [[ -f $RUN/$dir/DONE ]]; then s=COMPLETED; else s=UNKNOWN; fi
  fi
  echo "$s"
}
declare -A LAST=()
t0=$SECONDS
while :; do
  pending=0 failed=""
  for i in "${!STAGES[@]}"; do
    st=$(job_state "${IDS[i]}" "${STAGES[i]}")
    if [[ ${LAST[$i]:-} != "$st" ]]; then
      printf '[%5ds] %-24s %-10s %s\n' $((SECONDS - t0)) "${STAGES[i]}" "${IDS[i]}" "$st"
      LAST[$i]=$st
    fi
    case $st in
      COMPLETED) ;;
      FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED|UNKNOWN)
        [[ -n $failed ]] || failed=$i ;;
      *) pending=1 ;;
    esac
  done
  if [[ -n $failed ]]; then
    name=${STAGES[failed]} id=${IDS[failed]}
    echo "slurm/pipeline: the $name job ($id) ended ${LAST[$failed]}; its log $LOGS/$name-$id.out:" >&2
    tail -n 40 "$LOGS/$name-$id.out" 2>/dev/null | sed 's/^/  | /' >&2
    echo "slurm/pipeline: jobs of the chain still in the queue: $(in_queue "${IDS[@]}" | awk '{ printf "%s ", $1 }')" >&2
    exit 1
  fi
  ((pending)) || break
  if ((WAIT_TIMEOUT > 0 && SECONDS - t0 >= WAIT_TIMEOUT)); then
    echo "slurm/pipeline: still running after ${WAIT_TIMEOUT}s: squeue -j $ALL" >&2
    exit 3
  fi
  sleep 2
done
echo "slurm/pipeline: the chain finished in $((SECONDS - t0))s: $RUN/report/report.md, $RUN/report/results.csv"
cat "$RUN/report/report.md"
