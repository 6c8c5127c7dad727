#!/usr/bin/env bash
# bam beside PyTorch: the same training step (forward + backward + clip + AdamW) of the dense
# model and the BTX, BAM and BAM shared-KV mixtures, timed by bam-bench (bench/bench.c) and by
# an independent PyTorch implementation (bench/torch_bench.py), one process at a time.
#
#   bench/compare.sh [--shape quick|paper-small|all] [--kind dense|btx|bam|bam-shared-kv|all]
#                    [--threads 1|2|all] [--ranks 1|2|all] [--steps N] [--repeat R] [--build DIR]
#                    [--blas env|auto]
#   bench/compare.sh --table        only rewrite the table from the .jsonl
#
# --blas: which OpenBLAS kernels both programs run. env (default): whatever the environment
# picks (OPENBLAS_CORETYPE, which some machines set: this workplace's AMD EPYC machines force the
# AVX2 "Haswell" kernels because older OpenBLAS builds misbehave on some processors). auto:
# unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for this run alone, for bam and PyTorch alike, so
# OpenBLAS picks by itself (AVX-512 kernels there). Every row records the kernels of both sides
# (they must be the same) and the table keeps the two settings apart.
#
# Lists may be comma-separated (--kind btx,bam). Per shape, kind and thread count (ranks 1):
# bam-bench and torch_bench.py, 2 warm-up steps then the median of N (default: 3 on quick,
# 1 on paper-small, to keep the full sweep near 25 minutes). --repeat R runs each such pair R
# times, alternating bam and PyTorch, and keeps each side's median run: on a shared machine the
# rate of either side drifts by 10-20% between minutes, and alternating puts both sides in the
# same minutes; the table then gives the range of the R pairwise ratios beside the ratio of the
# medians. Per shape and kind on 2 ranks x
# 1 thread: our trainer, data parallel (`bam pretrain` for dense, `bam train --mixture` for
# the mixtures built once under bench/cache/<shape>/ as bench/mixtures.sh builds them;
# tokens/s from its summary.json, the median over the steps after the first two) beside
# PyTorch's DistributedDataParallel over gloo.
# First bam-blas-check checks that the OpenBLAS kernels compute bam's products right.
# Each row: tokens/s, model GFLOP/s (3 x forward FLOPs per token, docs/method.md section 5),
# its share of the sgemm ceiling bam-bench measures in the same run (at the row's total thread
# count), PyTorch's tokens/s and the ratio, peak RSS against what the state needs (params,
# grads, AdamW moments, saved activations; per rank on 2 ranks, where AdamW is sharded).
# Appends JSON lines to bench/results/compare-<host>-<isa>.jsonl (isa: avx512, avx2) and writes
# bench/results/compare-<host>-<isa>.md: the newest row of every case there, with its command and
# date (runs of subsets add up; empty the .jsonl to start afresh). Not part of the test suite.
# docs/performance.md explains the columns and how FLOPs are counted.
set -euo pipefail
cd "$(dirname "$0")/.."
CMD="bench/compare.sh${*:+ $*}"

usage() { echo "usage:" >&2; sed -n '6,9p' "$0" | sed 's/^#//' >&2; exit 2; }  # the synopsis above
# list VALUE "all choices": "all" -> every choice, "a,b" -> "a b", each checked
list() {
  local v=${1//,/ } out="" x
  [[ $v == all ]] && { echo "$2"; return; }
  for x in $v; do
    [[ " $2 " == *" $x "* ]] || { echo "unknown value '$x' (one of: $2, all)" >&2; exit 2; }
    out+="$x "
  done
  echo "${out% }"
}
SHAPES="quick paper-small" KINDS="dense btx bam bam-shared-kv" THREADS="1 2" RANKS="1 2"
STEPS="" REPEAT=1 BUILD=${BUILD:-build} TABLE_ONLY="" BLAS=env
while (($#)); do
  if [[ $1 == --table ]]; then TABLE_ONLY=1 SHAPES=""; shift; continue; fi
  [[ $# -ge 2 ]] || usage
  case $1 in
    --shape) SHAPES=$(list "$2" "quick paper-small") ;;
    --kind) KINDS=$(list "$2" "dense btx bam bam-shared-kv") ;;
    --threads) THREADS=$(list "$2" "1 2") ;;
    --ranks) RANKS=$(list "$2" "1 2") ;;
    --steps) STEPS=$2; [[ $STEPS =~ ^[1-9][0-9]*$ ]] || usage ;;
    --repeat) REPEAT=$2; [[ $REPEAT =~ ^[1-9][0-9]*$ ]] || usage ;;
    --build) BUILD=$2 ;;
    --blas) BLAS=$2
            [[ $BLAS == env || $BLAS == auto ]] || { echo "option --blas: '$2' is not one of env auto" >&2; exit 2; } ;;
    *) usage ;;
  esac
  shift 2
done

[[ -z $TABLE_ONLY ]] || SHAPES=""
# auto: OpenBLAS's own choice of kernels, in this run only (both programs inherit it)
[[ $BLAS == env ]] || unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
PY=${BAM_PYTHON:-/usr/bin/python3}
"$PY" -c 'import torch' 2>/dev/null || { echo "$PY cannot import torch (apt-get install python3-torch)" >&2; exit 2; }
for b in bam-bench bam bam-blas-check; do
  [[ -n $TABLE_ONLY || -x $BUILD/$b ]] || { echo "no $BUILD/$b: cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release && cmake --build $BUILD -j2" >&2; exit 2; }
done
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Results are kept per machine kind: the host name and the widest vector unit (a Debian VM's
# host name is often just "vm", and an AVX-512 and an AVX2 machine give other tables).
isa() { if grep -qw avx512f /proc/cpuinfo; then echo avx512; elif grep -qw avx2 /proc/cpuinfo; then echo avx2; else echo sse; fi; }
HOST=$(hostname)-$(isa)
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mkdir -p bench/results
OUT=bench/results/compare-$HOST.jsonl MD=bench/results/compare-$HOST.md
TMP=$(mktemp -d /tmp/bam-compare-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
DATE=$(date -u +%Y-%m-%dT%H:%MZ)
# Before timing: do the kernels this run gets compute bam's products right? (bench/blas_check.c)
if [[ -n $SHAPES ]]; then
  OMP_NUM_THREADS=2 "$BUILD/bam-blas-check" >&2 ||
    { echo "the OpenBLAS kernels of this run compute wrong products: nothing timed" >&2; exit 1; }
fi

steps_for() { if [[ -n $STEPS ]]; then echo "$STEPS"; elif [[ $1 == quick ]]; then echo 3; else echo 1; fi; }
batch_for() { if [[ $1 == quick ]]; then echo 16; else echo 8; fi; }

# The mixtures our trainer starts from: seed (random init, 1 step), 3 experts (1 step each),
# mixed; the same cache and recipe as bench/mixtures.sh (either script reuses the other's).
DATA=${BAM_BENCH_DATA:-data/prepared/v4096} # the 2-rank rows train on it
if [[ -n $SHAPES && " $RANKS " == *" 2 "* && ! -f $DATA/manifest.json ]]; then
  echo "the 2-rank rows train on $DATA, which is not prepared: run data/prepare.sh --out $DATA" \
    "(a few minutes), or measure the 1-rank rows alone with --ranks 1" >&2
  exit 2
fi
trainer_opts() { # shape -> common --set options of the trainer runs
  local b; b=$(batch_for "$1")
  echo "--set data.dir=$DATA --set data.eval_domains=general --set eval.every=0" \
       "--set eval.max_tokens=256 --set eval.batch_size=1 --set train.batch_size=$b" \
       "--set train.grad_accum=1"
}
build_cache() { # shape
  local shape=$1 cache=bench/cache/$1 cfg=configs/$1.ini m
  local -a E
  read -r -a E <<<"$(trainer_opts "$shape")"
  if [[ ! -d $cache/seed/ckpt ]]; then
    echo "cache: seed of $shape (random init, 1 step)" >&2
    mkdir -p "$cache"
    OMP_NUM_THREADS=2 "$BUILD/bam" pretrain --config "$cfg" "${E[@]}" --set train.steps=1 \
      --set train.warmup_steps=0 --set run.out_dir="$cache/seed" >"$cache/seed.log" 2>&1 ||
      { cat "$cache/seed.log" >&2; rm -rf "$cache/seed"; exit 1; }
  fi
  if [[ ! -d $cache/br/legal/ckpt ]]; then
    echo "cache: experts code, math, legal of $shape (1 step each)" >&2
    rm -rf "$cache/br"
    OMP_NUM_THREADS=2 "$BUILD/bam" branch --seed "$cache/seed/ckpt" --domains code,math,legal \
      "${E[@]}" --set train.steps=1 --set train.warmup_steps=0 --out "$cache/br" \
      >"$cache/br.log" 2>&1 || { cat "$cache/br.log" >&2; rm -rf "$cache/br"; exit 1; }
  fi
  for m in btx bam bam-shared-kv; do
    [[ -d $cache/mix-$m/ckpt ]] && continue
    echo "cache: mix $m of $shape" >&2
    "$BUILD/bam" mix --method $m --seed "$cache/seed/ckpt" \
      --experts "$cache/br/code/ckpt,$cache/br/math/ckpt,$cache/br/legal/ckpt" \
      --out "$cache/mix-$m" >"$cache/mix-$m.log" 2>&1 ||
      { cat "$cache/mix-$m.log" >&2; rm -rf "$cache/mix-$m"; exit 1; }
  done
}

# combine SHAPE KIND RANKS THREADS STEPS SOURCE BAM_JSON TORCH_JSON NEED_JSON: one JSON row.
# BAM_JSON and TORCH_JSON may hold several lines (--repeat, in pair order): each side's
# median run by tokens/s is the row's (the lower middle for an even count).
combine() {
  "$PY" - "$@" "$HOST" "$DATE" "$(cut -d' ' -f1 /proc/loadavg)" "$CMD" <<'PY'
import json, sys
shape, kind, ranks, threads, steps, source, ours, theirs, need, host, date, load, cmd = sys.argv[1:14]
ours_runs = [json.loads(l) for l in ours.splitlines() if l.strip()]
theirs_runs = [json.loads(l) for l in theirs.splitlines() if l.strip()]
median = lambda runs: sorted(runs, key=lambda r: r.get("tokens_per_s") or 0)[(len(runs) - 1) // 2]
ours = median(ours_runs)
theirs = median(theirs_runs) if theirs_runs else {}
pair = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours_runs, theirs_runs)
        if t.get("tokens_per_s")]
need = json.loads(need) if need else ours
ceiling = need["sgemm_ceiling_gflops"]
if "params" in ours and theirs.get("params") not in (None, ours["params"]):
    sys.exit(f"parameter counts differ: bam {ours['params']}, torch {theirs['params']} ({kind} {shape})")
if "params" in need and theirs.get("params") not in (None, need["params"]):
    sys.exit(f"parameter counts differ: bam {need['params']}, torch {theirs['params']} ({kind} {shape})")
blas, torch_blas = need.get("blas", ours.get("blas")), theirs.get("blas")
if blas and torch_blas and blas != torch_blas:
    if torch_blas.startswith("not OpenBLAS"):  # torch's libblas.so.3 is another BLAS: say so
        print(f"note: the BLAS torch loaded is {torch_blas}", file=sys.stderr)
    else:
        sys.exit(f"the two sides ran different OpenBLAS kernels: bam {blas}, torch {torch_blas}")
tps, gf = ours["tokens_per_s"], ours["model_gflops"]
rss = max(r["peak_rss_mib"] for r in ours_runs)
state = need["state_mib"]
ttps = theirs.get("tokens_per_s")
row = {"kind": kind, "shape": shape, "ranks": int(ranks), "threads": int(threads),
       "steps": int(steps), "repeats": len(ours_runs), "source": source, "params": need["params"],
       "blas": blas, "torch_blas": torch_blas,
       "tokens_per_s": tps, "model_gflops": gf, "sgemm_ceiling_gflops": ceiling,
       "ceiling_share": round(gf / ceiling, 3), "torch_tokens_per_s": ttps,
       "torch_model_gflops": theirs.get("model_gflops"),
       "ratio_to_torch": round(tps / ttps, 2) if ttps else None,
       "pair_ratio_range": [round(min(pair), 2), round(max(pair), 2)] if len(pair) > 1 else None,
       "peak_rss_mib": round(rss), "state_need_mib": round(state),
       "rss_over_need": round(rss / state, 3), "torch_peak_rss_mib": theirs.get("peak_rss_mib"),
       "torch_note": theirs.get("error"), "host": host, "date": date,
       "load_avg_1min_after": float(load), "command": cmd}
print(json.dumps(row))
PY
}

for shape in $SHAPES; do
  n=$(steps_for "$shape")
  for kind in $KINDS; do
    for t in $THREADS; do
      [[ " $RANKS " == *" 1 "* ]] || continue
      ours="" theirs=""
      for ((r = 1; r <= REPEAT; r++)); do
        echo "== $shape $kind, 1 rank x $t thread(s), $n steps, run $r of $REPEAT" >&2
        ours+=$(OMP_NUM_THREADS=$t "$BUILD/bam-bench" --shape "$shape" --kind "$kind" --threads "$t" \
                  --steps "$n" | tail -n 1)$'\n'
        theirs+=$("$PY" bench/torch_bench.py --shape "$shape" --kind "$kind" --threads "$t" \
                    --steps "$n")$'\n'
      done
      combine "$shape" "$kind" 1 "$t" "$n" bam-bench "$ours" "$theirs" "" | tee -a "$OUT"
    done
    [[ " $RANKS " == *" 2 "* ]] || continue
    echo "== $shape $kind, 2 ranks x 1 thread, $n steps" >&2
    # ceiling (2 threads: the two ranks' cores) and the state per rank
    need=$(OMP_NUM_THREADS=2 "$BUILD/bam-bench" --shape "$shape" --kind "$kind" --threads 2 \
             --steps 0 --ranks 2 | tail -n 1)
    read -r -a E <<<"$(trainer_opts "$shape")"
    run=$TMP/$shape-$kind
    T=(--set train.steps=$((n + 2)) --set train.warmup_steps=1 --set train.log_every=1
       --set ckpt.every=0)
    if [[ $kind == dense ]]; then
      src="bam pretrain"
      cmd=("$BUILD/bam" pretrain --config "configs/$shape.ini" "${E[@]}" "${T[@]}"
           --set run.out_dir="$run")
    else
      build_cache "$shape"
      src="bam train"
      cmd=("$BUILD/bam" train --mixture "bench/cache/$shape/mix-$kind/ckpt" "${E[@]}" "${T[@]}"
           --set mixture.ep=1 --out "$run")
    fi
    OMP_NUM_THREADS=1 mpirun -np 2 --bind-to none --oversubscribe -x OMP_NUM_THREADS "${cmd[@]}" \
      >"$run.log" 2>&1 || { cat "$run.log" >&2; exit 1; }
    ours=$(cat "$run/summary.json")
    rm -rf "$run"
    if theirs=$("$PY" bench/torch_bench.py --shape "$shape" --kind "$kind" --threads 1 --ranks 2 \
                  --steps "$n"); then :; else
      theirs='{"error": "torch_bench.py --ranks 2 failed (torch.distributed gloo)"}'
    fi
    combine "$shape" "$kind" 2 1 "$n" "$src" "$ours" "$theirs" "$need" | tee -a "$OUT"
  done
done

# The table: the newest row of every case in $OUT (so runs of subsets add up), with the
# command and date that produced each.
"$PY" - "$OUT" "$HOST" "$CPU" "$(nproc)" >"$MD" <<'PY'
import json, sys
import torch
rows, host, cpu, cores = sys.argv[1:5]
latest = {}
for line in open(rows):
    if line.strip():
        r = json.loads(line)
        r["blas"] = r.get("blas") or "not recorded"
        latest[(r["blas"], r["shape"], r["kind"], r["ranks"], r["threads"])] = r
order = lambda k: (k[0], ["quick", "paper-small"].index(k[1]),
                   ["dense", "btx", "bam", "bam-shared-kv"].index(k[2]), k[3], k[4])
rows = [latest[k] for k in sorted(latest, key=order)]
runs = []
for r in rows:
    run = (r.get("command", "?"), r["date"])
    if run not in runs:
        runs.append(run)
names = {"dense": "dense", "btx": "BTX", "bam": "BAM", "bam-shared-kv": "BAM shared-KV"}
fmt = lambda v, f: "n/a" if v is None else format(v, f)
# the most any implementation could lead this PyTorch run by: the ceiling over PyTorch's rate
bound = lambda r: (r["sgemm_ceiling_gflops"] / r["torch_model_gflops"]
                   if r.get("torch_model_gflops") else None)
print(f"# bam beside PyTorch on {host}\n")
print(f"Machine: {cpu}, {cores} cores.\n")
print(f"PyTorch {torch.__version__}. Training steps (forward + backward + clip + AdamW), 2 "
      "warm-up steps then the median of `steps`. Rows 1 x T: bam-bench beside "
      "bench/torch_bench.py; rows 2 x 1: `bam pretrain` / `bam train` data parallel beside "
      "PyTorch DistributedDataParallel (gloo). Columns: docs/performance.md. Newest row per "
      f"case of bench/results/compare-{host}.jsonl. BLAS: the OpenBLAS kernels both sides ran "
      "(`--blas env`: as the machine's environment picks them; `--blas auto`: OpenBLAS's own "
      "choice), each set of rows with the sgemm ceiling of its own kernels. From:\n")
for i, (cmd, date) in enumerate(runs, 1):
    print(f"{i}. `{cmd}` on {date} (UTC)")
print("\n| BLAS | shape | model | ranks x threads | steps x runs | tokens/s | model GFLOP/s | of sgemm ceiling "
      "| PyTorch tokens/s | bam / PyTorch | ceiling / PyTorch | peak RSS MiB | need MiB "
      "| RSS / need | load | run |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    run = runs.index((r.get("command", "?"), r["date"])) + 1
    rng = r.get("pair_ratio_range")
    ratio = fmt(r['ratio_to_torch'], '.2f') + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng else "")
    print(f"| {r['blas']} | {r['shape']} | {names[r['kind']]} | {r['ranks']} x {r['threads']} | "
          f"{r['steps']} x {r.get('repeats', 1)} | "
          f"{r['tokens_per_s']:,.0f} | {r['model_gflops']:.1f} | "
          f"{100 * r['ceiling_share']:.0f}% of {r['sgemm_ceiling_gflops']:.0f} | "
          f"{fmt(r['torch_tokens_per_s'], ',.0f')} | {ratio} | "
          f"{fmt(bound(r), '.2f')} | {r['peak_rss_mib']:,} | {r['state_need_mib']:,} | {r['rss_over_need']:.2f} | "
          f"{r['load_avg_1min_after']:.1f} | {run} |")
notes = {r["torch_note"] for r in rows if r["torch_note"]}
for n_ in sorted(notes):
    print(f"\nPyTorch n/a: {n_}")
PY
cat "$MD"
echo "rows appended to $OUT; table in $MD" >&2
