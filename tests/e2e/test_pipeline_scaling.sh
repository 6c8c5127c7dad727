#!/usr/bin/env bash
# jobs/scaling.sh on the tiny model and the test data (--config tests/configs/tiny.ini): it
# builds the BTX and BAM mixtures, trains each on 1 rank (ep 1) and 2 ranks (ep 1 and 2) for 4
# steps and writes scaling.csv (one row per run; efficiency 1 for the 1-rank runs and
# (tok/s / cores) / (tok/s of 1 rank / its cores) otherwise; no communication on 1 rank, some
# on 2), scaling.md (the table) and scaling.png (a PNG image). A second run reuses the built
# mixtures.
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 BAM_BIN=$BAM BAM_DATA=$DATA
unset BAM_LAUNCHER
for v in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_' || true); do unset "$v"; done
TMP=$(mktemp -d /tmp/bam-test-scaling-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
cd "$SRC" || exit 1
command -v gnuplot >/dev/null 2>&1 || { check "gnuplot installed (apt-get install gnuplot-nox)" 1; echo "$pass passed, $fail failed"; exit 1; }

S=(jobs/scaling.sh --config tests/configs/tiny.ini --run "$TMP/s" --steps 4)
"${S[@]}" --methods btx,bam --ranks 1,2 >"$TMP/1.log" 2>&1
rc=$?
check "jobs/scaling.sh runs (exit $rc)" $rc
[[ $rc == 0 ]] || tail -30 "$TMP/1.log"

csv=$TMP/s/scaling.csv
n=$(nproc) h=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
[[ $(head -1 "$csv" 2>/dev/null) == method,ranks,threads,ep,tokens_per_s,efficiency,comm_share,peak_rss_mib_per_rank,model_gflops &&
   $(tail -n +2 "$csv" | cut -d, -f1-4 | paste -sd' ' -) == "btx,1,$n,1 btx,2,$h,1 btx,2,$h,2 bam,1,$n,1 bam,2,$h,1 bam,2,$h,2" ]]
check "scaling.csv: a row per method, ranks (threads = cores / ranks) and ep" $?
[[ $fail == 0 ]] || cat "$csv"
awk -F, 'NR > 1 {
    if ($2 == 1) { base[$1] = $5 / ($2 * $3); if ($6 != "1.000" || $7 + 0 != 0) bad = 1 }
    else { want = ($5 / ($2 * $3)) / base[$1]; d = $6 - want; if (d < -0.002 || d > 0.002 || $7 + 0 <= 0) bad = 1 }
    if ($5 + 0 <= 0 || $8 + 0 <= 0) bad = 1
  } END { exit bad }' "$csv"
check "efficiency = per-core tokens/s relative to 1 rank; communication 0 on 1 rank, > 0 on 2; tokens/s and RSS positive" $?
[[ $(grep -c '^| BTX \|^| BAM ' "$TMP/s/scaling.md") == 6 ]] && grep -q '| method | ranks | threads | ep | tokens/s | efficiency | communication | peak RSS / rank (MiB) |' "$TMP/s/scaling.md"
check "scaling.md: the table, 6 rows" $?
[[ $(head -c 8 "$TMP/s/scaling.png" 2>/dev/null | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a && $(stat -c %s "$TMP/s/scaling.png") -gt 5000 ]]
check "scaling.png is a PNG image" $?

"${S[@]}" --methods btx --ranks 1 >"$TMP/2.log" 2>&1
[[ $? == 0 ]] && ! grep -q '^== model:' "$TMP/2.log" && [[ $(wc -l <"$csv") == 2 ]]
check "a second run reuses the built mixtures" $?

[[ $fail == 0 ]] || { echo "--- 1.log"; tail -20 "$TMP/1.log"; echo "--- 2.log"; tail -20 "$TMP/2.log"; }
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
