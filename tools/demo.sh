#!/usr/bin/env bash
# The embedded default: the whole pipeline on local storage with the local launcher, on a small
# real-music dataset built offline. Idempotent: finished stages are skipped on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
bash tools/install_system.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python tools/demo.py "$@"
