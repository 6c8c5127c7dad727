#!/usr/bin/env bash
# bam mix through the real program: bad requests give one clear stderr line and a non-zero
# exit; a checkpoint that was not branched from the seed is refused. When `bam branch` is
# available, the whole path runs: seed -> two experts -> a mixture of every method, each
# inspected (kind, lineage, tensors), also under mpirun where only rank 0 works.
set -uo pipefail
BAM=${BAM_BIN:?} DATA=${BAM_TEST_DATA:?} SRC=${BAM_SOURCE_DIR:?}
MPI=${MPIEXEC:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
TMP=$(mktemp -d /tmp/bam-test-mix-cli-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }

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
cd "$SRC"

# ---- the command line itself ------------------------------------------------------------------
S=$TMP/seed/ckpt
expect_error "unknown method" "unknown method 'moe' (btx, bam, bam-shared-kv)" -- \
  "$BAM" mix --method moe --seed "$S" --experts "$S" --out "$TMP/m"
expect_error "missing --method" "--method" "required" -- "$BAM" mix --seed "$S" --experts "$S" --out "$TMP/m"
expect_error "missing --seed" "--seed PATH is required" -- "$BAM" mix --method bam --experts "$S" --out "$TMP/m"
expect_error "missing --experts" "--experts P1,P2,... is required" -- "$BAM" mix --method bam --seed "$S" --out "$TMP/m"
expect_error "missing --out" "--out DIR is required" -- "$BAM" mix --method bam --seed "$S" --experts "$S"
expect_error "unknown option" "unknown option '--bogus'" -- "$BAM" mix --method bam --bogus 1
expect_error "option without a value" "--out needs a value" -- "$BAM" mix --method bam --seed "$S" --experts "$S" --out
expect_error "empty expert in the list" "--experts has an empty entry" -- \
  "$BAM" mix --method bam --seed "$S" --experts "$S,,$S" --out "$TMP/m"
expect_error "bad top-k" "--ffn-top-k" "'zero'" -- "$BAM" mix --method bam --seed "$S" --experts "$S" --out "$TMP/m" --ffn-top-k zero
expect_error "bad router seed" "--router-seed" "'-3'" -- \
  "$BAM" mix --method bam --seed "$S" --experts "$S" --out "$TMP/m" --router-seed -3
expect_error "missing seed checkpoint" "$S" -- "$BAM" mix --method bam --seed "$S" --experts "$S" --out "$TMP/m"

# ---- a real seed -----------------------------------------------------------------------------
"$BAM" pretrain --config tests/configs/tiny.ini --set data.dir="$DATA" --set run.out_dir="$TMP/seed" \
  --set train.steps=5 --set train.warmup_steps=1 --set eval.every=0 --set eval.max_tokens=1024 \
  >"$TMP/seed.log" 2>&1
check "a tiny seed pretrains" $?

# The seed is not a domain expert of itself: its lineage has no seed_id.
expect_error "the seed as its own experts" "$S/step-" "no seed_id" -- \
  "$BAM" mix --method bam --seed "$S" --experts "$S,$S" --out "$TMP/self"
test ! -e "$TMP/self/ckpt/latest"
check "a refused mix writes nothing" $?
expect_error "top-k larger than the experts" "FFN top-k = 4" -- \
  "$BAM" mix --method btx --seed "$S" --experts "$S" --out "$TMP/m" --ffn-top-k 4
expect_error "attention top-k for btx" "btx has no attention experts" -- \
  "$BAM" mix --method btx --seed "$S" --experts "$S" --out "$TMP/m" --att-top-k 1
if [[ -n "${MPIEXEC:-}" ]]; then
  timeout 120 "$MPI" -np 2 --oversubscribe --bind-to none "$BAM" mix --method bam --seed "$S" \
    --experts "$S" --out "$TMP/self2" >"$TMP/out" 2>"$TMP/err"
  rc=$?
  [[ $rc != 0 && $rc != 124 ]] && grep -qF "no seed_id" "$TMP/err"
  check "mpirun -np 2: rank 0's refusal ends the job (exit $rc)" $?
fi

# ---- the whole path, once bam branch exists ---------------------------------------------------
if "$BAM" help | grep -q '^  branch '; then
  OMP_NUM_THREADS=2 timeout 600 "$BAM" branch --seed "$S" --domains code,math --out "$TMP/br" \
    --set train.steps=3 --set train.warmup_steps=1 --set eval.every=0 --set eval.max_tokens=1024 \
    --set data.eval_domains=code,math >"$TMP/branch.log" 2>&1
  check "bam branch makes two experts" $?
  EX=$TMP/br/code/ckpt,$TMP/br/math/ckpt
  for m in btx bam bam-shared-kv; do
    extra=(); [[ $m == btx ]] && extra=(--extra-ffn-experts 1 --ffn-top-k 2 --renormalize)
    timeout 300 "$BAM" mix --method $m --seed "$S" --experts "$EX" --out "$TMP/mix-$m" "${extra[@]}" \
      >"$TMP/mix-$m.log" 2>&1
    check "bam mix --method $m exits 0" $?
    "$BAM" inspect "$TMP/mix-$m/ckpt" >"$TMP/mix-$m.inspect" 2>&1 &&
      grep -q "^kind        $m\$" "$TMP/mix-$m.inspect" && grep -q "^step        0\$" "$TMP/mix-$m.inspect" &&
      grep -q "method = $m" "$TMP/mix-$m.inspect" && grep -q "kind = mixture" "$TMP/mix-$m.inspect" &&
      grep -q "expert.1.domain = code" "$TMP/mix-$m.inspect" &&
      grep -q "expert.2.domain = math" "$TMP/mix-$m.inspect" &&
      grep -q "w_gate" "$TMP/mix-$m.inspect" && grep -q "ffn_router" "$TMP/mix-$m.inspect"
    check "the $m mixture: kind, step 0, lineage, tensors" $?
  done
  grep -q "n_ffn_experts = 4" "$TMP/mix-btx.inspect" && grep -q "n_att_experts = 0" "$TMP/mix-btx.inspect" &&
    grep -q "n_att_experts = 3" "$TMP/mix-bam.inspect" && grep -q "att_router" "$TMP/mix-bam.inspect"
  check "stored [mixture] sections: btx 4 FFN experts, bam 3 attention experts" $?
  expect_error "mixing into a used folder" "already holds a checkpoint" -- \
    "$BAM" mix --method bam --seed "$S" --experts "$EX" --out "$TMP/mix-bam"
  if [[ -n "${MPIEXEC:-}" ]]; then
    timeout 300 "$MPI" -np 2 --oversubscribe --bind-to none "$BAM" mix --method bam --seed "$S" \
      --experts "$EX" --out "$TMP/mix-np2" >"$TMP/np2.log" 2>&1 &&
      cmp -s <("$BAM" inspect "$TMP/mix-bam/ckpt" | grep crc32c) <("$BAM" inspect "$TMP/mix-np2/ckpt" | grep crc32c)
    check "mpirun -np 2: rank 0 mixes the same bytes" $?
  fi
else
  echo "skip the branch -> mix path: this bam has no branch command"
fi

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
