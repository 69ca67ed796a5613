#!/bin/bash
# Stage 2, pre_encode (GPU): audio shards -> latent shards and <OUTPUT>/manifest.json.
#
# Inputs (environment variables):
#   INPUT              audio manifest URL (stage 1's manifest.json, or its val/manifest.json)  (required)
#   OUTPUT             output URL                                                            (required)
#   MODEL_CONFIG       a diffusion config with a pretransform, or an autoencoder config      (required)
#   PRETRANSFORM_CKPT  VAE weights (.safetensors/.ckpt, e.g. Stable Audio Open's), or a VAE train
#                      ledger <vae out>/checkpoints/manifest.json: its newest export is used  (required)
#   PRE_ENCODE_ARGS    more flags for `python -m pipeline.pre_encode`, e.g. "--batch-size 16 --dtype bf16"
#   STEP, NUM_TASKS, CANTUS_ROOT, CANTUS_PYTHON, CANTUS_DEVICE: see slurm/common.sh
#
# One job:  INPUT=... OUTPUT=... MODEL_CONFIG=... PRETRANSFORM_CKPT=... sbatch slurm/pre_encode.sh
# An array: as in slurm/shard.sh (plan job, --array=0-N-1, commit job with NUM_TASKS=N).
# Defaults below (one GPU per task); override on the command line, e.g.
# `sbatch -p gpu -A myproj --time=1:00:00 --gres=gpu:1 slurm/pre_encode.sh`; on CPU nodes
# `CANTUS_DEVICE=cpu sbatch --gres=none slurm/pre_encode.sh`.
#SBATCH --job-name=cantus-pre_encode
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail
export CANTUS_STAGE=pre_encode
source "${CANTUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
require INPUT OUTPUT MODEL_CONFIG PRETRANSFORM_CKPT
task_flags
ckpt="$(resolve_export "$PRETRANSFORM_CKPT")"
args=(--input "$INPUT" --output "$OUTPUT" --model-config "$MODEL_CONFIG" --pretransform-ckpt "$ckpt"
      --device "$(step_device)")
# shellcheck disable=SC2206  # a list of flags, split on spaces on purpose
extra=(${PRE_ENCODE_ARGS:-})
log "python -m pipeline.pre_encode $STEP ${args[*]} ${extra[*]} ${TASK_FLAGS[*]}"
run_step "$CANTUS_PYTHON" -m pipeline.pre_encode "$STEP" "${args[@]}" "${extra[@]}" "${TASK_FLAGS[@]}"
