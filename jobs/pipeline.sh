#!/usr/bin/env bash
# The whole BTX-versus-BAM study from one config (docs/method.md sections 1 and 5):
#   1. seed     bam pretrain                          -> RUN/seed
#   2. branch   bam branch (one expert per domain)    -> RUN/experts/<domain>
#   3. mix      btx, bam, bam-shared-kv               -> RUN/mix-<method>
#   4. train    every mixture data-matched (DM: BTX's steps and tokens) -> RUN/train-<method>-dm,
#               the BAM kinds also compute-matched (CM: steps = BTX steps x FLOPs/token(BTX) /
#               FLOPs/token(method), rounded down; training FLOPs = 3 x forward) -> RUN/train-<method>-cm
#   5. eval     every model on general, every domain and the held-out reference domain
#               -> RUN/eval/<model>.txt (+ <model>.routing.csv for mixtures)
#   6. report   RUN/report.md and RUN/results.csv: perplexity per domain, average, bits per byte,
#               steps, tokens and training FLOPs per model and per stage
#
# usage: jobs/pipeline.sh CONFIG [--run DIR] [--ranks N]
#
# Restartable: a finished stage writes <its folder>/DONE last, holding what it consumed (the
# config's checksum and the overrides, or the identity of its input checkpoints: kind, step,
# tokens and shard CRCs from `bam inspect`). A stage whose DONE matches is skipped ("skipped");
# a half-done training stage continues from its latest checkpoint (--resume); a half-made
# mixture is made again. A DONE that does not match (the config or an input changed) is an
# error: remove that stage's folder (and the later ones) to redo it.
#
# Environment:
#   BAM_BIN            the bam program (default build/bam)
#   BAM_DATA           prepared data folder, overrides data.dir of the config
#   BAM_DOMAINS        expert domains (default code,math,legal)
#   BAM_BRANCH_STEPS   steps of each domain expert (default: the config's train.steps)
#   BAM_MIX_STEPS      steps of the data-matched mixture runs (default: the config's train.steps)
#   BAM_EVAL_TOKENS    tokens per domain evaluated (default 131072)
#   BAM_SET            extra "section.key=value" overrides for every training stage, space separated
#   RANKS              MPI ranks (default 1; --ranks wins), OMP_NUM_THREADS (default cores / ranks)
#   MPIEXEC            default mpirun
#   BAM_PYTHON         python3 for the report
# Runs locally through `mpirun -np RANKS --bind-to none`. Not yet done: a Slurm chain
# (slurm/pipeline.sh, one dependent job per stage); the stages' restartability is what it needs.
set -euo pipefail

usage() { echo "usage: jobs/pipeline.sh CONFIG [--run DIR] [--ranks N]" >&2; exit 2; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
CONFIG="" RUN="" RANKS=${RANKS:-1}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) [[ $# -ge 2 ]] || usage; RUN=$2; shift 2 ;;
    --ranks) [[ $# -ge 2 ]] || usage; RANKS=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "pipeline: unknown option '$1'" >&2; usage ;;
    *) [[ -z $CONFIG ]] || usage; CONFIG=$1; shift ;;
  esac
done
[[ -n $CONFIG ]] || usage
[[ -f $CONFIG ]] || { echo "pipeline: config '$CONFIG' not found" >&2; exit 2; }
[[ $RANKS =~ ^[1-9][0-9]*$ ]] || { echo "pipeline: --ranks must be a positive integer, not '$RANKS'" >&2; exit 2; }
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
BAM=${BAM_BIN:-$SRC/build/bam}
[[ -x $BAM ]] || { echo "pipeline: $BAM is not an executable (build it or set BAM_BIN)" >&2; exit 2; }
PY=${BAM_PYTHON:-python3}
MPI=${MPIEXEC:-mpirun}
[[ -n $RUN ]] || RUN=$SRC/runs/pipeline/$(basename "$CONFIG" .ini)
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))}
LAUNCH=("$MPI" -np "$RANKS" --bind-to none)
(( RANKS * OMP_NUM_THREADS <= CORES )) || LAUNCH+=(--oversubscribe)

# The config's value of section.key (last assignment wins), for defaults.
ini_get() {
  awk -v sec="$1" -v key="$2" '
    /^[ \t]*[;#]/ { next }
    /^[ \t]*\[/ { gsub(/[][ \t]/, ""); s = $0; next }
    s == sec { split($0, kv, "="); k = kv[1]; gsub(/[ \t]/, "", k)
               if (k == key) { v = substr($0, index($0, "=") + 1); gsub(/^[ \t]+|[ \t]+$/, "", v); val = v } }
    END { print val }' "$CONFIG"
}
STEPS=$(ini_get train steps)
[[ -n $STEPS ]] || { echo "pipeline: $CONFIG has no train.steps" >&2; exit 2; }
DOMAINS=${BAM_DOMAINS:-code,math,legal}
BRANCH_STEPS=${BAM_BRANCH_STEPS:-$STEPS}
MIX_STEPS=${BAM_MIX_STEPS:-$STEPS}
EVAL_TOKENS=${BAM_EVAL_TOKENS:-131072}
EVAL_DOMAINS=general,$DOMAINS,reference
METHODS=(btx bam bam-shared-kv)
IFS=, read -r -a DOM <<<"$DOMAINS"

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
# stage_skip NAME DIR EXPECT: 0 (skip) if DIR/DONE holds EXPECT; 1 to run; exit if it differs.
stage_skip() {
  local name=$1 dir=$2 expect=$3
  if [[ -f $dir/DONE ]]; then
    if [[ $(cat "$dir/DONE") == "$expect" ]]; then
      log "$name: skipped (done: $dir/DONE)"
      return 0
    fi
    echo "pipeline: $dir/DONE was made from other inputs than this run's:" >&2
    diff <(cat "$dir/DONE") <(echo "$expect") | sed 's/^/  /' >&2 || true
    echo "pipeline: remove $dir (and the stages after it) to redo it" >&2
    exit 1
  fi
  log "$name: running"
  return 1
}
stage_done() { printf '%s\n' "$2" >"$1/DONE.tmp" && mv "$1/DONE.tmp" "$1/DONE"; }

log "pipeline: $CONFIG -> $RUN ($RANKS rank(s) x $OMP_NUM_THREADS thread(s); experts $DOMAINS)"
CFG_SUM=$(sha256sum "$CONFIG" | cut -c1-16)

# ---- 1. seed ------------------------------------------------------------------------------------
SEED=$RUN/seed
EXPECT="stage = seed
config = $CFG_SUM
overrides = ${SETS[*]}"
if ! stage_skip seed "$SEED" "$EXPECT"; then
  mkdir -p "$SEED"
  "${LAUNCH[@]}" "$BAM" pretrain --config "$CONFIG" "${SETS[@]}" --set "run.out_dir=$SEED" --resume \
    >>"$SEED/log.txt" 2>&1 || { echo "pipeline: seed failed (see $SEED/log.txt)" >&2; exit 1; }
  stage_done "$SEED" "$EXPECT"
fi
SEED_ID=$(ckpt_id "$SEED/ckpt")

# ---- 2. branch ----------------------------------------------------------------------------------
EXP=$RUN/experts
EXPECT="stage = branch
seed = $SEED_ID
domains = $DOMAINS
steps = $BRANCH_STEPS
overrides = ${SETS[*]}"
if ! stage_skip branch "$EXP" "$EXPECT"; then
  mkdir -p "$EXP"
  "${LAUNCH[@]}" "$BAM" branch --seed "$SEED/ckpt" --domains "$DOMAINS" --out "$EXP" --resume \
    "${SETS[@]}" --set "train.steps=$BRANCH_STEPS" >>"$EXP/log.txt" 2>&1 ||
    { echo "pipeline: branch failed (see $EXP/log.txt)" >&2; exit 1; }
  stage_done "$EXP" "$EXPECT"
fi
EXPERTS=() EXPERT_IDS=()
for d in "${DOM[@]}"; do
  EXPERTS+=("$EXP/$d/ckpt")
  EXPERT_IDS+=("$d:$(ckpt_id "$EXP/$d/ckpt")")
done
EXPERT_LIST=$(IFS=,; echo "${EXPERTS[*]}")

# ---- 3. mix -------------------------------------------------------------------------------------
for m in "${METHODS[@]}"; do
  DIR=$RUN/mix-$m
  EXPECT="stage = mix
method = $m
seed = $SEED_ID
experts = ${EXPERT_IDS[*]}"
  if ! stage_skip "mix $m" "$DIR" "$EXPECT"; then
    rm -rf "$DIR" # a half-made mixture is made again (mixing is deterministic)
    mkdir -p "$DIR"
    "$BAM" mix --method "$m" --seed "$SEED/ckpt" --experts "$EXPERT_LIST" --out "$DIR" \
      >"$DIR.log" 2>&1 || { echo "pipeline: mix $m failed (see $DIR.log)" >&2; exit 1; }
    mv "$DIR.log" "$DIR/log.txt"
    stage_done "$DIR" "$EXPECT"
  fi
done

# ---- 4. train -----------------------------------------------------------------------------------
declare -A FLOPS
for m in "${METHODS[@]}"; do
  FLOPS[$m]=$(inspect_value "$RUN/mix-$m/ckpt" flops_per_token_forward)
  [[ -n ${FLOPS[$m]} ]] || { echo "pipeline: bam inspect gives no flops_per_token_forward" >&2; exit 1; }
done
RUNS=()
for m in "${METHODS[@]}"; do
  for b in dm cm; do
    [[ $m == btx && $b == cm ]] && continue # BTX is the reference budget
    if [[ $b == dm ]]; then
      steps=$MIX_STEPS
    else
      steps=$(( MIX_STEPS * ${FLOPS[btx]} / ${FLOPS[$m]} ))
      (( steps >= 1 )) || { echo "pipeline: compute-matched $m gets 0 steps" >&2; exit 1; }
    fi
    DIR=$RUN/train-$m-$b
    RUNS+=("$m-$b")
    EXPECT="stage = train
method = $m
budget = $b
steps = $steps
mixture = $(ckpt_id "$RUN/mix-$m/ckpt")
overrides = ${SETS[*]}"
    if ! stage_skip "train $m $b ($steps steps)" "$DIR" "$EXPECT"; then
      mkdir -p "$DIR"
      "${LAUNCH[@]}" "$BAM" train --mixture "$RUN/mix-$m/ckpt" --out "$DIR" --resume "${SETS[@]}" \
        --set "train.steps=$steps" >>"$DIR/log.txt" 2>&1 ||
        { echo "pipeline: train $m $b failed (see $DIR/log.txt)" >&2; exit 1; }
      stage_done "$DIR" "$EXPECT"
    fi
  done
done

# ---- 5. eval ------------------------------------------------------------------------------------
# model name, checkpoint, kind (seed, expert, mixture)
MODELS=("seed|$SEED/ckpt|seed")
for d in "${DOM[@]}"; do MODELS+=("expert-$d|$EXP/$d/ckpt|expert"); done
for r in "${RUNS[@]}"; do MODELS+=("$r|$RUN/train-$r/ckpt|mixture"); done
EV=$RUN/eval
EXPECT_ALL="stage = eval
domains = $EVAL_DOMAINS
max_tokens = $EVAL_TOKENS"
for spec in "${MODELS[@]}"; do
  IFS='|' read -r name ckpt kind <<<"$spec"
  EXPECT_ALL+=$'\n'"$name = $(ckpt_id "$ckpt")"
done
if ! stage_skip eval "$EV" "$EXPECT_ALL"; then
  mkdir -p "$EV"
  for spec in "${MODELS[@]}"; do
    IFS='|' read -r name ckpt kind <<<"$spec"
    want="$(ckpt_id "$ckpt") $EVAL_DOMAINS $EVAL_TOKENS"
    if [[ -f $EV/$name.done && $(cat "$EV/$name.done") == "$want" ]]; then
      log "eval $name: skipped"
      continue
    fi
    log "eval $name"
    ROUTING=()
    [[ $kind == mixture ]] && ROUTING=(--routing "$EV/$name.routing.csv")
    "${LAUNCH[@]}" "$BAM" eval --checkpoint "$ckpt" --domains "$EVAL_DOMAINS" --max-tokens "$EVAL_TOKENS" \
      "${DATA_ARGS[@]}" "${ROUTING[@]}" >"$EV/$name.txt.tmp" 2>&1 ||
      { echo "pipeline: eval $name failed (see $EV/$name.txt.tmp)" >&2; exit 1; }
    mv "$EV/$name.txt.tmp" "$EV/$name.txt"
    echo "$want" >"$EV/$name.done"
  done
  stage_done "$EV" "$EXPECT_ALL"
fi

# ---- 6. report ----------------------------------------------------------------------------------
REP=$RUN/report
EXPECT="stage = report
$(cat "$EV/DONE")"
if ! stage_skip report "$REP" "$EXPECT"; then
  mkdir -p "$REP"
  # one line per model: name kind method budget steps tokens flops_per_token_forward
  # (tokens_seen counts the model's own stage: experts and mixtures start from 0)
  : >"$REP/models.txt"
  for spec in "${MODELS[@]}"; do
    IFS='|' read -r name ckpt kind <<<"$spec"
    method=dense budget=-
    [[ $kind == mixture ]] && method=${name%-*} budget=${name##*-}
    echo "$name $kind $method $budget $(inspect_value "$ckpt" step) $(inspect_value "$ckpt" tokens)" \
      "$(inspect_value "$ckpt" flops_per_token_forward)" >>"$REP/models.txt"
  done
  "$PY" - "$REP/models.txt" "$EV" "$EVAL_DOMAINS" "$DOMAINS" "$RUN" <<'PY'
import math, os, sys
models_file, ev, eval_domains, domains, run = sys.argv[1:6]
eval_domains = eval_domains.split(",")
avg_domains = ["general"] + domains.split(",")  # the paper's average: general + expert domains
rows = []
for line in open(models_file):
    name, kind, method, budget, step, tokens, fpt = line.split()
    spent, fpt = int(tokens), float(fpt)
    res = {}
    for l in open(os.path.join(ev, name + ".txt")):
        f = l.split()
        if len(f) >= 5 and f[0] in eval_domains:
            try:
                res[f[0]] = (float(f[3]), float(f[4]))  # perplexity, bits per byte
            except ValueError:
                pass
    missing = [d for d in eval_domains if d not in res]
    if missing:
        sys.exit(f"report: {ev}/{name}.txt has no result for {','.join(missing)}")
    rows.append(dict(name=name, kind=kind, method=method, budget=budget, steps=int(step),
                     tokens=spent, fpt=fpt, flops=3.0 * fpt * spent, res=res))

def avg(vals):
    return sum(vals) / len(vals)

header = (["model", "kind", "method", "budget", "steps", "tokens", "flops_per_token_forward", "train_flops"]
          + [f"ppl_{d}" for d in eval_domains] + ["ppl_avg"]
          + [f"bpb_{d}" for d in eval_domains] + ["bpb_avg"])
with open(os.path.join(run, "results.csv.tmp"), "w") as f:
    f.write(",".join(header) + "\n")
    for r in rows:
        ppl = [r["res"][d][0] for d in eval_domains]
        bpb = [r["res"][d][1] for d in eval_domains]
        vals = ([r["name"], r["kind"], r["method"], r["budget"], str(r["steps"]), str(r["tokens"]),
                 f"{r['fpt']:.0f}", f"{r['flops']:.4e}"]
                + [f"{v:.2f}" for v in ppl] + [f"{avg([r['res'][d][0] for d in avg_domains]):.2f}"]
                + [f"{v:.4f}" for v in bpb] + [f"{avg([r['res'][d][1] for d in avg_domains]):.4f}"])
        f.write(",".join(vals) + "\n")
os.replace(os.path.join(run, "results.csv.tmp"), os.path.join(run, "results.csv"))

stages = {}
for r in rows:
    st = {"seed": "1. seed (pretrain)", "expert": "2. branch (all experts)"}.get(
        r["kind"], "4. train " + r["name"])
    t, fl = stages.get(st, (0, 0.0))
    stages[st] = (t + r["tokens"], fl + r["flops"])
md = ["# BTX versus BAM: results", "",
      "Perplexity per validation domain (lower is better); Avg over general and the experts' "
      "domains (" + ", ".join(avg_domains) + ") as in the paper's table; `reference` is held out "
      "(no expert saw it). Bits per byte averaged over the same domains. DM = data-matched "
      "(BTX's tokens), CM = compute-matched (BTX's training FLOPs). Tokens and FLOPs are those "
      "the model's own stage spent (training FLOPs = 3 x forward FLOPs/token x tokens).", "",
      "| model | " + " | ".join(eval_domains) + " | Avg | bits/B | steps | tokens | train FLOPs |",
      "|---|" + "---|" * (len(eval_domains) + 5)]
for r in rows:
    md.append(f"| {r['name']} | " + " | ".join(f"{r['res'][d][0]:.2f}" for d in eval_domains)
              + f" | {avg([r['res'][d][0] for d in avg_domains]):.2f}"
              + f" | {avg([r['res'][d][1] for d in avg_domains]):.4f}"
              + f" | {r['steps']} | {r['tokens']} | {r['flops']:.3e} |")
md += ["", "Spent per stage:", "", "| stage | tokens | training FLOPs |", "|---|---|---|"]
for st, (t, fl) in stages.items():
    md.append(f"| {st} | {t} | {fl:.3e} |")
total = sum(fl for _, fl in stages.values())
md += [f"| total | {sum(t for t, _ in stages.values())} | {total:.3e} |", "",
       "Per model: eval/<model>.txt (loss, perplexity, bits per byte per domain); mixtures' "
       "routing in eval/<model>.routing.csv.", ""]
with open(os.path.join(run, "report.md.tmp"), "w") as f:
    f.write("\n".join(md))
os.replace(os.path.join(run, "report.md.tmp"), os.path.join(run, "report.md"))
PY
  stage_done "$REP" "$EXPECT"
fi
log "done: $RUN/report.md, $RUN/results.csv"
cat "$RUN/report.md"
