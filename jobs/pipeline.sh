#!/usr/bin/env bash
# The whole BTX-versus-BAM study from one config (docs/method.md sections 1 and 5):
#   seed                  bam pretrain                          -> RUN/seed
#   branch                bam branch (one expert per domain)    -> RUN/experts/<domain>
#   mix-<method>          btx, bam, bam-shared-kv               -> RUN/mix-<method>
#   train-<method>-dm     every mixture data-matched (DM: BTX's steps and tokens) -> RUN/train-<method>-dm
#   train-<method>-cm     the BAM kinds also compute-matched (CM: steps = BTX steps x FLOPs/token(BTX) /
#                         FLOPs/token(method), rounded down; training FLOPs = 3 x forward) -> RUN/train-<method>-cm
#   eval                  every model on general, every domain and the held-out reference domain
#                         -> RUN/eval/<model>.txt (+ <model>.routing.csv for mixtures)
#   report                RUN/report/ (bam report: report.md, results.csv, PNG figures): perplexity per domain, average, bits per
#                         byte, steps, tokens and training FLOPs per model and per stage
#
# usage: jobs/pipeline.sh CONFIG [--run DIR] [--ranks N] [--branch-ranks N] [--stage NAME[,NAME...]]
#        jobs/pipeline.sh CONFIG --settings      (print the resolved settings and stage names, exit)
#
# --stage all (the default) runs every stage in order. --stage NAME (repeatable, or a comma list)
# runs only those: seed, branch, mix-btx, mix-bam, mix-bam-shared-kv, train-btx-dm, train-bam-dm,
# train-bam-cm, train-bam-shared-kv-dm, train-bam-shared-kv-cm, eval, report; `mix` and `train`
# name all mixes and all trainings. A stage run alone needs its inputs finished (the seed and
# branch stages, its mixture, mix-btx for a compute-matched run, every training for eval) and
# stops with an error naming the missing stage otherwise. slurm/pipeline.sh runs each stage as
# its own Slurm job this way.
#
# Settings: the config's [pipeline] section (validated by bam like every key; bam's training
# ignores it): domains (default code,math,legal), branch_steps and mix_steps (0 or absent: the
# config's train.steps, which are the seed's), eval_tokens (per domain, default 131072; 0: the
# whole validation split), eval_domains (default general, the domains, reference). The
# environment overrides them (below).
#
# Restartable: a finished stage writes <its folder>/DONE last, holding what it consumed (a
# checksum of the config's settings outside [pipeline] and the overrides, its own settings; or
# the identity of its input checkpoints: kind, step, tokens and shard CRCs from `bam inspect`). A stage whose DONE
# matches is skipped ("skipped"); a half-done training stage continues from its latest checkpoint
# (--resume); a half-made mixture is made again; the eval stage keeps finished models. A DONE
# that does not match (the config or an input changed) is an error: remove that stage's folder
# (and the later ones) to redo it. A bam stopped by SIGTERM (it checkpoints first) makes this
# script exit with status 143: run it again to resume.
#
# Launcher: inside a Slurm allocation (SLURM_JOB_ID set) `srun --mpi=pmix --kill-on-bad-exit=1
# -n RANKS [--cpus-per-task=SLURM_CPUS_PER_TASK]`, else `mpirun -np RANKS --bind-to none`
# (BAM_LAUNCHER=srun|mpirun chooses; mpirun inside an allocation is Open MPI's own launcher, as in
# slurm/pretrain.sbatch). `bam mix` and `bam inspect` run as single processes.
#
# Environment:
#   BAM_BIN            the bam program (default build/bam)
#   BAM_DATA           prepared data folder, overrides data.dir of the config
#   BAM_DOMAINS        expert domains (overrides pipeline.domains)
#   BAM_BRANCH_STEPS   steps of each domain expert (overrides pipeline.branch_steps)
#   BAM_MIX_STEPS      steps of the data-matched mixture runs (overrides pipeline.mix_steps)
#   BAM_EVAL_TOKENS    tokens per domain evaluated (overrides pipeline.eval_tokens)
#   BAM_EVAL_DOMAINS   domains evaluated (overrides pipeline.eval_domains)
#   BAM_SET            extra "section.key=value" overrides for every training stage, space separated
#   RANKS              MPI ranks (default 1, or SLURM_NTASKS inside an allocation; --ranks wins);
#   BAM_BRANCH_RANKS   ranks of the branch stage (default RANKS; --branch-ranks wins): bam branch
#                      gives each expert a group of ranks (one group per domain when there are
#                      at least as many ranks as domains)
#   OMP_NUM_THREADS    threads per rank (default SLURM_CPUS_PER_TASK inside an allocation, else
#                      cores / ranks)
#   BAM_LAUNCHER       srun or mpirun (see above); MPIEXEC the mpirun program (default mpirun)
#   BAM_PYTHON         python3 for the settings and the report (default python3)
set -euo pipefail

usage() {
  echo "usage: jobs/pipeline.sh CONFIG [--run DIR] [--ranks N] [--branch-ranks N] [--stage NAME[,NAME...]|all] [--settings]" >&2
  exit 2
}
die() { echo "pipeline: $*" >&2; exit 2; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
CONFIG="" RUN="" RANKS_ARG="" BRANCH_RANKS_ARG="" SETTINGS=0
STAGE_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) [[ $# -ge 2 ]] || usage; RUN=$2; shift 2 ;;
    --ranks) [[ $# -ge 2 ]] || usage; RANKS_ARG=$2; shift 2 ;;
    --branch-ranks) [[ $# -ge 2 ]] || usage; BRANCH_RANKS_ARG=$2; shift 2 ;;
    --stage) [[ $# -ge 2 ]] || usage; STAGE_ARGS+=("$2"); shift 2 ;;
    --stage=*) STAGE_ARGS+=("${1#--stage=}"); shift ;;
    --settings) SETTINGS=1; shift ;;
    -h|--help) usage ;;
    -*) echo "pipeline: unknown option '$1'" >&2; usage ;;
    *) [[ -z $CONFIG ]] || usage; CONFIG=$1; shift ;;
  esac
done
[[ -n $CONFIG ]] || usage
[[ -f $CONFIG ]] || die "config '$CONFIG' not found"
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
PY=${BAM_PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "no python3 ($PY): install python3 or set BAM_PYTHON"

# ---- settings: [train] steps and the [pipeline] section, read the way bam's INI parser (inih)
# reads them, with the same checks as src/core/config.c. The config's checksum covers every
# "section.key = value" outside [pipeline], in file order: comments, blank lines, spacing and
# the pipeline's own settings do not change it.
read_settings() {
  "$PY" - "$CONFIG" <<'PY'
import hashlib, re, shlex, sys
path = sys.argv[1]
raw = open(path, "rb").read()
sec, canon, vals = "", [], {}
def fail(line, msg):
    sys.exit(f"pipeline: {path}:{line}: {msg}" if line else f"pipeline: {path}: {msg}")
for no, b in enumerate(raw.splitlines(keepends=True), 1):
    s = b.decode("utf-8", "replace").strip()
    head = re.match(r"^\[([^\]]*)\]", s)
    if head:
        sec = head.group(1).strip()
    if head or not s or s[0] in ";#":
        continue
    m = re.match(r"^([^=:]*?)\s*[=:](.*)$", s)
    if not m:
        continue  # bam reports malformed lines when it reads the config
    v = re.sub(r"\s;.*$", "", m.group(2)).strip()
    vals[(sec, m.group(1).strip())] = (v, no)
    if sec != "pipeline":
        canon.append(f"{sec}.{m.group(1).strip()} = {v}\n")
def get(sec, key, default):
    return vals.get((sec, key), (default, 0))
def integer(sec, key, default, hi):
    v, no = get(sec, key, default)
    if not re.fullmatch(r"[+-]?\d+", v):
        fail(no, f"{sec}.{key} must be an integer, not '{v}'")
    if not 0 <= int(v) <= hi:
        fail(no, f"{sec}.{key} = {v} is out of range [0, {hi}]")
    return int(v)
def domains(key, default, empty_ok):
    v, no = get("pipeline", key, default)
    if not v:
        if empty_ok:
            return v
        fail(no, f"pipeline.{key} is empty")
    seen = set()
    for n in v.split(","):
        if not n:
            fail(no, f"pipeline.{key} '{v}' has an empty domain name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", n):
            fail(no, f"pipeline.{key} '{v}': domain names are letters, digits, '_', '-' and '.'")
        if n in seen:
            fail(no, f"pipeline.{key} '{v}' names '{n}' twice")
        seen.add(n)
    return v
known = {"domains", "branch_steps", "mix_steps", "eval_tokens", "eval_domains"}
for (s, k), (v, no) in vals.items():
    if s == "pipeline" and k not in known:
        fail(no, f"unknown key '{k}' in section [pipeline]")
if ("train", "steps") not in vals:
    fail(0, "no train.steps (the seed's steps)")
out = {"CFG_STEPS": integer("train", "steps", "", 10**9),
       "CFG_DOMAINS": domains("domains", "code,math,legal", False),
       "CFG_BRANCH_STEPS": integer("pipeline", "branch_steps", "0", 10**9),
       "CFG_MIX_STEPS": integer("pipeline", "mix_steps", "0", 10**9),
       "CFG_EVAL_TOKENS": integer("pipeline", "eval_tokens", "131072", 1 << 30),
       "CFG_EVAL_DOMAINS": domains("eval_domains", "", True),
       "CFG_SUM": hashlib.sha256("".join(canon).encode()).hexdigest()[:16]}
for k, v in out.items():
    print(f"{k}={shlex.quote(str(v))}")
PY
}
settings=$(read_settings) || exit 2
eval "$settings"
uint() { # uint NAME VALUE: a non-negative integer or exit
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, not '$2'"
}
DOMAINS=${BAM_DOMAINS:-$CFG_DOMAINS}
[[ $DOMAINS =~ ^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$ ]] || die "BAM_DOMAINS '$DOMAINS' is not a comma-separated list of domain names"
BRANCH_STEPS=${BAM_BRANCH_STEPS:-$CFG_BRANCH_STEPS}
MIX_STEPS=${BAM_MIX_STEPS:-$CFG_MIX_STEPS}
EVAL_TOKENS=${BAM_EVAL_TOKENS:-$CFG_EVAL_TOKENS}
uint BAM_BRANCH_STEPS "$BRANCH_STEPS"
uint BAM_MIX_STEPS "$MIX_STEPS"
uint BAM_EVAL_TOKENS "$EVAL_TOKENS"
((BRANCH_STEPS > 0)) || BRANCH_STEPS=$CFG_STEPS
((MIX_STEPS > 0)) || MIX_STEPS=$CFG_STEPS
EVAL_DOMAINS=${BAM_EVAL_DOMAINS:-$CFG_EVAL_DOMAINS}
[[ -n $EVAL_DOMAINS ]] || EVAL_DOMAINS=general,$DOMAINS,reference
METHODS=(btx bam bam-shared-kv)
IFS=, read -r -a DOM <<<"$DOMAINS"

# ---- stages and what each one reads
ALL_STAGES=(seed branch)
for m in "${METHODS[@]}"; do ALL_STAGES+=("mix-$m"); done
TRAININGS=()
for m in "${METHODS[@]}"; do
  TRAININGS+=("$m-dm")
  [[ $m == btx ]] || TRAININGS+=("$m-cm") # BTX is the reference budget
done
for r in "${TRAININGS[@]}"; do ALL_STAGES+=("train-$r"); done
ALL_STAGES+=(eval report)
declare -A DEPS=([seed]="" [branch]="seed" [eval]="seed branch" [report]="eval")
for m in "${METHODS[@]}"; do DEPS[mix-$m]="seed branch"; done
for r in "${TRAININGS[@]}"; do
  m=${r%-*}
  DEPS[train-$r]="mix-$m"
  [[ $r == *-cm ]] && DEPS[train-$r]+=" mix-btx" # the budget needs BTX's FLOPs per token
  DEPS[eval]+=" train-$r"
done

if ((SETTINGS)); then
  echo "domains=$DOMAINS"
  echo "seed_steps=$CFG_STEPS"
  echo "branch_steps=$BRANCH_STEPS"
  echo "mix_steps=$MIX_STEPS"
  echo "eval_tokens=$EVAL_TOKENS"
  echo "eval_domains=$EVAL_DOMAINS"
  echo "stages=${ALL_STAGES[*]}"
  echo "trainings=${TRAININGS[*]}"
  exit 0
fi

# The selected stages (--stage), then every stage they read from, recursively.
declare -A SELECTED=() NEEDED=()
((${#STAGE_ARGS[@]})) || STAGE_ARGS=(all)
for arg in "${STAGE_ARGS[@]}"; do
  IFS=, read -r -a names <<<"$arg"
  ((${#names[@]})) || die "--stage needs a stage name"
  for s in "${names[@]}"; do
    case "$s" in
      all) for t in "${ALL_STAGES[@]}"; do SELECTED[$t]=1; done ;;
      mix) for m in "${METHODS[@]}"; do SELECTED[mix-$m]=1; done ;;
      train) for r in "${TRAININGS[@]}"; do SELECTED[train-$r]=1; done ;;
      *)
        [[ -n ${DEPS[$s]+x} ]] || die "unknown stage '$s' (stages: ${ALL_STAGES[*]}; also all, mix, train)"
        SELECTED[$s]=1 ;;
    esac
  done
done
need() {
  local d
  [[ -n ${NEEDED[$1]:-} ]] && return 0
  NEEDED[$1]=1
  for d in ${DEPS[$1]}; do need "$d"; done
}
for s in "${!SELECTED[@]}"; do need "$s"; done
ONLY=""
((${#SELECTED[@]} == ${#ALL_STAGES[@]})) || ONLY=1

BAM=${BAM_BIN:-$SRC/build/bam}
[[ -x $BAM ]] || die "$BAM is not an executable (build it or set BAM_BIN)"
[[ -n $RUN ]] || RUN=$SRC/runs/pipeline/$(basename "$CONFIG" .ini)
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)

# ---- ranks, threads and the launcher
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
RANKS=${RANKS_ARG:-${RANKS:-${SLURM_NTASKS:-1}}}
[[ $RANKS =~ ^[1-9][0-9]*$ ]] || die "--ranks must be a positive integer, not '$RANKS'"
BRANCH_RANKS=${BRANCH_RANKS_ARG:-${BAM_BRANCH_RANKS:-$RANKS}}
[[ $BRANCH_RANKS =~ ^[1-9][0-9]*$ ]] || die "--branch-ranks must be a positive integer, not '$BRANCH_RANKS'"
CORES=$(nproc)
if [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))}
fi
if [[ -n ${BAM_LAUNCHER:-} ]]; then
  LAUNCHER=$BAM_LAUNCHER
elif [[ -n ${SLURM_JOB_ID:-} ]] && command -v srun >/dev/null 2>&1; then
  LAUNCHER=srun
else
  LAUNCHER=mpirun
fi
launch() { # launch NP: sets LAUNCH to the command prefix starting NP ranks
  case "$LAUNCHER" in
    srun)
      [[ -n ${SLURM_JOB_ID:-} ]] || die "BAM_LAUNCHER=srun needs a Slurm allocation"
      if [[ -n ${SLURM_NTASKS:-} ]] && (($1 > SLURM_NTASKS)); then
        die "this allocation has $SLURM_NTASKS task(s); the stage needs $1 rank(s) (sbatch -n $1)"
      fi
      # srun does not inherit --cpus-per-task from sbatch since Slurm 22.05: pass it on.
      LAUNCH=(srun --mpi=pmix --kill-on-bad-exit=1 -n "$1")
      if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then LAUNCH+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
      ;;
    mpirun)
      LAUNCH=("${MPIEXEC:-mpirun}" -np "$1" --bind-to none -x OMP_NUM_THREADS)
      # Outside an allocation more ranks x threads than cores must be allowed explicitly.
      if [[ -z ${SLURM_JOB_ID:-} ]] && (($1 * OMP_NUM_THREADS > CORES)); then LAUNCH+=(--oversubscribe); fi
      ;;
    *) die "BAM_LAUNCHER must be srun or mpirun, not '$LAUNCHER'" ;;
  esac
}

# Overrides for every training stage.
SETS=()
[[ -n ${BAM_DATA:-} ]] && SETS+=(--set "data.dir=$BAM_DATA")
for kv in ${BAM_SET:-}; do SETS+=(--set "$kv"); done
DATA_ARGS=()
[[ -n ${BAM_DATA:-} ]] && DATA_ARGS=(--data "$BAM_DATA")

log() { echo "== $*"; }
# `bam inspect CKPT`, cached for this invocation (checkpoints are only read after their stage).
CACHE=$(mktemp -d "${TMPDIR:-/tmp}/bam-pipeline-XXXXXX")
trap 'rm -rf "$CACHE"' EXIT
inspect() {
  local f
  f=$CACHE/$(sha256sum <<<"$1" | cut -c1-16)
  if [[ ! -f $f ]]; then
    "$BAM" inspect "$1" >"$f.tmp" 2>&1 || { echo "pipeline: cannot read checkpoint $1: $(cat "$f.tmp")" >&2; return 1; }
    mv "$f.tmp" "$f"
  fi
  cat "$f"
}
# Identity of a checkpoint: kind, step, tokens and every shard's CRC (not its path).
ckpt_id() {
  local out
  out=$(inspect "$1") || exit 1
  grep -E '^(kind|step|tokens) |crc32c' <<<"$out" | sed 's/^ *[^ ]*  //' | sha256sum | cut -c1-16
}
inspect_value() { # inspect_value CKPT KEY: "tokens", "step" or "flops_per_token_forward"
  local out
  out=$(inspect "$1") || exit 1
  awk -v k="$2" '$1 == k { print $NF; exit }' <<<"$out"
}
# stage_skip STAGE LABEL DIR EXPECT: 0 (skip) if DIR/DONE holds EXPECT; 1 to run; exits if it
# differs, or if it is missing and STAGE was not selected (an input of a selected stage).
stage_skip() {
  local stage=$1 name=$2 dir=$3 expect=$4
  if [[ -f $dir/DONE ]]; then
    if [[ $(cat "$dir/DONE") == "$expect" ]]; then
      if [[ -n ${SELECTED[$stage]:-} ]]; then
        log "$name: skipped (done: $dir/DONE)"
      else
        log "$name: input ready ($dir/DONE)"
      fi
      return 0
    fi
    echo "pipeline: $dir/DONE was made from other inputs than this run's:" >&2
    diff <(cat "$dir/DONE") <(echo "$expect") | sed 's/^/  /' >&2 || true
    echo "pipeline: remove $dir (and the stages after it) to redo it" >&2
    exit 1
  fi
  if [[ -z ${SELECTED[$stage]:-} ]]; then
    echo "pipeline: stage '$stage' has not finished (no $dir/DONE), and the selected stage(s) need it:" >&2
    echo "pipeline: run it first: jobs/pipeline.sh $CONFIG --run $RUN --stage $stage" >&2
    exit 1
  fi
  log "$name: running"
  STAGE_NAME=$name STAGE_T0=$SECONDS
  return 1
}
stage_done() {
  printf '%s\n' "$2" >"$1/DONE.tmp" && mv "$1/DONE.tmp" "$1/DONE"
  log "$STAGE_NAME: done in $((SECONDS - STAGE_T0)) s"
}
# launched LABEL LOG OUTPUT... -- COMMAND...: runs COMMAND (the launcher prefix included), its
# output appended to LOG, and returns its status; but a launcher that exits 0 without every
# OUTPUT in place runs it again (three tries in all), then fails. srun can report success for
# a job step that never started ("StepId=6.0 aborted before step completely launched ... task
# 0 launch failed", exit 0), seen when five training jobs launched their steps at once on the
# local test cluster; every stage here resumes, so running it again is safe.
launched() {
  local label=$1 logf=$2 outs=() o try rc missing
  shift 2
  while [[ $1 != -- ]]; do outs+=("$1"); shift; done
  shift
  for try in 1 2 3; do
    rc=0
    "$@" >>"$logf" 2>&1 || rc=$?
    ((rc == 0)) || return "$rc"
    missing=""
    for o in "${outs[@]}"; do [[ -e $o ]] || missing+=" $o"; done
    [[ -z $missing ]] && return 0
    echo "pipeline: $label: the launcher exited 0 but wrote no$missing (try $try of 3)" | tee -a "$logf" >&2
    sleep 2
  done
  return 1
}

# stage_failed RC LABEL LOG: a bam stopped by a signal (143, checkpointed) or failed.
stage_failed() {
  if [[ $1 == 143 ]]; then
    echo "pipeline: $2 stopped by a signal after checkpointing (see $3); run again to resume" >&2
    exit 143
  fi
  echo "pipeline: $2 failed with status $1 (see $3); its last lines:" >&2
  tail -n 15 "$3" 2>/dev/null | sed 's/^/  | /' >&2
  exit 1
}

log "pipeline: $CONFIG -> $RUN ($RANKS rank(s) x $OMP_NUM_THREADS thread(s), launcher $LAUNCHER; experts $DOMAINS)${ONLY:+; stages: $(for s in "${ALL_STAGES[@]}"; do [[ -n ${SELECTED[$s]:-} ]] && printf '%s ' "$s"; done)}"

SEED=$RUN/seed
EXP=$RUN/experts
EV=$RUN/eval
REP=$RUN/report
declare -A MIX_ID FLOPS

# ---- seed ---------------------------------------------------------------------------------------
stage_seed() {
  local expect rc=0
  expect="stage = seed
config = $CFG_SUM
overrides = ${SETS[*]}"
  if ! stage_skip seed seed "$SEED" "$expect"; then
    mkdir -p "$SEED"
    launch "$RANKS"
    launched seed "$SEED/log.txt" "$SEED/final.h5" -- \
      "${LAUNCH[@]}" "$BAM" pretrain --config "$CONFIG" "${SETS[@]}" --set "run.out_dir=$SEED" --resume || rc=$?
    ((rc == 0)) || stage_failed "$rc" seed "$SEED/log.txt"
    stage_done "$SEED" "$expect"
  fi
  SEED_ID=$(ckpt_id "$SEED/ckpt")
}

# ---- branch -------------------------------------------------------------------------------------
stage_branch() {
  local expect rc=0 d
  expect="stage = branch
seed = $SEED_ID
domains = $DOMAINS
steps = $BRANCH_STEPS
overrides = ${SETS[*]}"
  if ! stage_skip branch branch "$EXP" "$expect"; then
    mkdir -p "$EXP"
    launch "$BRANCH_RANKS"
    local outs=()
    for d in "${DOM[@]}"; do outs+=("$EXP/$d/final.h5"); done
    launched branch "$EXP/log.txt" "${outs[@]}" -- \
      "${LAUNCH[@]}" "$BAM" branch --seed "$SEED/ckpt" --domains "$DOMAINS" --out "$EXP" --resume \
      "${SETS[@]}" --set "train.steps=$BRANCH_STEPS" || rc=$?
    ((rc == 0)) || stage_failed "$rc" branch "$EXP/log.txt"
    stage_done "$EXP" "$expect"
  fi
  EXPERTS=() EXPERT_IDS=()
  for d in "${DOM[@]}"; do
    EXPERTS+=("$EXP/$d/ckpt")
    EXPERT_IDS+=("$d:$(ckpt_id "$EXP/$d/ckpt")")
  done
  EXPERT_LIST=$(IFS=,; echo "${EXPERTS[*]}")
}

# ---- mix ----------------------------------------------------------------------------------------
stage_mix() { # stage_mix METHOD
  local m=$1 dir=$RUN/mix-$1 expect rc=0
  expect="stage = mix
method = $m
seed = $SEED_ID
experts = ${EXPERT_IDS[*]}"
  if ! stage_skip "mix-$m" "mix $m" "$dir" "$expect"; then
    rm -rf "$dir" # a half-made mixture is made again (mixing is deterministic)
    mkdir -p "$dir"
    "$BAM" mix --method "$m" --seed "$SEED/ckpt" --experts "$EXPERT_LIST" --out "$dir" \
      >"$dir.log" 2>&1 || rc=$?
    ((rc == 0)) || stage_failed "$rc" "mix $m" "$dir.log"
    mv "$dir.log" "$dir/log.txt"
    stage_done "$dir" "$expect"
  fi
  MIX_ID[$m]=$(ckpt_id "$dir/ckpt")
  FLOPS[$m]=$(inspect_value "$dir/ckpt" flops_per_token_forward)
  [[ -n ${FLOPS[$m]} ]] || { echo "pipeline: bam inspect gives no flops_per_token_forward" >&2; exit 1; }
}

# ---- train --------------------------------------------------------------------------------------
stage_train() { # stage_train METHOD-BUDGET
  local r=$1 m=${1%-*} b=${1##*-} steps dir=$RUN/train-$1 expect rc=0
  if [[ $b == dm ]]; then
    steps=$MIX_STEPS
  else
    steps=$(( MIX_STEPS * ${FLOPS[btx]} / ${FLOPS[$m]} ))
    (( steps >= 1 )) || { echo "pipeline: compute-matched $m gets 0 steps" >&2; exit 1; }
  fi
  expect="stage = train
method = $m
budget = $b
steps = $steps
mixture = ${MIX_ID[$m]}
overrides = ${SETS[*]}"
  if ! stage_skip "train-$r" "train $m $b ($steps steps)" "$dir" "$expect"; then
    mkdir -p "$dir"
    launch "$RANKS"
    launched "train $m $b" "$dir/log.txt" "$dir/final.h5" -- \
      "${LAUNCH[@]}" "$BAM" train --mixture "$RUN/mix-$m/ckpt" --out "$dir" --resume "${SETS[@]}" \
      --set "train.steps=$steps" || rc=$?
    ((rc == 0)) || stage_failed "$rc" "train $m $b" "$dir/log.txt"
    stage_done "$dir" "$expect"
  fi
}

# ---- eval ---------------------------------------------------------------------------------------
# model name, checkpoint, kind (seed, expert, mixture)
MODELS=("seed|$SEED/ckpt|seed")
for d in "${DOM[@]}"; do MODELS+=("expert-$d|$EXP/$d/ckpt|expert"); done
for r in "${TRAININGS[@]}"; do MODELS+=("$r|$RUN/train-$r/ckpt|mixture"); done
stage_eval() {
  local spec name ckpt kind want expect_all rc t
  expect_all="stage = eval
domains = $EVAL_DOMAINS
max_tokens = $EVAL_TOKENS"
  for spec in "${MODELS[@]}"; do
    IFS='|' read -r name ckpt kind <<<"$spec"
    expect_all+=$'\n'"$name = $(ckpt_id "$ckpt")"
  done
  if ! stage_skip eval eval "$EV" "$expect_all"; then
    mkdir -p "$EV"
    launch "$RANKS"
    for spec in "${MODELS[@]}"; do
      IFS='|' read -r name ckpt kind <<<"$spec"
      want="$(ckpt_id "$ckpt") $EVAL_DOMAINS $EVAL_TOKENS"
      if [[ -f $EV/$name.done && $(cat "$EV/$name.done") == "$want" ]]; then
        log "eval $name: skipped"
        continue
      fi
      log "eval $name"
      t=$SECONDS
      ROUTING=()
      [[ $kind == mixture ]] && ROUTING=(--routing "$EV/$name.routing.csv")
      rc=0
      "${LAUNCH[@]}" "$BAM" eval --checkpoint "$ckpt" --domains "$EVAL_DOMAINS" --max-tokens "$EVAL_TOKENS" \
        "${DATA_ARGS[@]}" "${ROUTING[@]}" >"$EV/$name.txt.tmp" 2>&1 || rc=$?
      ((rc == 0)) || stage_failed "$rc" "eval $name" "$EV/$name.txt.tmp"
      mv "$EV/$name.txt.tmp" "$EV/$name.txt"
      echo "$want" >"$EV/$name.done"
      log "eval $name: done in $((SECONDS - t)) s"
    done
    stage_done "$EV" "$expect_all"
  fi
}

# ---- report -------------------------------------------------------------------------------------
stage_report() {
  local expect rc=0
  expect="stage = report
$(cat "$EV/DONE")"
  stage_skip report report "$REP" "$expect" && return 0
  # a folder `bam report` did not make (an older pipeline's) is replaced, not merged into
  [[ -d $REP && ! -f $REP/.bam-report ]] && rm -rf "$REP"
  # the study's report from the artifacts alone (docs/report.md): report.md, results.csv,
  # figures; exit 3 means the Markdown and CSV are written but a figure could not be drawn
  "$BAM" report "$RUN" --out "$REP" || rc=$?
  if [[ $rc == 3 ]]; then
    log "report: written without some figures (is gnuplot installed? jobs/setup.sh installs it)"
  elif [[ $rc != 0 ]]; then
    echo "pipeline: bam report $RUN failed (exit $rc)" >&2
    exit 1
  fi
  stage_done "$REP" "$expect"
}

# ---- run the needed stages in order: the selected ones run (or are skipped when done), the
# others are inputs and must be done already.
for s in "${ALL_STAGES[@]}"; do
  [[ -n ${NEEDED[$s]:-} ]] || continue
  case "$s" in
    seed) stage_seed ;;
    branch) stage_branch ;;
    mix-*) stage_mix "${s#mix-}" ;;
    train-*) stage_train "${s#train-}" ;;
    eval) stage_eval ;;
    report) stage_report ;;
  esac
done
if [[ -n ${SELECTED[report]:-} ]]; then
  log "done: $REP/report.md, $REP/results.csv, figures in $REP"
  cat "$REP/report.md"
else
  log "done: $(for s in "${ALL_STAGES[@]}"; do [[ -n ${SELECTED[$s]:-} ]] && printf '%s ' "$s"; done)in $RUN"
fi
