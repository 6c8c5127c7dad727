#!/usr/bin/env bash
# The main job on this machine: install, build, prepare the real corpora and tokenizer
# (data/prepared/v4096), then run the whole BTX-versus-BAM study of configs/quick.ini with
# jobs/pipeline.sh (seed, three domain experts, BTX / BAM / BAM shared-KV mixtures trained
# data- and compute-matched, every model evaluated on every domain) into runs/pipeline/quick
# (the folder jobs/pipeline.sh and slurm/pipeline.sh use for this config), print the
# report table and a sample from the BAM mixture. About 30 minutes on 2 cores.
#
# usage: jobs/quickstart.sh [CONFIG.ini] [--retrain] [--local | --slurm]
#
# Idempotent: prepared data is cached; every finished stage is reused (its DONE marker) and a
# half-done one resumes from its checkpoint, so a second run only prints the report (an
# interrupted one carries on). --retrain removes the run folder and trains everything anew.
# Slurm: when `sinfo` answers and shows a partition that is up, the stages go to Slurm as a
# chain of jobs (slurm/pipeline.sh --wait, RANKS ranks per job, logs in RUN/logs/), else
# they run here; --local / --slurm choose. Environment: RANKS (MPI ranks per stage, default 1),
# OMP_NUM_THREADS (threads per rank, default cores / RANKS), BAM_RUN (the run folder, default
# runs/pipeline/<config name>), and what jobs/pipeline.sh reads (BAM_MIX_STEPS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/quick.ini
RETRAIN=0 MODE=auto
for arg in "$@"; do
  case "$arg" in
    --retrain) RETRAIN=1 ;;
    --local) MODE=local ;;
    --slurm) MODE=slurm ;;
    *.ini) CONFIG="$arg" ;;
    *) echo "usage: jobs/quickstart.sh [CONFIG.ini] [--retrain] [--local | --slurm]" >&2; exit 2 ;;
  esac
done
T0=$SECONDS

jobs/setup.sh
echo "== preparing data (data/prepared/v4096; cached after the first run)"
data/prepare.sh --out data/prepared/v4096

RANKS=${RANKS:-1}
CORES=$(nproc)
THREADS=${OMP_NUM_THREADS:-$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))}
RUN=${BAM_RUN:-runs/pipeline/$(basename "$CONFIG" .ini)}
if [[ $MODE == auto ]]; then
  MODE=local
  if command -v sinfo >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 &&
    timeout 15 sinfo -h -o '%a' 2>/dev/null | grep -qx up; then
    MODE=slurm
  fi
fi
if [[ $RETRAIN == 1 && -d $RUN ]]; then
  echo "== --retrain: removing $RUN"
  rm -rf "$RUN"
fi
echo "== the study of $CONFIG in $RUN ($RANKS rank(s) x $THREADS thread(s) per stage, $MODE)"
if [[ $MODE == slurm ]]; then
  slurm/pipeline.sh "$CONFIG" --run "$RUN" --ranks "$RANKS" --cpus "$THREADS" --branch-ranks "$RANKS" --wait
else
  OMP_NUM_THREADS=$THREADS jobs/pipeline.sh "$CONFIG" --run "$RUN" --ranks "$RANKS"
fi
echo "== a sample from the BAM mixture (data-matched)"
build/bam generate --checkpoint "$RUN/train-bam-dm/ckpt" --prompt "The President said that" --tokens 48 --seed 1
echo "== quickstart done in $(( (SECONDS - T0) / 60 )) min $(( (SECONDS - T0) % 60 )) s: $RUN/report/report.md, $RUN/report/results.csv"
