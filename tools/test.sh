#!/usr/bin/env bash
# Sets up the environment, installs the system services the tests need, runs the test suite.
# The tests start (and stop) their own S3 server and SLURM (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
bash tools/install_system.sh --test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# SIGINT after 80 min: pytest prints its summary and the fixtures stop their servers before CI's 90 min.
timeout --signal=INT --kill-after=120 4800 python -m pytest tests -q "$@"
