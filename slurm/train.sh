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
#   TRAIN_ARGS    more flags for pipeline/train.py, e.g. "--batch-size 8 --checkpoint-every 2000
#                 --rendezvous-timeout 300 --collective-timeout 1800"
#   SCRATCH_DIR   node-local folder for staged checkpoints and cached shards (--scratch-dir); `%n`
#                 in it becomes the node's name on each node (default: $TMPDIR/cantus-<output name>)
#   MAX_REQUEUES  how often the job requeues itself after a stop (exit 75), counted by
#                 SLURM_RESTART_COUNT (default 20); past it the job ends with 75 and stays down
#   MASTER_ADDR, MASTER_PORT  the rendezvous, if the default does not fit (the first node's NodeAddr
#                 from `scontrol show node`; port 20000 + job id % 10000)
#   CANTUS_ROOT, CANTUS_PYTHON, CANTUS_DEVICE: see slurm/common.sh
#
#   INPUT=... sbatch slurm/train.sh             (defaults: 1 node x 8 GPUs, one task per GPU)
#   sbatch -p gpu -A myproj --nodes=16 --ntasks-per-node=8 --gres=gpu:8 --time=48:00:00 slurm/train.sh
#   CANTUS_DEVICE=cpu sbatch --gres=none --nodes=2 --ntasks-per-node=2 slurm/train.sh
#
# srun starts one task per GPU on every node of the allocation (N nodes x G tasks); each takes its
# rank, world size and rendezvous from the SLURM environment (pipeline/distributed/env.py). Nodes
# need to share nothing but the output store (s3://): each rank stages checkpoints on its node's
# SCRATCH_DIR and reads what another rank wrote from the output URL.
#
# Stopping: SLURM sends USR1 to this batch shell (--signal=B:USR1@600, 10 minutes before the time
# limit; `scancel --signal=USR1 --batch <id>` does it by hand). The shell forwards it to the srun
# tasks, which save a checkpoint together and exit with 75; the job then requeues itself and the next
# run resumes from the ledger. A run stopped by SIGTERM (scancel, preemption) saves the same way but
# is not requeued here. A rank that dies (a faulted node) ends the job: its peers fail at their next
# collective (--collective-timeout at the latest) and srun ends the step 2 minutes after the first
# task exited; resubmit to resume from the last complete checkpoint. Only a finished run
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
MAX_REQUEUES="${MAX_REQUEUES:-20}"
case "$MAX_REQUEUES" in
  ''|*[!0-9]*) echo "error: train: MAX_REQUEUES=$MAX_REQUEUES: expected a number of requeues" >&2; exit 2 ;;
esac
export SCRATCH_DIR="${SCRATCH_DIR:-}"
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

log "restart ${SLURM_RESTART_COUNT:-0}: srun ${SLURM_NTASKS:-1} tasks on ${SLURM_JOB_NUM_NODES:-1} nodes" \
    "(${SLURM_JOB_NODELIST:-}): pipeline/train.py ${args[*]} ${extra[*]}"
# Each task runs on its own node: SCRATCH_DIR gets that node's name for `%n` there, not here (this shell
# runs on the first node only). `exec` keeps the trainer the task itself, so srun's signals reach it.
task='[ -z "$SCRATCH_DIR" ] || set -- "$@" --scratch-dir "${SCRATCH_DIR//%n/$SLURMD_NODENAME}"; exec "$@"'
# --wait=120: once one rank has exited, the others get 2 minutes before srun ends the step, so a
# crashed rank does not leave the rest waiting at a collective until its timeout. Not
# --kill-on-bad-exit: after a stop every rank exits with 75, and it would kill rank 0 while it
# still finishes (exit code 143 instead of 75: no requeue).
srun --kill-on-bad-exit=0 --wait=120 bash -c "$task" train-task \
  "$CANTUS_PYTHON" pipeline/train.py "${args[@]}" "${extra[@]}" &
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
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    log "stopped before --max-steps=$MAX_STEPS after ${SLURM_RESTART_COUNT:-0} requeues (MAX_REQUEUES=$MAX_REQUEUES):" \
        "not requeueing; resubmit to resume"
    exit "$status"
  fi
  log "stopped before --max-steps=$MAX_STEPS: requeueing job $SLURM_JOB_ID (requeue $((${SLURM_RESTART_COUNT:-0} + 1)) of $MAX_REQUEUES)"
  # SLURM holds a requeued job for the credential lifetime (AuthInfo cred_expire, 120 s by default)
  # once it has finished completing; `scontrol update StartTime=now` lifts that, but only once the hold
  # is set, when this script no longer runs. So a detached helper watches the job and lifts the hold
  # each time it sees it (a slow controller may set it late, or ignore an early update) until the job
  # runs again (its restart count went up), is gone, or has pended for a named reason other than the
  # hold for 60 s (reason None: not evaluated yet, as while a loaded node finishes completing); it gives
  # up after 30 minutes. It starts before the requeue, in its own session: the requeue's SIGKILL (KillWait
  # after its SIGTERM) reaches the job's process group, and on a loaded node this script may not get past
  # `scontrol requeue` before it. Where the node's process tracking (cgroup) kills it with the job anyway,
  # the job simply starts after the hold. The requeue's SIGTERM is ignored from here on (the helper and
  # scontrol inherit that), so this block finishes.
  trap '' TERM
  setsid --fork bash -c 'restarts="$2"; deadline=$((SECONDS + 1800)); other=0
    while [ "$SECONDS" -lt "$deadline" ]; do
      sleep 0.5
      if ! out="$(squeue -h -j "$1" -O "State:24,Reason:40,RestartCnt:8" 2>&1)"; then
        case "$out" in *"Invalid job id"*) exit ;; *) continue ;; esac  # gone, or a slow controller
      fi
      read -r state reason count <<< "$out"
      case "${state:-}" in
        "") exit ;;  # left the queue
        PENDING)
          case "$reason" in
            BeginTime) scontrol update JobId="$1" StartTime=now >/dev/null 2>&1; other=0 ;;
            None) ;;
            *) other=$((other + 1)); [ "$other" -lt 120 ] || exit ;;
          esac ;;
        RUNNING|CONFIGURING|COMPLETED|FAILED|CANCELLED|TIMEOUT) [ "${count:-0}" -le "$restarts" ] || exit ;;
      esac
    done' requeue-kick "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" </dev/null >/dev/null 2>&1
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
