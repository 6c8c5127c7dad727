#!/usr/bin/env bash
# Training throughput of the dense model and the three mixtures (bam-bench --kind) at the quick
# and paper-small shapes with 1 and 2
# threads, beside the cblas_sgemm ceiling measured in the same run, with peak memory. JSON
# lines on stdout and
# in bench/results/dense-<host>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x build/bam-bench ]] || jobs/setup.sh >/dev/null
mkdir -p bench/results
out=bench/results/dense-$(hostname).jsonl
: >"$out"
for t in 1 2; do
  OMP_NUM_THREADS=$t build/bam-bench --threads "$t" "$@" | tee -a "$out"
done
echo "results in $out"
