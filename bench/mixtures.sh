#!/usr/bin/env bash
# Mixtures on 1 and 2 ranks: BTX, BAM and BAM shared-KV (seed + 3 experts, FFN top-1) trained
# with `bam train` on P = 1 (2 threads) and P = 2 (expert parallelism ep = 2, 1 thread each).
# Reports tokens/s, model GFLOP/s (the paper's FLOP formulas, 3 x forward), communication share
# (gradient exchange + expert-parallel exchanges / step time) and peak resident memory per rank,
# all read from each run's summary.json (medians over the logged steps after the first two).
#   bench/mixtures.sh [quick|paper-small] [STEPS]      (default quick, 6 steps)
# paper-small runs with batch 8 and no accumulation (BATCH=N to change it).
# The seed (random init, 1 step), the 3 experts (1 step each) and the mixtures are built once
# and cached under bench/cache/<shape>/ (delete it to rebuild). Writes
# bench/results/mixtures-<shape>-<host>.jsonl and prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${1:-quick}
STEPS=${2:-6}
CONFIG=configs/$SHAPE.ini
[[ -f $CONFIG ]] || { echo "no $CONFIG (shapes: quick, paper-small)" >&2; exit 2; }
DATA=data/prepared/v4096
if [[ ! -f $DATA/manifest.json || ! -f $DATA/tokenizer/spm.vocab ]]; then
  echo "missing the prepared corpora at $DATA; prepare them first (README, Quickstart):" >&2
  echo "  jobs/setup.sh && build/bam prepare ... (see README.md)" >&2
  exit 2
fi
BAM=build/bam
[[ -x $BAM ]] || { echo "no $BAM: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=${BAM_PYTHON:-/usr/bin/python3}
CACHE=bench/cache/$SHAPE
mkdir -p "$CACHE" bench/results
# Evaluation must not dominate: no periodic eval, a tiny final one on one domain, batch 1.
E=(--set data.dir=$DATA --set data.eval_domains=general --set eval.every=0
   --set eval.max_tokens=256 --set eval.batch_size=1)
# paper-small trains 32 x 4 sequences a step (minutes a step here): the benchmark uses batch 8,
# no accumulation (bench/bench.c's shape); BATCH=N overrides, BATCH= keeps the config's.
[[ $SHAPE == paper-small ]] && BATCH=${BATCH-8}
[[ -n ${BATCH:-} ]] && E+=(--set train.batch_size="$BATCH" --set train.grad_accum=1)

build_cache() {
  if [[ ! -d $CACHE/seed/ckpt ]]; then
    echo "seed: random init, 1 step ($CONFIG)"
    OMP_NUM_THREADS=2 $BAM pretrain --config "$CONFIG" "${E[@]}" --set train.steps=1 \
      --set train.warmup_steps=0 --set run.out_dir="$CACHE/seed" >"$CACHE/seed.log" 2>&1 ||
      { cat "$CACHE/seed.log"; rm -rf "$CACHE/seed"; exit 1; }
  fi
  if [[ ! -d $CACHE/br/legal/ckpt ]]; then
    echo "experts: code, math, legal, 1 step each"
    rm -rf "$CACHE/br"
    OMP_NUM_THREADS=2 $BAM branch --seed "$CACHE/seed/ckpt" --domains code,math,legal "${E[@]}" \
      --set train.steps=1 --set train.warmup_steps=0 --out "$CACHE/br" >"$CACHE/br.log" 2>&1 ||
      { cat "$CACHE/br.log"; rm -rf "$CACHE/br"; exit 1; }
  fi
  for m in btx bam bam-shared-kv; do
    [[ -d $CACHE/mix-$m/ckpt ]] && continue
    echo "mix: $m"
    $BAM mix --method $m --seed "$CACHE/seed/ckpt" \
      --experts "$CACHE/br/code/ckpt,$CACHE/br/math/ckpt,$CACHE/br/legal/ckpt" \
      --out "$CACHE/mix-$m" >"$CACHE/mix-$m.log" 2>&1 ||
      { cat "$CACHE/mix-$m.log"; rm -rf "$CACHE/mix-$m"; exit 1; }
  done
}
build_cache

out=bench/results/mixtures-$SHAPE-$(hostname).jsonl
: >"$out"
TMP=$(mktemp -d /tmp/bam-bench-mix-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
T=(--set train.steps="$STEPS" --set train.warmup_steps=1 --set train.log_every=1
   --set ckpt.every=0)
for m in btx bam bam-shared-kv; do
  for np in 1 2; do
    run=$TMP/$m-p$np
    if [[ $np == 1 ]]; then
      OMP_NUM_THREADS=2 $BAM train --mixture "$CACHE/mix-$m/ckpt" "${E[@]}" "${T[@]}" \
        --out "$run" >"$run.log" 2>&1 || { cat "$run.log"; exit 1; }
    else
      OMP_NUM_THREADS=1 mpirun -np 2 --bind-to none --oversubscribe -x OMP_NUM_THREADS \
        $BAM train --mixture "$CACHE/mix-$m/ckpt" "${E[@]}" "${T[@]}" --set mixture.ep=2 \
        --out "$run" >"$run.log" 2>&1 || { cat "$run.log"; exit 1; }
    fi
    "$PY" - "$run/summary.json" "$m" "$SHAPE" "$STEPS" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY' | tee -a "$out"
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({"shape": sys.argv[3], "method": sys.argv[2], "ranks": s["ranks"], "ep": s["ep"],
                  "threads_per_rank": s["threads"], "steps": int(sys.argv[4]),
                  "tokens_per_s": s["tokens_per_s"], "model_gflops": s["model_gflops"],
                  "comm_share": s["comm_share"], "peak_rss_mib_per_rank": s["peak_rss_mib"],
                  "load_avg_1min_after": float(sys.argv[5])}))
PY
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
names = {"btx": "BTX", "bam": "BAM", "bam-shared-kv": "BAM shared-KV"}
print("\n| shape | method | ranks x threads | ep | tokens/s | model GFLOP/s | communication | peak RSS / rank MiB |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['shape']} | {names[r['method']]} | {r['ranks']} x {r['threads_per_rank']} | {r['ep']} | "
          f"{r['tokens_per_s']:,.0f} | {r['model_gflops']:.1f} | {100 * r['comm_share']:.1f}% | "
          f"{r['peak_rss_mib_per_rank']:,.0f} |")
PY
