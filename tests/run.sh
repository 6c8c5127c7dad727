#!/usr/bin/env bash
# The test command: installs what is missing, builds, prepares the small test data (real
# corpora, small caps, cached after the first run) and runs the whole suite through CTest.
# Extra arguments go to ctest (e.g. tests/run.sh -L kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs/setup.sh
echo "== preparing test data (data/prepared/test)"
data/prepare.sh --test --out data/prepared/test
echo "== running the test suite"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cd build
ctest --output-on-failure --timeout 900 -j "$(nproc)" "$@"
