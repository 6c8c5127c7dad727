#!/usr/bin/env bash
# Training throughput of the dense model and the BTX, BAM and BAM shared-KV mixtures at the
# quick and paper-small shapes, with 1 and 2 threads, beside the cblas_sgemm ceiling measured
# in the same run, and peak memory against what the state needs. JSON lines on stdout and in
# bench/results/train-<host>.jsonl. Extra arguments go to bam-bench (e.g. --kind dense,
# --shape quick, --steps 3). The full sweep takes about half an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x build/bam-bench ]] || jobs/setup.sh >/dev/null
mkdir -p bench/results
out=bench/results/train-$(hostname).jsonl
: >"$out"
for t in 1 2; do
  OMP_NUM_THREADS=$t build/bam-bench --threads "$t" "$@" | tee -a "$out"
done
echo "results in $out"
