#!/bin/bash
# Stage 3, train (GPU, DeepSpeed, multi-node): latent shards (or audio shards for an autoencoder
# config) -> checkpoints, exports and the ledger <OUTPUT>/checkpoints/manifest.json.
#
# Inputs (environment variables):
#   DATA          latent manifest URL (pre_encode), or audio manifest URL (shard) for a VAE  (required)
#   OUTPUT        output URL                                                             (required)
#   MODEL_CONFIG  SAT model config JSON                                                  (required)
#   MAX_STEPS     optimizer steps in total                                               (required)
#   DS_CONFIG     DeepSpeed config (default ds_configs/zero2.json; ds_configs/zero2_cpu.json,
#                 fp32, with CANTUS_DEVICE=cpu)
#   VAL_DATA      validation manifest URL (same kind as DATA)                            (optional)
#   TRAIN_ARGS    more flags for pipeline/train.py, e.g. "--batch-size 8 --checkpoint-every 2000"
#   CANTUS_ROOT, CANTUS_PYTHON, CANTUS_DEVICE: see slurm/common.sh
#
#   INPUT=... sbatch slurm/train.sh             (defaults: 1 node x 8 GPUs, one task per GPU)
#   sbatch -p gpu -A myproj --nodes=4 --time=48:00:00 slurm/train.sh
#   CANTUS_DEVICE=cpu sbatch --gres=none --ntasks-per-node=2 slurm/train.sh
#
# srun starts one task per GPU; each takes its rank, world size and rendezvous from the SLURM
# environment (pipeline/distributed/env.py). Stopping: SLURM sends USR1 to this batch shell
# (--signal=B:USR1@600, 10 minutes before the time limit; `scancel --signal=USR1 --batch <id>`
# does it by hand). The shell forwards it to the srun tasks, which save a checkpoint together and
# exit with 75; the job then requeues itself and the next run resumes from the ledger. A run stopped
# by SIGTERM (scancel, preemption) saves the same way but is not requeued here. Only a finished run
# (--max-steps reached) exits 0, so `afterok` never starts a later stage on an unfinished model.
#SBATCH --job-name=cantus-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail
CANTUS_STAGE=train
source "${CANTUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
require DATA OUTPUT MODEL_CONFIG MAX_STEPS
EX_TEMPFAIL=75  # pipeline/train.py: stopped by a signal before --max-steps, checkpoint saved
if [ -z "${DS_CONFIG:-}" ]; then
  if [ "$CANTUS_DEVICE" = cpu ]; then DS_CONFIG=ds_configs/zero2_cpu.json; else DS_CONFIG=ds_configs/zero2.json; fi
fi
args=(--ds_config "$DS_CONFIG" --model-config "$MODEL_CONFIG" --data "$DATA" --output "$OUTPUT"
      --max-steps "$MAX_STEPS")
[ -z "${VAL_DATA:-}" ] || args+=(--val-data "$VAL_DATA")
# shellcheck disable=SC2206  # a list of flags, split on spaces on purpose
extra=(${TRAIN_ARGS:-})

got_signal=""
interrupted=""
forward() {  # the batch shell's signal goes to every srun task (srun relays it to its tasks)
  got_signal="$1"
  interrupted=1
  log "received SIG$1: forwarding it to the training tasks"
  [ -z "${srun_pid:-}" ] || kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

log "restart ${SLURM_RESTART_COUNT:-0}: srun ${SLURM_NTASKS:-1} tasks: pipeline/train.py ${args[*]} ${extra[*]}"
# --wait=120: once one rank has exited, the others get 2 minutes before srun ends the step, so a
# crashed rank does not leave the rest waiting at a collective until its timeout. Not
# --kill-on-bad-exit: after a stop every rank exits with 75, and it would kill rank 0 while it
# still finishes (exit code 143 instead of 75: no requeue).
srun --kill-on-bad-exit=0 --wait=120 "$CANTUS_PYTHON" pipeline/train.py "${args[@]}" "${extra[@]}" &
srun_pid=$!
# A trapped signal cuts `wait` short (status > 128) without collecting srun: wait again. A second
# wait on an already collected srun says 127; then the status before it is srun's.
status=""
while true; do
  interrupted=""
  set +e
  wait "$srun_pid"
  rc=$?
  set -e
  if [ -n "$status" ] && [ "$rc" = 127 ]; then break; fi
  status=$rc
  [ -n "$interrupted" ] || break
done
log "training tasks exited with $status"
if [ "$status" = "$EX_TEMPFAIL" ] && [ "$got_signal" != TERM ]; then
  # The requeue sends this job's processes SIGTERM (SIGKILL after KillWait): ignore it (the scontrol
  # children inherit that), so this block finishes.
  log "stopped before --max-steps=$MAX_STEPS: requeueing job $SLURM_JOB_ID"
  trap '' TERM
  scontrol requeue "$SLURM_JOB_ID"
  # SLURM holds a requeued job for the credential lifetime (AuthInfo cred_expire, 120 s by default)
  # once it has finished completing; `scontrol update StartTime=now` lifts that, but only from then
  # on, when this script no longer runs. So a detached helper waits until the job is pending again
  # (at most 2 minutes) and lifts the hold. Where the node's process tracking (cgroup) kills it with
  # the job, the job simply starts after the hold.
  setsid --fork bash -c 'for _ in $(seq 240); do
      if [ "$(squeue -h -j "$1" -o %T 2>/dev/null)" = PENDING ]; then
        scontrol update JobId="$1" StartTime=now; exit; fi
      sleep 0.5; done' requeue-kick "$SLURM_JOB_ID" </dev/null >/dev/null 2>&1
fi
exit "$status"
