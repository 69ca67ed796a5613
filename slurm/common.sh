# Sourced by the stage scripts (slurm/{shard,pre_encode,train,render}.sh) at job time.
#
# A batch job runs a copy of its script from SLURM's spool directory, so the repository is found
# through CANTUS_ROOT (pipeline.sh exports it) or, for `sbatch slurm/<stage>.sh` run from the
# repository root, SLURM_SUBMIT_DIR. Settings shared by every stage (environment variables):
#   CANTUS_ROOT     repository root (default: $SLURM_SUBMIT_DIR, else the current directory)
#   CANTUS_PYTHON   interpreter (default: $CANTUS_ROOT/.venv/bin/python if present, else python)
#   CANTUS_DEVICE   cuda | cpu (default cuda). cpu: DS_ACCELERATOR=cpu and --device cpu; submit
#                   such jobs with --gres=none (pipeline.sh does).
#   STEP            plan | run | commit (default run). A job that is not an array (one task) with
#                   STEP=run plans, runs and commits by itself. An array needs the plan first (a
#                   STEP=plan job), then runs its share per task (STEP=run), then a STEP=commit job
#                   merges the tasks' parts into the stage's manifest: pipeline.sh submits the three
#                   with --dependency=afterok.
#   NUM_TASKS       with STEP=commit: how many tasks the stage had in all (array size x tasks per
#                   array job).
#
# An array job may span several nodes (`sbatch --nodes=2 --ntasks-per-node=1 --ntasks=2`): its run step
# then starts one srun task per allocated task, each of which takes its own slot of the plan (task
# array_index x tasks per job + SLURM_PROCID, pipeline/tasks.py). Nodes share nothing but the store:
# put every URL on s3:// and leave TMPDIR on node-local disk.

CANTUS_ROOT="${CANTUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [ ! -f "$CANTUS_ROOT/pipeline/__init__.py" ]; then
  echo "error: CANTUS_ROOT=$CANTUS_ROOT is not the Cantus repository (no pipeline/__init__.py):" \
       "submit from the repository root or export CANTUS_ROOT" >&2
  exit 2
fi
cd "$CANTUS_ROOT"
if [ -z "${CANTUS_PYTHON:-}" ]; then
  if [ -x "$CANTUS_ROOT/.venv/bin/python" ]; then CANTUS_PYTHON="$CANTUS_ROOT/.venv/bin/python"; else CANTUS_PYTHON=python; fi
fi
export CANTUS_ROOT CANTUS_PYTHON
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$CANTUS_ROOT/.cache/torch_extensions}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"

CANTUS_DEVICE="${CANTUS_DEVICE:-cuda}"
case "$CANTUS_DEVICE" in
  cuda) ;;
  cpu) export DS_ACCELERATOR=cpu ;;
  *) echo "error: CANTUS_DEVICE=$CANTUS_DEVICE: expected cuda or cpu" >&2; exit 2 ;;
esac

STEP="${STEP:-run}"
case "$STEP" in
  plan|run|commit) ;;
  *) echo "error: STEP=$STEP: expected plan, run or commit" >&2; exit 2 ;;
esac

# require NAME...: stop with a message naming every missing input variable.
require() {
  local missing=()
  for name in "$@"; do [ -n "${!name:-}" ] || missing+=("$name"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "error: ${CANTUS_STAGE:-stage}: set ${missing[*]} (see the header of slurm/${CANTUS_STAGE:-<stage>}.sh)" >&2
    exit 2
  fi
}

# The flags that tell a step which task it is. Array tasks and single jobs need none (the stage reads
# the SLURM array variables); the commit job is not one of the tasks, so it is told their count.
task_flags() {
  TASK_FLAGS=()
  if [ "$STEP" = commit ] && [ -n "${NUM_TASKS:-}" ] && [ "$NUM_TASKS" != 1 ]; then
    TASK_FLAGS=(--task-index 0 --num-tasks "$NUM_TASKS")
  fi
}

# The device of this step: plan and commit only read manifests, so they run on the CPU anywhere.
step_device() {
  if [ "$STEP" = run ] && [ "$CANTUS_DEVICE" = cuda ]; then echo cuda; else echo cpu; fi
}

# resolve_export URL: a VAE given as a train ledger (<vae out>/checkpoints/manifest.json) becomes
# the export of its newest checkpoint; any other URL is returned unchanged.
resolve_export() {
  case "$1" in
    */checkpoints/manifest.json)
      "$CANTUS_PYTHON" -c 'import sys; from pipeline import manifest
print(manifest.read_ledger(sys.argv[1]).at_step().export_url)' "$1" ;;
    *) echo "$1" ;;
  esac
}

# run_step COMMAND...: run the step's command (exec). A run step of a job with several tasks (nodes) runs
# it once per task under srun; each task logs its node, and where several tasks share a node's GPUs each
# sees one of them (by SLURM_LOCALID), so `--device cuda` is that GPU.
run_step() {
  if [ "$STEP" = run ] && [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
    # shellcheck disable=SC2016  # expanded by each task, on its node
    exec srun --kill-on-bad-exit=1 bash -c '
      echo "[$(date +%H:%M:%S) ${CANTUS_STAGE} task $SLURM_PROCID of $SLURM_STEP_NUM_TASKS on node $SLURMD_NODENAME]" >&2
      if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
        export CUDA_VISIBLE_DEVICES="${gpus[$((SLURM_LOCALID % ${#gpus[@]}))]}"
      fi
      exec "$@"' stage-task "$@"
  fi
  log "on node ${SLURMD_NODENAME:-$(hostname -s)}"
  exec "$@"
}

log() { echo "[$(date +%H:%M:%S) ${CANTUS_STAGE:-stage} ${STEP} job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID}] $*" >&2; }
