#!/bin/bash
# A job killed in the middle of a checkpoint leaves the previous one intact: 2 ranks save step 1,
# then start step 2 with the test-only pause (BAM_CKPT_TEST_PAUSE_S) between "shards durable"
# and "published"; both ranks are SIGKILLed there. Then: `latest` still names step 1, which reads
# back bitwise; the stale .tmp-step-000002 is ignored, and the next save of step 2 clears it.
# Needs BAM_BUILD_DIR and MPIEXEC (set by CTest).
set -u
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

build=${BAM_BUILD_DIR:?BAM_BUILD_DIR is not set}
mpiexec=${MPIEXEC:-mpirun}
exe="$build/tests/ckpt_test_shard"
dir=$(mktemp -d /tmp/bam-test-kill-XXXXXX)
mpid=
cleanup() {
  [ -n "$mpid" ] && kill -9 "$mpid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

BAM_CKPT_KILL_DIR="$dir" "$mpiexec" -np 2 --oversubscribe --bind-to none -x BAM_CKPT_KILL_DIR "$exe" \
  >"$dir/kill.log" 2>&1 &
mpid=$!

# Both shards of step 2 exist once the ranks are in (or about to enter) the pause.
tmpdir="$dir/ckpt/.tmp-step-000002"
for _ in $(seq 1 600); do
  [ -f "$tmpdir/shard-00000-of-00002.h5" ] && [ -f "$tmpdir/shard-00001-of-00002.h5" ] && break
  kill -0 "$mpid" 2>/dev/null || break
  sleep 0.05
done
sleep 1 # the shards are tiny: written and fsynced within milliseconds; the pause is 120 s
[ -f "$tmpdir/shard-00001-of-00002.h5" ] && ok || { bad "the save of step 2 never started"; cat "$dir/kill.log"; }
[ ! -e "$tmpdir/index.h5" ] && ok || bad "the index of step 2 was written before the pause"
for r in 0 1; do
  pid=$(cat "$dir/pid-$r" 2>/dev/null)
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null && ok || bad "cannot kill rank $r (pid '$pid')"
done
# mpirun notices its ranks died and exits
for _ in $(seq 1 200); do
  kill -0 "$mpid" 2>/dev/null || break
  sleep 0.05
done
if kill -0 "$mpid" 2>/dev/null; then
  bad "mpirun did not exit after its ranks were killed"
  kill -9 "$mpid" 2>/dev/null
fi
wait "$mpid" 2>/dev/null
mpid=

[ "$(cat "$dir/ckpt/latest")" = "step-000001" ] && ok || bad "latest is '$(cat "$dir/ckpt/latest")'"
[ ! -e "$dir/ckpt/step-000002" ] && ok || bad "a step-000002 folder appeared"
[ -d "$tmpdir" ] && ok || bad "no temporary folder left by the killed save"

# step 1 reads back intact; the next save of step 2 replaces the debris
out=$(BAM_CKPT_CHECK_DIR="$dir" "$mpiexec" -np 2 --oversubscribe --bind-to none -x BAM_CKPT_CHECK_DIR "$exe" 2>&1)
status=$?
echo "$out" | grep -v "passed, .* failed" || true
read -r p f <<<"$(echo "$out" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' | tail -1)"
[ "$status" -eq 0 ] && ok || bad "the check run failed"
pass=$((pass + ${p:-0}))
fail=$((fail + ${f:-1}))
[ "$(cat "$dir/ckpt/latest")" = "step-000002" ] && ok || bad "latest after the new save is '$(cat "$dir/ckpt/latest")'"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
