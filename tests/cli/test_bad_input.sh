#!/usr/bin/env bash
# Bad input gives one clear line on stderr and a non-zero exit, never a crash or a hang.
set -uo pipefail
BAM=${BAM_BIN:?} DATA=${BAM_TEST_DATA:?} SRC=${BAM_SOURCE_DIR:?} PY=${BAM_PYTHON:-/usr/bin/python3}
TMP=$(mktemp -d /tmp/bam-test-cli-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0

# expect_error NAME FRAGMENT... -- COMMAND...: non-zero exit, one stderr line holding each fragment
expect_error() {
  local name=$1; shift
  local frags=()
  while [[ $1 != -- ]]; do frags+=("$1"); shift; done
  shift
  timeout 120 "$@" >"$TMP/out" 2>"$TMP/err"
  local rc=$? ok=1
  local lines; lines=$(grep -c . "$TMP/err")
  if [[ $rc == 0 || $rc == 124 || $rc -ge 128 ]]; then echo "FAIL $name: exit code $rc"; ok=0; fi
  if [[ $lines != 1 ]]; then echo "FAIL $name: $lines stderr lines:"; cat "$TMP/err"; ok=0; fi
  for f in "${frags[@]}"; do
    grep -qF -- "$f" "$TMP/err" || { echo "FAIL $name: stderr lacks '$f': $(cat "$TMP/err")"; ok=0; }
  done
  if ((ok)); then pass=$((pass + 1)); echo "ok   $name: $(cat "$TMP/err")"; else fail=$((fail + 1)); fi
}

cfg() { # cfg NAME TEXT: a config file based on the tiny test config
  { cat "$SRC/tests/configs/tiny.ini"; printf '%s\n' "$2"; } >"$TMP/$1.ini"
  echo "$TMP/$1.ini"
}
cd "$SRC"

expect_error "no command" "no command given" -- "$BAM"
expect_error "unknown command" "unknown command 'frobnicate'" -- "$BAM" frobnicate
expect_error "unknown option" "unknown option '--bogus'" -- "$BAM" pretrain --bogus 1
expect_error "missing --config" "--config FILE is required" -- "$BAM" pretrain
expect_error "missing config file" "$TMP/nope.ini" "cannot open" -- "$BAM" pretrain --config "$TMP/nope.ini"
printf '[model]\nn_layers 2\n' >"$TMP/malformed.ini"
expect_error "malformed config" "malformed.ini:2:" "malformed" -- "$BAM" pretrain --config "$TMP/malformed.ini"
printf '[model]\nn_layers = 2\ncolour = blue\n' >"$TMP/unknown.ini"
expect_error "unknown key" "unknown.ini:3:" "unknown key 'colour'" -- "$BAM" pretrain --config "$TMP/unknown.ini"
printf '[training]\nsteps = 2\n' >"$TMP/section.ini"
expect_error "unknown section" "section.ini:2:" "unknown section [training]" -- "$BAM" pretrain --config "$TMP/section.ini"
expect_error "out of range" "train.lr" "out of range" -- "$BAM" pretrain --config "$SRC/tests/configs/tiny.ini" --set train.lr=-3
expect_error "bad --set" "unknown key 'stepz'" -- "$BAM" pretrain --config "$SRC/tests/configs/tiny.ini" --set train.stepz=3

# data problems
mkdir -p "$TMP/nodata"
expect_error "missing tokenizer" "$TMP/nodata/tokenizer/spm.vocab" -- \
  "$BAM" pretrain --config "$SRC/tests/configs/tiny.ini" --set data.dir="$TMP/nodata" --set run.out_dir="$TMP/run"
mkdir -p "$TMP/notokens/tokenizer" && cp "$DATA/tokenizer/spm.vocab" "$TMP/notokens/tokenizer/"
expect_error "missing token file" "$TMP/notokens/tokens/general.h5" -- \
  "$BAM" pretrain --config "$SRC/tests/configs/tiny.ini" --set data.dir="$TMP/notokens" --set run.out_dir="$TMP/run"
expect_error "vocabulary mismatch (config)" "model.vocab_size" -- \
  "$BAM" pretrain --config "$SRC/tests/configs/tiny.ini" --set model.vocab_size=2048 --set run.out_dir="$TMP/run"
mkdir -p "$TMP/wrongvocab/tokens" && cp -r "$DATA/tokenizer" "$TMP/wrongvocab/"
cp "$DATA/tokens/general.h5" "$TMP/wrongvocab/tokens/general.h5"
"$PY" -c "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); f.attrs['vocab_size']=512; f.close()" "$TMP/wrongvocab/tokens/general.h5"
expect_error "token file of another vocabulary" "wrongvocab/tokens/general.h5" "vocab_size" -- \
  "$BAM" pretrain --config "$SRC/tests/configs/tiny.ini" --set data.dir="$TMP/wrongvocab" --set run.out_dir="$TMP/run"

# checkpoints
expect_error "eval: missing checkpoint" "$TMP/none.h5" -- "$BAM" eval --checkpoint "$TMP/none.h5"
echo "not a checkpoint" >"$TMP/junk.h5"
expect_error "eval: junk checkpoint" "junk.h5" -- "$BAM" eval --checkpoint "$TMP/junk.h5"
expect_error "generate: no prompt" "--prompt TEXT is required" -- "$BAM" generate --checkpoint "$TMP/junk.h5"

# one failing rank aborts the whole MPI job instead of leaving the other waiting
if [[ -n "${MPIEXEC:-}" ]]; then
  start=$(date +%s)
  timeout 120 "$MPIEXEC" -np 2 "$BAM" pretrain --config "$TMP/nope.ini" >"$TMP/out" 2>"$TMP/err"
  rc=$? took=$(( $(date +%s) - start ))
  if [[ $rc != 0 && $rc != 124 ]] && grep -qF "$TMP/nope.ini" "$TMP/err"; then
    pass=$((pass + 1)); echo "ok   mpirun -np 2 failure aborts in ${took}s (exit $rc)"
  else
    fail=$((fail + 1)); echo "FAIL mpirun -np 2 failure: exit $rc after ${took}s"; cat "$TMP/err"
  fi
fi

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
