#!/usr/bin/env bash
# The BAM paper's inference latency case (256-token prompt, 16 greedy tokens, batch 1) for the
# dense model and the BTX, BAM and BAM shared-KV mixtures (4 experts, FFN top-1, soft
# attention routing) at the quick and paper-small shapes, with and without the KV cache, on
# 1 and 2 threads. One JSON line per case on stdout, appended to
# bench/results/latency-<host>-<isa>.jsonl; bench/results/latency-<host>-<isa>.md tables the newest line
# of every case there (so runs of one shape or kind at a time compose).
#
#   bench/latency.sh [bam-latency options]     e.g. --shape quick --runs 3 --nocache-runs 1
#   THREADS="1 2" BUILD=build BLAS=env         environment, with their defaults
#
# BLAS=auto unsets OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for this run, so OpenBLAS picks its
# kernels by itself instead of as the environment says (bench/compare.sh --blas explains);
# every line records the kernels it ran, and the table keeps them apart.
#
# Defaults: 10 timed runs after one warm-up, with and without the cache. Without the cache
# the paper-small BAM case recomputes 16 windows of ~264 tokens per run (about a minute per
# run on 2 busy cores): --nocache-runs 3 shortens the contrast and leaves the cached figures
# as they are. A quiet machine matters: every figure is a wall-clock time.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
case ${BLAS:=env} in
  env) ;;
  auto) unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE ;;
  *) echo "BLAS=$BLAS: one of env, auto" >&2; exit 2 ;;
esac
if [[ ! -x $BUILD/bam-latency || ! -x $BUILD/bam-blas-check ]]; then
  if [[ -f $BUILD/CMakeCache.txt ]]; then
    cmake --build "$BUILD" --target bam-latency bam-blas-check -j "$(nproc)" >/dev/null
  else
    jobs/setup.sh >/dev/null
  fi
fi
# before timing: the kernels must compute bam's products right (bench/blas_check.c)
OMP_NUM_THREADS=2 "$BUILD/bam-blas-check" >&2 ||
  { echo "the OpenBLAS kernels of this run compute wrong products: nothing timed" >&2; exit 1; }
# per machine kind: the host name and the widest vector unit (as bench/compare.sh)
if grep -qw avx512f /proc/cpuinfo; then isa=avx512; elif grep -qw avx2 /proc/cpuinfo; then isa=avx2; else isa=sse; fi
host=$(hostname)-$isa
mkdir -p bench/results
jsonl=bench/results/latency-$host.jsonl
md=bench/results/latency-$host.md
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u +%Y-%m-%dT%H:%MZ)
for t in ${THREADS:-1 2}; do
  OMP_NUM_THREADS=$t "$BUILD/bam-latency" --threads "$t" "$@" | tee -a "$jsonl"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')

invocation="bench/latency.sh${*:+ $*}"
[[ $BLAS == env ]] || invocation="BLAS=$BLAS $invocation"
python3 - "$jsonl" "$md" "$host" "$started" "$cpu" "$load_before" "$load_after" "$invocation" <<'PY'
import json, sys
src, md, host, started, cpu, lb, la, args = sys.argv[1:9]
latest = {}  # the newest line of every (shape, kind, threads): separate runs compose
for line in open(src):
    if line.strip():
        r = json.loads(line)
        r["blas"] = r.get("blas") or "not recorded"
        latest[(r["blas"], r["shape"], r["kind"], r["threads"])] = r
order = {"quick": 0, "paper-small": 1}
kinds = {"dense": 0, "btx": 1, "bam": 2, "bam-shared-kv": 3}
rows = sorted(latest.values(),
              key=lambda r: (r["blas"], order.get(r["shape"], 9), r["threads"],
                             kinds.get(r["kind"], 9)))
def f(x, nd=1):
    return "-" if x in (None, 0) else f"{x:,.{nd}f}"
out = [f"# Inference latency on {host}", "",
       f"The newest result of every case in `{src}`; the last invocation was "
       f"`{args}`, started {started} on {cpu}, load "
       f"average (1, 5, 15 min) {lb} before it and {la} after.", "",
       "The paper's case: a prompt of random tokens (256), then greedy tokens (16), batch 1; "
       "medians over the timed runs after a warm-up (runs: with / without the cache). Prefill: "
       "the prompt's pass, which yields the first new token; decode: each later token, one "
       "cached step; total: both. Step reads: the weights one decode step reads (only the "
       "experts a token uses) plus the K/V cache at the mean context of the steps; GB/s: the "
       "rate the measured step time implies. Best total: the fastest cached run (the least "
       "disturbed by other work). Load: the 1-minute load average after the case "
       "(2 cores: above 2 means other work shared them). BLAS: the OpenBLAS kernels of the run.", "",
       "| BLAS | shape | kind | threads | prefill ms | decode ms/token | total ms | no cache: prefill ms "
       "| no cache: ms/token | no cache: total ms | speed-up | best total ms | KV cache KiB/token "
       "| step reads MiB | step GB/s | same tokens | runs | load |",
       "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    same = {True: "yes", False: "NO", None: "-"}[r["same_tokens"]]
    out.append(f"| {r['blas']} | {r['shape']} | {r['kind']} | {r['threads']} | {f(r['prefill_ms'])} | "
               f"{f(r['decode_ms_per_token'], 2)} | {f(r['total_ms'])} | {f(r['nocache_prefill_ms'])} | "
               f"{f(r['nocache_ms_per_token'])} | {f(r['nocache_total_ms'])} | "
               f"{f(r['speedup_total'])}x | {f(r['best_total_ms'])} | {r['kv_bytes_per_token'] / 1024:.0f} | "
               f"{r['step_weight_mib'] + r['step_kv_read_mib']:.0f} | {f(r['step_gb_per_s'])} | {same} | "
               f"{r['runs']} / {r['nocache_runs']} | {r.get('load_average', 0):.1f} |")
open(md, "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
echo "results in $jsonl and $md"
