#!/usr/bin/env bash
# Data-parallel scaling of `bam pretrain` on this machine: tokens/s and the share of step time
# spent in communication for 1 and 2 ranks (threads per rank = cores / ranks), at the quick
# shape on the prepared corpora, plus checkpoint save and load throughput in MB/s.
#   bench/scaling.sh [CONFIG] [STEPS]     (default configs/quick.ini, 12 steps)
# Writes bench/results/scaling-<host>.jsonl and prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/quick.ini}
STEPS=${2:-12}
[[ -x build/bam ]] || jobs/setup.sh >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
CORES=$(nproc)
mkdir -p bench/results
out=bench/results/scaling-$(hostname).jsonl
: >"$out"
TMP=$(mktemp -d /tmp/bam-bench-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
for np in 1 2; do
  threads=$(( CORES / np > 0 ? CORES / np : 1 ))
  OMP_NUM_THREADS=$threads mpirun -np "$np" --bind-to none --oversubscribe -x OMP_NUM_THREADS \
    build/bam pretrain --config "$CONFIG" --set train.steps="$STEPS" --set train.warmup_steps=1 \
    --set train.log_every=1 --set eval.every=0 --set eval.max_tokens=1024 \
    --set run.out_dir="$TMP/p$np" >"$TMP/p$np.log" 2>&1 || { cat "$TMP/p$np.log"; exit 1; }
  ckpt_s=$(sed -n 's/^checkpoint .* (\([0-9.]*\) s)$/\1/p' "$TMP/p$np.log" | tail -1)
  bytes=$(du -sb "$TMP/p$np/ckpt/step-$(printf %06d "$STEPS")" | cut -f1)
  t0=$EPOCHREALTIME
  build/bam export "$TMP/p$np/ckpt" --with-moments --out "$TMP/e.h5" >/dev/null
  load_s=$(/usr/bin/python3 -c "print($EPOCHREALTIME - $t0)")
  /usr/bin/python3 - "$TMP/p$np/metrics.csv" "$np" "$threads" "$ckpt_s" "$load_s" "$bytes" <<'PY' | tee -a "$out"
import csv, json, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))[2:]  # skip warm-up steps
np_, threads, save_s, load_s, size = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
print(json.dumps({"kind": "dense", "ranks": np_, "threads_per_rank": threads,
                  "tokens_per_s": round(statistics.median(float(r["tokens_per_s"]) for r in rows), 1),
                  "comm_share": round(statistics.median(float(r["comm_share"]) for r in rows), 4),
                  "ckpt_mb": round(size / 1e6, 1), "save_mb_s": round(size / 1e6 / save_s, 1),
                  "load_export_mb_s": round(size / 1e6 / load_s, 1)}))
PY
done
/usr/bin/python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = rows[0]["tokens_per_s"]
print("\n| ranks x threads | tokens/s | speed-up | communication | checkpoint MB | save MB/s | load+export MB/s |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['ranks']} x {r['threads_per_rank']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s']/base:.2f} | "
          f"{100*r['comm_share']:.1f}% | {r['ckpt_mb']} | {r['save_mb_s']} | {r['load_export_mb_s']} |")
PY
