#!/usr/bin/env bash
#SBATCH --job-name=bam-scaling
#SBATCH --output=bam-scaling-%j.out
#
# Scaling study of mixture training (`bam train`) at the quick shape: rank counts P = 1, 2, 4,
# ... (powers of two up to the cores, or the allocation's tasks) with T = cores / P threads per
# rank, each with expert parallelism mixture.ep = 1 and 2 (ep dividing P), for BTX, BAM and BAM
# shared-KV. Every run trains a few steps; its summary.json gives tokens/s, the communication
# share and the peak resident memory per rank (medians over the steps after the first two).
#
# usage: jobs/scaling.sh [--run DIR] [--methods btx,bam,bam-shared-kv] [--steps N] [--ranks 1,2]
#                        [--eps 1,2] [--mixture-dir DIR] [--config CONFIG]
#
# Writes RUN/scaling.csv (method, ranks, threads, ep, tokens_per_s, efficiency, comm_share,
# peak_rss_mib_per_rank), RUN/scaling.md (the table) and RUN/scaling.png (gnuplot: tokens/s and
# parallel efficiency against ranks, one line per method and ep). Parallel efficiency is the
# throughput per core relative to the same method's 1-rank run, (tok/s_P / cores_P) /
# (tok/s_1 / cores_1); on one machine, where ranks x threads = cores, it is tok/s_P / tok/s_1.
#
# The mixtures: a seed trained 1 step from random initialisation, three experts (code, math,
# legal) 1 step each, mixed by `bam mix`; built once under RUN/model (--mixture-dir DIR uses
# DIR/mix-<method>/ckpt instead, e.g. a pipeline run's folder). Only the speed is measured, so
# the weights do not matter. Defaults: --run runs/scaling, 10 steps, all three methods, ranks
# 1 and 2 on this 2-core machine; about 5 minutes here.
#
# Slurm: inside an allocation the runs use `srun --mpi=pmix -n P --cpus-per-task=T` with
# P x T = tasks x cpus-per-task of the allocation (one node, so the efficiency compares like
# with like). Submit from the repository root, e.g.
#   sbatch -N 1 -n 4 -c 1 --exclusive jobs/scaling.sh --run runs/scaling-slurm   (P = 1, 2, 4)
# Environment: BAM_BIN (default build/bam), BAM_DATA (default data/prepared/v4096),
# BAM_LAUNCHER (srun|mpirun), MPIEXEC (default mpirun).
set -euo pipefail

die() { echo "scaling: $*" >&2; exit 2; }
# The repository: this script's folder's parent; under sbatch (which runs a copy from its spool)
# the submitted path from scontrol, else the submission folder.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ ! -x $ROOT/jobs/pipeline.sh && -n ${SLURM_JOB_ID:-} ]]; then
  script=$(scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
  if [[ -n $script && -x $(dirname "$script")/pipeline.sh ]]; then
    ROOT=$(cd "$(dirname "$script")/.." && pwd)
  else
    ROOT=${SLURM_SUBMIT_DIR:-$(pwd)}
  fi
fi
cd "$ROOT"

RUN=runs/scaling METHODS=btx,bam,bam-shared-kv STEPS=10 RANKS_LIST="" EPS=1,2 MIXDIR="" CONFIG=configs/quick.ini
while (($#)); do
  case "$1" in
    --run) RUN=$2; shift 2 ;;
    --methods) METHODS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --ranks) RANKS_LIST=$2; shift 2 ;;
    --eps) EPS=$2; shift 2 ;;
    --mixture-dir) MIXDIR=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    -h|--help) sed -n '10,11s/^# *//p' "$0" >&2; exit 2 ;;
    *) die "unknown argument '$1' (see the header of jobs/scaling.sh)" ;;
  esac
done
[[ $STEPS =~ ^[0-9]+$ ]] && ((STEPS >= 4)) || die "--steps must be at least 4 (the first two are warm-up), not '$STEPS'"
[[ -f $CONFIG ]] || die "no config $CONFIG"
BAM=${BAM_BIN:-build/bam}
[[ -x $BAM ]] || die "no $BAM: run jobs/setup.sh (or set BAM_BIN)"
DATA=${BAM_DATA:-data/prepared/v4096}
[[ -f $DATA/manifest.json && -f $DATA/tokenizer/spm.vocab ]] ||
  die "no prepared corpora at $DATA: run data/prepare.sh --out $DATA (jobs/quickstart.sh does it)"
command -v gnuplot >/dev/null 2>&1 || die "no gnuplot: install gnuplot-nox (jobs/setup.sh does)"
PY=${BAM_PYTHON:-python3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# ---- the machine (or the allocation) and the launcher
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  MAXR=${SLURM_NTASKS:-1}
  CORES=$(( MAXR * ${SLURM_CPUS_PER_TASK:-1} ))
  LAUNCHER=${BAM_LAUNCHER:-srun}
else
  CORES=$(nproc)
  MAXR=$CORES
  LAUNCHER=${BAM_LAUNCHER:-mpirun}
fi
if [[ -z $RANKS_LIST ]]; then
  RANKS_LIST=1
  for ((p = 2; p <= MAXR; p *= 2)); do RANKS_LIST+=",$p"; done
fi
IFS=, read -r -a RANKS <<<"$RANKS_LIST"
IFS=, read -r -a EP <<<"$EPS"
IFS=, read -r -a METH <<<"$METHODS"
for p in "${RANKS[@]}"; do
  [[ $p =~ ^[1-9][0-9]*$ ]] || die "--ranks: '$p' is not a positive integer"
done
[[ ${RANKS[0]} == 1 ]] || die "--ranks must start with 1 (the efficiency baseline)"
for m in "${METH[@]}"; do
  [[ $m == btx || $m == bam || $m == bam-shared-kv ]] || die "--methods: '$m' is not btx, bam or bam-shared-kv"
done
launch() { # launch P T: sets LAUNCH
  case "$LAUNCHER" in
    srun) LAUNCH=(srun --mpi=pmix --kill-on-bad-exit=1 -n "$1" --cpus-per-task="$2") ;;
    mpirun)
      LAUNCH=("${MPIEXEC:-mpirun}" -np "$1" --bind-to none -x OMP_NUM_THREADS)
      if (($1 > CORES)); then LAUNCH+=(--oversubscribe); fi ;;
    *) die "BAM_LAUNCHER must be srun or mpirun, not '$LAUNCHER'" ;;
  esac
}

mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
LOG=$RUN/logs
mkdir -p "$LOG"
# No periodic evaluation and a tiny final one (one domain, one sequence): only the speed counts.
E=(--set "data.dir=$DATA" --set data.eval_domains=general --set eval.every=0
   --set eval.max_tokens=256 --set eval.batch_size=1)

# ---- the mixtures
if [[ -n $MIXDIR ]]; then
  for m in "${METH[@]}"; do
    [[ -e $MIXDIR/mix-$m/ckpt ]] || die "no mixture $MIXDIR/mix-$m/ckpt"
  done
else
  MIXDIR=$RUN/model
  M=$MIXDIR
  mkdir -p "$M"
  export OMP_NUM_THREADS=$CORES
  launch 1 "$CORES"
  if [[ ! -e $M/seed/DONE ]]; then
    echo "== model: seed (random initialisation, 1 step, $CONFIG)"
    rm -rf "$M/seed"
    "${LAUNCH[@]}" "$BAM" pretrain --config "$CONFIG" "${E[@]}" --set train.steps=1 \
      --set train.warmup_steps=0 --set ckpt.every=0 --set "run.out_dir=$M/seed" >"$LOG/seed.log" 2>&1 ||
      { tail -20 "$LOG/seed.log"; die "the seed failed (log $LOG/seed.log)"; }
    touch "$M/seed/DONE"
  fi
  if [[ ! -e $M/experts/DONE ]]; then
    echo "== model: experts code, math, legal (1 step each)"
    rm -rf "$M/experts"
    "${LAUNCH[@]}" "$BAM" branch --seed "$M/seed/ckpt" --domains code,math,legal "${E[@]}" \
      --set train.steps=1 --set train.warmup_steps=0 --out "$M/experts" >"$LOG/branch.log" 2>&1 ||
      { tail -20 "$LOG/branch.log"; die "branching failed (log $LOG/branch.log)"; }
    touch "$M/experts/DONE"
  fi
  for m in "${METH[@]}"; do
    [[ -e $M/mix-$m/DONE ]] && continue
    echo "== model: mix $m"
    rm -rf "$M/mix-$m"
    "$BAM" mix --method "$m" --seed "$M/seed/ckpt" \
      --experts "$M/experts/code/ckpt,$M/experts/math/ckpt,$M/experts/legal/ckpt" \
      --out "$M/mix-$m" >"$LOG/mix-$m.log" 2>&1 ||
      { tail -20 "$LOG/mix-$m.log"; die "mix $m failed (log $LOG/mix-$m.log)"; }
    touch "$M/mix-$m/DONE"
  done
fi

# ---- the sweep
T=(--set "train.steps=$STEPS" --set train.warmup_steps=1 --set train.log_every=1 --set ckpt.every=0)
: >"$RUN/runs.txt"
for m in "${METH[@]}"; do
  for p in "${RANKS[@]}"; do
    threads=$(( CORES / p > 0 ? CORES / p : 1 ))
    for ep in "${EP[@]}"; do
      ((ep <= p && p % ep == 0)) || continue
      out=$RUN/$m-p$p-ep$ep
      rm -rf "$out"
      echo "== $m: $p rank(s) x $threads thread(s), mixture.ep = $ep ($STEPS steps)"
      export OMP_NUM_THREADS=$threads
      launch "$p" "$threads"
      t0=$SECONDS
      "${LAUNCH[@]}" "$BAM" train --mixture "$MIXDIR/mix-$m/ckpt" "${E[@]}" "${T[@]}" \
        --set "mixture.ep=$ep" --out "$out" >"$LOG/$m-p$p-ep$ep.log" 2>&1 ||
        { tail -20 "$LOG/$m-p$p-ep$ep.log"; die "$m on $p rank(s), ep $ep failed (log $LOG/$m-p$p-ep$ep.log)"; }
      [[ -s $out/summary.json ]] || die "no $out/summary.json"
      echo "$m $p $threads $ep $out/summary.json" >>"$RUN/runs.txt"
      echo "   $(cat "$out/summary.json") ($((SECONDS - t0)) s)"
      rm -rf "$out/ckpt" "$out/final.h5" # only the numbers are kept
    done
  done
done

# ---- the table and the plot
SHAPE=$(basename "$CONFIG" .ini)
"$PY" - "$RUN" "$CORES" "$STEPS" "$(hostname)" "$SHAPE" <<'PY'
import json, os, sys
run, cores, steps, host, shape = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = []
for line in open(os.path.join(run, "runs.txt")):
    m, p, t, ep, path = line.split()
    s = json.load(open(path))
    rows.append(dict(method=m, ranks=int(p), threads=int(t), ep=int(ep), tps=s["tokens_per_s"],
                     comm=s["comm_share"], rss=s["peak_rss_mib"], gflops=s.get("model_gflops", 0.0)))
base = {}
for r in rows:
    if r["ranks"] == 1 and r["ep"] == 1:
        base[r["method"]] = r["tps"] / (r["ranks"] * r["threads"])
for r in rows:
    b = base.get(r["method"])
    r["eff"] = (r["tps"] / (r["ranks"] * r["threads"])) / b if b else float("nan")
with open(os.path.join(run, "scaling.csv"), "w") as f:
    f.write("method,ranks,threads,ep,tokens_per_s,efficiency,comm_share,peak_rss_mib_per_rank,model_gflops\n")
    for r in rows:
        f.write(f"{r['method']},{r['ranks']},{r['threads']},{r['ep']},{r['tps']:.1f},{r['eff']:.3f},"
                f"{r['comm']:.4f},{r['rss']:.1f},{r['gflops']:.2f}\n")
names = {"btx": "BTX", "bam": "BAM", "bam-shared-kv": "BAM shared-KV"}
md = [f"# Scaling of mixture training ({shape} shape, {steps} steps a run, {cores} cores, {host})", "",
      "Parallel efficiency: tokens/s per core relative to the same method's 1-rank run "
      "(ranks x threads = cores, so on one machine it is the throughput ratio). Communication: "
      "share of the step time in the gradient exchange and the expert-parallel exchanges. "
      "Medians over the steps after the first two.", "",
      "| method | ranks | threads | ep | tokens/s | efficiency | communication | peak RSS / rank (MiB) |",
      "|---|---|---|---|---|---|---|---|"]
for r in rows:
    md.append(f"| {names[r['method']]} | {r['ranks']} | {r['threads']} | {r['ep']} | {r['tps']:,.0f} | "
              f"{r['eff']:.2f} | {100 * r['comm']:.1f}% | {r['rss']:,.0f} |")
with open(os.path.join(run, "scaling.md"), "w") as f:
    f.write("\n".join(md) + "\n")
# one data block per method and ep, for gnuplot
with open(os.path.join(run, "scaling.dat"), "w") as f:
    keys = []
    for r in rows:
        k = (r["method"], r["ep"])
        if k not in keys:
            keys.append(k)
    for m, ep in keys:
        f.write(f'"{names[m]}, ep {ep}"\n')
        for r in rows:
            if (r["method"], r["ep"]) == (m, ep):
                f.write(f"{r['ranks']} {r['tps']:.1f} {r['eff']:.4f}\n")
        f.write("\n\n")
PY
nblocks=$("$PY" -c "import sys; print(sum(1 for l in open(sys.argv[1]) if l.startswith('\"')))" "$RUN/scaling.dat")
gnuplot <<EOF
set terminal pngcairo size 1300,450 noenhanced font ",10"
set output "$RUN/scaling.png"
set multiplot layout 1,2 title "bam train, $SHAPE shape: scaling over ranks (threads = cores / ranks)"
set key outside right top vertical
set grid
set xlabel "MPI ranks"
set logscale x 2
set xrange [0.8:*]
set ylabel "tokens/s"
set yrange [0:*]
plot for [i=0:$((nblocks - 1))] "$RUN/scaling.dat" index i using 1:2 with linespoints lw 2 pt 7 title columnheader(1)
set ylabel "parallel efficiency (per core, vs 1 rank)"
set yrange [0:*]
plot for [i=0:$((nblocks - 1))] "$RUN/scaling.dat" index i using 1:3 with linespoints lw 2 pt 7 title columnheader(1), 1 with lines dt 2 lc "gray" notitle
unset multiplot
EOF
[[ -s $RUN/scaling.png ]] || die "gnuplot wrote no $RUN/scaling.png"
cat "$RUN/scaling.md"
echo "scaling: $RUN/scaling.csv, $RUN/scaling.md, $RUN/scaling.png"
