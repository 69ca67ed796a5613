#!/bin/bash
# Stage 1, shard (CPU): audio files + captions -> audio shards and <OUTPUT>/manifest.json
# (the validation split in <OUTPUT>/val/manifest.json).
#
# Inputs (environment variables):
#   INPUT       audio folder or URL (local path or s3://)              (required)
#   OUTPUT      output URL                                              (required)
#   CAPTIONS    metadata file with `path` and `prompt` columns          (optional: sidecars)
#   SHARD_ARGS  more flags for `python -m pipeline.shard`, e.g. "--sample-rate 44100 --val-fraction 0.02"
#   STEP, NUM_TASKS, CANTUS_ROOT, CANTUS_PYTHON, CANTUS_DEVICE: see slurm/common.sh
#
# One job:  INPUT=... OUTPUT=... sbatch slurm/shard.sh
# An array: STEP=plan sbatch slurm/shard.sh; then sbatch --array=0-7 slurm/shard.sh; then
#           STEP=commit NUM_TASKS=8 sbatch --dependency=afterok:<array id> slurm/shard.sh
#           (slurm/pipeline.sh does this). Defaults below; override on the command line, e.g.
#           `sbatch -p cpu -A myproj --time=2:00:00 --cpus-per-task=4 slurm/shard.sh`. Without -p/-A
#           the cluster's default partition and account apply.
#SBATCH --job-name=cantus-shard
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail
export CANTUS_STAGE=shard
source "${CANTUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
require INPUT OUTPUT
task_flags
args=(--input "$INPUT" --output "$OUTPUT")
[ -z "${CAPTIONS:-}" ] || args+=(--captions "$CAPTIONS")
# shellcheck disable=SC2206  # SHARD_ARGS is a list of flags, split on spaces on purpose
extra=(${SHARD_ARGS:-})
log "python -m pipeline.shard $STEP ${args[*]} ${extra[*]} ${TASK_FLAGS[*]}"
run_step "$CANTUS_PYTHON" -m pipeline.shard "$STEP" "${args[@]}" "${extra[@]}" "${TASK_FLAGS[@]}"
