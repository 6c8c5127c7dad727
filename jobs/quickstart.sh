#!/usr/bin/env bash
# The main job on this machine: install, build, prepare the real corpora and tokenizer,
# pretrain the dense seed on configs/quick.ini, evaluate it per domain and sample from it.
# Idempotent: prepared data is cached; a finished seed is evaluated again, not retrained
# (pass --retrain to train anew). Environment: RANKS (default 1), OMP_NUM_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/quick.ini
RETRAIN=0
for arg in "$@"; do
  case "$arg" in
    --retrain) RETRAIN=1 ;;
    *.ini) CONFIG="$arg" ;;
    *) echo "usage: jobs/quickstart.sh [CONFIG.ini] [--retrain]" >&2; exit 2 ;;
  esac
done

jobs/setup.sh
echo "== preparing data (data/prepared/v4096; cached after the first run)"
data/prepare.sh --out data/prepared/v4096

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
RANKS=${RANKS:-1}
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))}
OUT=$(sed -n 's/^out_dir *= *//p' "$CONFIG" | tail -1)
CKPT="$OUT/final.h5"
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  LAUNCH=(srun --mpi=pmix)
else
  LAUNCH=(mpirun -np "$RANKS" --bind-to none)
fi
if [[ $RETRAIN == 1 || ! -f "$CKPT" ]]; then
  mkdir -p "$(dirname "$OUT")"
  echo "== pretraining the seed ($CONFIG, $RANKS rank(s) x $OMP_NUM_THREADS thread(s))"
  "${LAUNCH[@]}" build/bam pretrain --config "$CONFIG" | tee "${OUT%/}.log"
fi
echo "== evaluating $CKPT on every domain"
"${LAUNCH[@]}" build/bam eval --checkpoint "$CKPT" --max-tokens 131072
echo "== sampling"
build/bam generate --checkpoint "$CKPT" --prompt "The President said that" --tokens 48 --seed 1
