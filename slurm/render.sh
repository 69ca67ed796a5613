#!/bin/bash
# Stage 4, render (GPU): checkpoints x prompts x CFG scales x seeds -> audio, spectrograms, a page
# and <OUTPUT>/manifest.json.
#
# Inputs (environment variables):
#   CHECKPOINTS   a train ledger URL (<train out>/checkpoints/manifest.json) or .safetensors files,
#                 space-separated                                                       (required)
#   PROMPTS       prompts file (JSON lines)                                             (required)
#   OUTPUT        output URL                                                            (required)
#   RENDER_ARGS   more flags for `python -m pipeline.render`, e.g. "--cfg-scales 3,6 --seeds 0,1 --steps 50"
#   STEP, NUM_TASKS, CANTUS_ROOT, CANTUS_PYTHON, CANTUS_DEVICE: see slurm/common.sh
#
# One job:  CHECKPOINTS=... PROMPTS=... OUTPUT=... sbatch slurm/render.sh
# An array: as in slurm/shard.sh (plan job, --array=0-N-1, commit job with NUM_TASKS=N).
# Defaults below (one GPU per task); override on the command line, e.g.
# `sbatch -p gpu -A myproj --time=1:00:00 --gres=gpu:1 slurm/render.sh`; on CPU nodes
# `CANTUS_DEVICE=cpu sbatch --gres=none slurm/render.sh`.
#SBATCH --job-name=cantus-render
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail
export CANTUS_STAGE=render
source "${CANTUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
require CHECKPOINTS PROMPTS OUTPUT
task_flags
# shellcheck disable=SC2206  # CHECKPOINTS and RENDER_ARGS are lists, split on spaces on purpose
checkpoints=($CHECKPOINTS)
# shellcheck disable=SC2206
extra=(${RENDER_ARGS:-})
args=(--checkpoints "${checkpoints[@]}" --prompts "$PROMPTS" --output "$OUTPUT" --device "$(step_device)")
log "python -m pipeline.render $STEP ${args[*]} ${extra[*]} ${TASK_FLAGS[*]}"
run_step "$CANTUS_PYTHON" -m pipeline.render "$STEP" "${args[@]}" "${extra[@]}" "${TASK_FLAGS[@]}"
