#!/usr/bin/env bash
# jobs/pipeline.sh end to end on the test data (configs/tiny-pipeline.ini, a few steps per
# stage): seed -> three experts -> BTX, BAM, BAM shared-KV mixtures -> DM and CM training ->
# eval -> report. Checks: every artifact exists; report.md has a row per model and a column
# per domain; compute-matched BAM runs get fewer steps than BTX; a second run skips every stage
# and leaves results.csv byte-identical; the config's [pipeline] section gives the same run as
# the environment variables (every stage skipped), comments and [pipeline] keys leave the
# seed's checksum alone, a bad [pipeline] value is refused before anything runs; a stage run
# alone (--stage) refuses to start when an input stage has not finished, naming it; a run
# killed during the branch stage (SIGTERM to its process group) is finished by running the
# branch stage alone (the seed is an input, the code expert resumes) and then the rest, with
# the uninterrupted results.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export BAM_BIN=$BAM BAM_DATA=$DATA BAM_BRANCH_STEPS=12 BAM_MIX_STEPS=10 BAM_EVAL_TOKENS=1024
TMP=$(mktemp -d /tmp/bam-test-pipeline-XXXXXX)
PGID=""
trap '[[ -n $PGID ]] && kill -KILL -- -"$PGID" 2>/dev/null; rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
cd "$SRC"
P=(jobs/pipeline.sh configs/tiny-pipeline.ini)
MODELS=(seed expert-code expert-math expert-legal btx-dm bam-dm bam-cm bam-shared-kv-dm bam-shared-kv-cm)
DOMAINS=(general code math legal reference)

# 1. The whole study.
"${P[@]}" --run "$TMP/a" >"$TMP/a1.log" 2>&1
check "the pipeline runs to the end" $?
missing=0
for f in seed/ckpt/latest experts/code/ckpt/latest experts/math/ckpt/latest experts/legal/ckpt/latest \
  mix-btx/ckpt/latest mix-bam/ckpt/latest mix-bam-shared-kv/ckpt/latest report/report.md report/results.csv report/loss-stages.png; do
  [[ -e $TMP/a/$f ]] || { echo "     missing $f"; missing=1; }
done
for s in seed experts mix-btx mix-bam mix-bam-shared-kv train-btx-dm train-bam-dm train-bam-cm \
  train-bam-shared-kv-dm train-bam-shared-kv-cm eval report; do
  [[ -s $TMP/a/$s/DONE ]] || { echo "     missing $s/DONE"; missing=1; }
done
for m in "${MODELS[@]}"; do
  [[ -s $TMP/a/eval/$m.txt ]] || { echo "     missing eval/$m.txt"; missing=1; }
  [[ $m == seed || $m == expert-* ]] && continue
  [[ -s $TMP/a/train-$m/ckpt/latest ]] || { echo "     missing train-$m/ckpt"; missing=1; }
  [[ -s $TMP/a/eval/$m.routing.csv ]] || { echo "     missing eval/$m.routing.csv"; missing=1; }
done
check "every stage's output, DONE marker, eval output and routing csv exists" $missing

bad=0
header=$(grep '^| model |' "$TMP/a/report/report.md")
for d in "${DOMAINS[@]}" Avg bits/B tokens "train FLOPs"; do
  grep -qF "| $d |" <<<"$header" || { echo "     report.md: no column $d"; bad=1; }
done
for m in "${MODELS[@]}"; do
  n=$(grep -c "^| $m |" "$TMP/a/report/report.md")
  [[ $n == 1 ]] || { echo "     report.md: $n rows for $m"; bad=1; }
  [[ $(grep -c "^$m," "$TMP/a/report/results.csv") == 1 ]] || { echo "     results.csv: no row $m"; bad=1; }
done
cols=$(head -1 "$TMP/a/report/results.csv" | tr , '\n' | grep -c '^ppl_')
[[ $cols == 6 ]] || { echo "     results.csv: $cols perplexity columns"; bad=1; }
check "report.md has a row per model and a column per domain; results.csv likewise" $bad

steps() { awk -F, -v m="$1" '$1 == m { print $5 }' "$TMP/a/report/results.csv"; }
btx=$(steps btx-dm) bam_dm=$(steps bam-dm) bam_cm=$(steps bam-cm) skv_cm=$(steps bam-shared-kv-cm)
echo "     steps: btx $btx, bam dm $bam_dm, bam cm $bam_cm, bam-shared-kv cm $skv_cm"
[[ $btx == 10 && $bam_dm == 10 && $bam_cm -ge 1 && $bam_cm -lt $btx && $skv_cm -lt $btx && $bam_cm -le $skv_cm ]]
check "DM runs take BTX's steps; CM BAM runs fewer (KV experts fewest)" $?

# CM steps = floor(BTX steps x FLOPs/token(BTX) / FLOPs/token(BAM)), from bam inspect.
f_btx=$("$BAM" inspect "$TMP/a/mix-btx/ckpt" | awk '$1 == "flops_per_token_forward" { print $3 }')
f_bam=$("$BAM" inspect "$TMP/a/mix-bam/ckpt" | awk '$1 == "flops_per_token_forward" { print $3 }')
f_dense=$("$BAM" inspect "$TMP/a/seed/ckpt" | awk '$1 == "flops_per_token_forward" { print $3 }')
echo "     forward FLOPs/token: dense $f_dense, btx $f_btx, bam $f_bam"
[[ -n $f_btx && -n $f_bam && $f_bam -gt $f_btx && $f_btx -gt $f_dense && $bam_cm == $(( 10 * f_btx / f_bam )) ]]
check "bam inspect prints flops_per_token_forward; CM steps follow from it" $?

# 2. Run again: every stage skipped, results byte-identical.
cp "$TMP/a/report/results.csv" "$TMP/a-results.csv"
"${P[@]}" --run "$TMP/a" >"$TMP/a2.log" 2>&1
rc=$?
n_skipped=$(grep -c ': skipped (done' "$TMP/a2.log")
echo "     second run: $n_skipped stages skipped, $(grep -c ': running' "$TMP/a2.log") run"
[[ $rc == 0 && $n_skipped == 12 ]] && ! grep -q ': running' "$TMP/a2.log" && cmp -s "$TMP/a/report/results.csv" "$TMP/a-results.csv"
check "second run: every stage skipped, results.csv byte-identical" $?

# 2b. The config's [pipeline] section (branch_steps 12, mix_steps 10, eval_tokens 1024) without
# the environment: the same run, every stage skipped.
env -u BAM_BRANCH_STEPS -u BAM_MIX_STEPS -u BAM_EVAL_TOKENS "${P[@]}" --run "$TMP/a" >"$TMP/a4.log" 2>&1
[[ $? == 0 && $(grep -c ': skipped (done' "$TMP/a4.log") == 12 ]] && cmp -s "$TMP/a/report/results.csv" "$TMP/a-results.csv"
check "the config's [pipeline] section alone (no BAM_*_STEPS): every stage skipped, same results" $?
# Another comment and spacing, and [pipeline] branch_steps = 13: the seed is still the same
# (skipped), the branch stage made with 12 steps is refused.
{ echo "; another comment"; sed 's/^branch_steps = 12$/branch_steps   =   13  ; more steps/' configs/tiny-pipeline.ini; } >"$TMP/cfg13.ini"
env -u BAM_BRANCH_STEPS -u BAM_MIX_STEPS -u BAM_EVAL_TOKENS jobs/pipeline.sh "$TMP/cfg13.ini" --run "$TMP/a" >"$TMP/a5.log" 2>&1
[[ $? != 0 ]] && grep -q "== seed: skipped" "$TMP/a5.log" && grep -q "experts/DONE was made from other inputs" "$TMP/a5.log" &&
  grep -q "^  > steps = 13" "$TMP/a5.log"
check "comments and [pipeline] keys leave the seed's checksum alone; pipeline.branch_steps = 13 refuses the 12-step experts" $?
sed 's/^domains = code,math,legal$/domains = code,,math/' configs/tiny-pipeline.ini >"$TMP/cfgbad.ini"
jobs/pipeline.sh "$TMP/cfgbad.ini" --run "$TMP/bad" >"$TMP/bad.log" 2>&1
rc=$?
[[ $rc == 2 && ! -e $TMP/bad ]] && grep -q "cfgbad.ini:[0-9]*: pipeline.domains 'code,,math' has an empty domain name" "$TMP/bad.log"
check "a bad [pipeline] value is refused with file, line and key before anything runs" $?
"$BAM" pretrain --config "$TMP/cfgbad.ini" --set "run.out_dir=$TMP/bad" >"$TMP/bad2.log" 2>&1
[[ $? != 0 && ! -e $TMP/bad ]] && grep -q "pipeline.domains 'code,,math' has an empty domain name" "$TMP/bad2.log"
check "bam itself validates the [pipeline] section" $?
"${P[@]}" --run "$TMP/c" --stage bogus >"$TMP/c1.log" 2>&1
[[ $? == 2 ]] && grep -q "unknown stage 'bogus'" "$TMP/c1.log"
check "--stage bogus: refused, listing the stages" $?

# 3. Killed during the branch stage, run again: completes with the uninterrupted results.
setsid "${P[@]}" --run "$TMP/b" >"$TMP/b1.log" 2>&1 &
PGID=$!
for _ in $(seq 600); do
  [[ -d $TMP/b/experts/code/ckpt || -d $TMP/b/experts/math/ckpt ]] && break
  sleep 0.1
done
in_branch=1
[[ -d $TMP/b/experts && ! -e $TMP/b/experts/DONE ]] && in_branch=0
kill -TERM -- -"$PGID" 2>/dev/null
wait "$PGID" 2>/dev/null
for _ in $(seq 100); do kill -0 -- -"$PGID" 2>/dev/null || break; sleep 0.1; done
PGID=""
[[ $in_branch == 0 && ! -e $TMP/b/experts/DONE && ! -e $TMP/b/report/results.csv ]]
check "killed during the branch stage (before it finished)" $?
"${P[@]}" --run "$TMP/b" --stage mix >"$TMP/b2.log" 2>&1
[[ $? == 1 && ! -e $TMP/b/mix-btx ]] && grep -q "== seed: input ready" "$TMP/b2.log" &&
  grep -q "stage 'branch' has not finished" "$TMP/b2.log" && grep -q -- "--stage branch" "$TMP/b2.log"
check "--stage mix before the branch stage finished: refused, naming the branch stage" $?
"${P[@]}" --run "$TMP/b" --stage branch >"$TMP/b3.log" 2>&1 &&
  grep -q "== seed: input ready" "$TMP/b3.log" && grep -q "== branch: running" "$TMP/b3.log" &&
  ! grep -q "== mix" "$TMP/b3.log" && [[ -e $TMP/b/experts/DONE && ! -e $TMP/b/mix-btx ]] &&
  grep -q "resumed from $TMP/b/experts/code/ckpt/step-" "$TMP/b/experts/log.txt"
check "--stage branch alone: the seed is an input, the code expert resumed, nothing after the branch ran" $?
"${P[@]}" --run "$TMP/b" >"$TMP/b4.log" 2>&1 &&
  grep -q "== seed: skipped" "$TMP/b4.log" && grep -q "== branch: skipped" "$TMP/b4.log" &&
  cmp "$TMP/b/report/results.csv" "$TMP/a/report/results.csv"
check "then the rest: completes, seed and branch skipped, results.csv equals the uninterrupted run's" $?

# 4. A stage made from other inputs is refused, not silently reused.
BAM_BRANCH_STEPS=13 "${P[@]}" --run "$TMP/a" >"$TMP/a3.log" 2>&1
[[ $? != 0 ]] && grep -q "experts/DONE was made from other inputs" "$TMP/a3.log"
check "changed branch steps: the stale stage is refused with a clear message" $?

for f in a1 a2 a4 a5 bad c1 b1 b2 b3 b4 a3; do [[ $fail == 0 ]] || { echo "--- $f.log"; tail -20 "$TMP/$f.log"; }; done
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
