#!/usr/bin/env bash
# bam generate with the KV cache prints what the full recompute (--no-cache) prints, on a
# tiny seed and on BTX, BAM and BAM shared-KV mixtures made from it: greedy and seeded
# sampling, 80 new tokens past the 64-token context (so the window slides), and a prompt
# longer than the context. --timing reports the prefill and the tokens/s on stderr; without
# it stderr stays empty (other tests compare generate's merged output between runs).
set -uo pipefail
BAM=${BAM_BIN:?} SRC=${BAM_SOURCE_DIR:?} DATA=${BAM_TEST_DATA:?}
# One thread: a tiny model gains nothing from two, and loses much on a busy machine (the
# threaded paths are covered by tests/model/test_decode).
export OMP_NUM_THREADS=1
TMP=$(mktemp -d /tmp/bam-test-generate-cache-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0
check() { if [[ $2 == 0 ]]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi; }
cd "$SRC"
S=(--set data.dir="$DATA" --set eval.every=0)

"$BAM" pretrain --config tests/configs/tiny.ini "${S[@]}" --set train.steps=40 --set run.out_dir="$TMP/seed" \
  >"$TMP/seed.log" 2>&1 &&
  "$BAM" branch --seed "$TMP/seed/ckpt" --domains code,math "${S[@]}" --set train.steps=3 \
    --set train.warmup_steps=1 --out "$TMP/br" >"$TMP/br.log" 2>&1
check "tiny seed and two experts" $?
for m in btx bam bam-shared-kv; do
  "$BAM" mix --method $m --seed "$TMP/seed/ckpt" --experts "$TMP/br/code/ckpt,$TMP/br/math/ckpt" \
    --out "$TMP/mix-$m" >"$TMP/mix-$m.log" 2>&1
  check "$m: mixed" $?
done
# BAM with top-1 attention routing and BTX's renormalised top-2 FFN routing.
"$BAM" mix --method bam --seed "$TMP/seed/ckpt" --experts "$TMP/br/code/ckpt,$TMP/br/math/ckpt" \
  --att-top-k 1 --ffn-top-k 2 --renormalize --out "$TMP/mix-bam-topk" >"$TMP/mix-bam-topk.log" 2>&1
check "bam (attention top-1, FFN top-2 renormalised): mixed" $?

long=$(printf 'The court held that the law of the state applies. %.0s' 1 2 3 4 5 6 7 8)
gen() { # gen CKPT OUT [options...]: stdout to OUT, stderr to OUT.err
  local ckpt=$1 out=$2
  shift 2
  "$BAM" generate --checkpoint "$ckpt" --data "$DATA" --tokens 80 "$@" >"$out" 2>"$out.err"
}
for c in seed mix-btx mix-bam mix-bam-shared-kv mix-bam-topk; do
  ck="$TMP/$c/ckpt"
  for mode in greedy sampled long; do
    case $mode in
      greedy) opt=(--prompt "The law of the" --temperature 0) ;;
      sampled) opt=(--prompt "The law of the" --temperature 0.8 --top-k 40 --seed 5) ;;
      long) opt=(--prompt "$long" --temperature 0.8 --top-k 40 --seed 9) ;;
    esac
    gen "$ck" "$TMP/$c-$mode-cache.txt" "${opt[@]}" &&
      gen "$ck" "$TMP/$c-$mode-full.txt" "${opt[@]}" --no-cache
    check "$c $mode: generate exits 0 with and without the cache" $?
    cmp -s "$TMP/$c-$mode-cache.txt" "$TMP/$c-$mode-full.txt"
    check "$c $mode: the same text with and without the cache" $?
    [[ ! -s "$TMP/$c-$mode-cache.txt.err" && ! -s "$TMP/$c-$mode-full.txt.err" ]]
    check "$c $mode: nothing on stderr without --timing" $?
  done
  # The sampled text is not degenerate (so the comparison above means something): it runs
  # past the 64-token context and uses many distinct characters.
  chars=$(tail -c +15 "$TMP/$c-sampled-cache.txt" | fold -w1 | sort -u | wc -l)
  bytes=$(wc -c <"$TMP/$c-sampled-cache.txt")
  echo "     $c sampled: $bytes bytes, $chars distinct characters: $(head -c 120 "$TMP/$c-sampled-cache.txt" | tr '\n' ' ')"
  [[ $chars -ge 12 && $bytes -ge 100 ]]
  check "$c: the sampled continuation is varied text" $?
done

"$BAM" generate --checkpoint "$TMP/mix-bam/ckpt" --data "$DATA" --prompt "The law of the" --tokens 20 \
  --temperature 0 --timing >"$TMP/t.txt" 2>"$TMP/t.err" &&
  grep -qE "^generate: bam, KV cache: prompt [0-9]+ tokens in [0-9.]+ ms; [0-9]+ new tokens in [0-9.]+ ms after it \([0-9.]+ tokens/s\)$" "$TMP/t.err" &&
  "$BAM" generate --checkpoint "$TMP/mix-bam/ckpt" --data "$DATA" --prompt "The law of the" --tokens 20 \
    --temperature 0 --timing --no-cache >"$TMP/t.txt" 2>"$TMP/t.err" &&
  grep -qE "^generate: bam, no cache, full recompute: .*tokens/s\)$" "$TMP/t.err"
check "--timing reports prefill and tokens/s on stderr" $?
cat "$TMP/t.err"

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
