#!/usr/bin/env bash
# Prepare bam's data (see data/README.md); all options go to prepare.py.
set -euo pipefail
exec /usr/bin/python3 "$(dirname "$0")/prepare.py" "$@"
