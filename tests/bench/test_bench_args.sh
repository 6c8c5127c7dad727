#!/usr/bin/env bash
# The benchmark programs (bam-bench, bam-latency, bam-blas-check) refuse bad options with exit
# code 2 and a message naming the option and the value, print their usage on --help with exit
# code 0, and with a good command line do what they say (bam-bench --steps 0: one state line
# per case; bam-blas-check: the kernels compute every product of the model right);
# bench/compare.sh refuses 2-rank rows without their data before timing anything, and a bad
# --blas; the OpenBLAS kernels bam reports are the ones the environment asks for, and the same
# as bench/torch_bench.py reports for the BLAS PyTorch loads.
set -uo pipefail
BUILD=${BAM_BUILD_DIR:?}
TMP=$(mktemp -d /tmp/bam-test-bench-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0

# expect RC NAME FRAGMENT -- COMMAND...: exit code RC and FRAGMENT in stdout + stderr
expect() {
  local want=$1 name=$2 frag=$3; shift 4
  timeout 120 "$@" >"$TMP/out" 2>&1
  local rc=$?
  if [[ $rc == "$want" ]] && grep -qF -- "$frag" "$TMP/out"; then
    pass=$((pass + 1)); echo "ok   $name: $(head -n 1 "$TMP/out")"
  else
    fail=$((fail + 1)); echo "FAIL $name: exit $rc (want $want), output:"; cat "$TMP/out"
  fi
}

for p in bam-bench bam-latency; do
  B=$BUILD/$p
  [[ -x $B ]] || { echo "FAIL $B is not built"; exit 1; }
  expect 0 "$p --help" "usage: $p" -- "$B" --help
  expect 2 "$p unknown option" "unknown option --bogus" -- "$B" --bogus 1
  expect 2 "$p stray argument" "unexpected argument 'quick'" -- "$B" quick
  expect 2 "$p missing value" "option --shape needs a value" -- "$B" --shape
  expect 2 "$p bad shape" "option --shape: 'huge' is not one of quick paper-small all" -- "$B" --shape huge
  expect 2 "$p bad kind" "option --kind: 'moe' is not one of" -- "$B" --kind moe
  expect 2 "$p non-integer" "option --experts: '4x' is not an integer in [1, 64]" -- "$B" --experts 4x
  expect 2 "$p zero threads" "option --threads: '0' is not an integer" -- "$B" --threads 0
done
B=$BUILD/bam-bench
expect 2 "bam-bench steps out of range" "option --steps: '65' is not an integer in [0, 64]" -- "$B" --steps 65
expect 2 "bam-bench ranks with timing" "--ranks R > 1 only with --steps 0" -- "$B" --ranks 2 --steps 1
expect 2 "bam-latency zero runs" "option --runs: '0' is not an integer in [1, 100]" -- "$BUILD/bam-latency" --runs 0

# bam-blas-check: its options, and the kernels of this environment pass it.
C=$BUILD/bam-blas-check
expect 0 "bam-blas-check --help" "usage: bam-blas-check" -- "$C" --help
expect 2 "bam-blas-check unknown option" "unknown option --bogus" -- "$C" --bogus 1
expect 2 "bam-blas-check zero threads" "option --threads: '0' is not an integer" -- "$C" --threads 0
expect 0 "bam-blas-check" '"wrong_products":0,"ok":true' -- env OMP_NUM_THREADS=2 "$C"

# bench/compare.sh refuses to start 2-rank rows without their prepared corpus (instead of
# failing after the 1-rank rows have run).
SRC=${BAM_SOURCE_DIR:?}
expect 2 "compare.sh without the 2-rank rows' data" "which is not prepared: run data/prepare.sh" -- \
  env BAM_BENCH_DATA="$TMP/none" BUILD="$BUILD" bash -c 'cd "$1" && bench/compare.sh --shape quick --kind dense' _ "$SRC"

expect 2 "compare.sh bad --blas" "option --blas: 'fast' is not one of env auto" -- \
  env BUILD="$BUILD" bash -c 'cd "$1" && bench/compare.sh --blas fast' _ "$SRC"

# The kernels: `bam version` names the ones OpenBLAS runs; an OPENBLAS_CORETYPE in the
# environment (this workplace sets one on some machines) is what it must name then.
"$BUILD/bam" version >"$TMP/out" 2>&1
kernels=$(sed -n 's/^OpenBLAS kernels: \([^ ]*\).*/\1/p' "$TMP/out")
want=${OPENBLAS_CORETYPE:-}
if [[ -n $kernels && $kernels != unknown && ( -z $want || ${kernels,,} == "${want,,}" ) ]]; then
  pass=$((pass + 1)); echo "ok   bam version names the OpenBLAS kernels: $kernels (OPENBLAS_CORETYPE '${want}')"
else
  fail=$((fail + 1)); echo "FAIL bam version: kernels '$kernels', OPENBLAS_CORETYPE '$want':"; cat "$TMP/out"
fi
# ... and says when such a setting keeps AVX2 kernels on a CPU with AVX-512 (read here from
# /proc/cpuinfo, independently of bam's own check).
avx512=1
for f in avx512f avx512cd avx512bw avx512dq avx512vl; do grep -qw "$f" /proc/cpuinfo || avx512=0; done
note=0
grep -qF "this CPU has AVX-512" "$TMP/out" && note=1
expect_note=0
[[ -n $want && $avx512 == 1 && ( ${kernels,,} == haswell || ${kernels,,} == zen ) ]] && expect_note=1
if [[ $note == "$expect_note" ]] && { [[ -n $want ]] || grep -qF "OpenBLAS's own choice" "$TMP/out"; }; then
  pass=$((pass + 1)); echo "ok   bam version's note on the kernels' origin (AVX-512 CPU: $avx512, note: $note)"
else
  fail=$((fail + 1)); echo "FAIL bam version's note: AVX-512 $avx512, note $note, want $expect_note:"; cat "$TMP/out"
fi
PY=${BAM_PYTHON:-/usr/bin/python3}
if "$PY" -c 'import torch' 2>/dev/null; then
  theirs=$(cd "$SRC" && OMP_NUM_THREADS=1 "$PY" -c 'import sys; sys.argv = ["x", "--params-only"]
import importlib.util as u
spec = u.spec_from_file_location("tb", "bench/torch_bench.py"); tb = u.module_from_spec(spec)
spec.loader.exec_module(tb); print(tb.blas_kernels())' 2>&1 | tail -n 1)
  if [[ $theirs == "$kernels" ]]; then
    pass=$((pass + 1)); echo "ok   torch_bench.py's BLAS runs the same kernels: $theirs"
  elif [[ $theirs == "not OpenBLAS ("* ]]; then  # libblas.so.3 chosen by update-alternatives
    echo "skip torch's libblas.so.3 is not an OpenBLAS here: $theirs"
  else
    fail=$((fail + 1)); echo "FAIL torch_bench.py reports kernels '$theirs', bam '$kernels'"
  fi
fi

# A good command: the state of the quick dense model, per rank of 2, no timing.
OMP_NUM_THREADS=1 timeout 300 "$B" --shape quick --kind dense --steps 0 --ranks 2 --threads 1 >"$TMP/out" 2>&1
rc=$?
line=$(grep '"kind":"dense"' "$TMP/out")
if [[ $rc == 0 && $line == *'"params":4719872'* && $line == *'"state_mib":'* && $line == *'"threads":1'* ]]; then
  pass=$((pass + 1)); echo "ok   bam-bench --steps 0: $line"
else
  fail=$((fail + 1)); echo "FAIL bam-bench --steps 0: exit $rc"; cat "$TMP/out"
fi

echo "$pass passed, $fail failed"
((fail == 0))
