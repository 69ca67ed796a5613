#!/usr/bin/env bash
# Sets up the environment, installs the system services the tests need, runs the test suite.
# The S3 server is started (and stopped) by the tests themselves (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
bash tools/install_system.sh
bash tools/install_browser.sh
[ -f tools/install_slurm.sh ] && bash tools/install_slurm.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest tests -q "$@"
