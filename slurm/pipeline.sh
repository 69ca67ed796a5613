#!/bin/bash
# Submit the whole Cantus chain to SLURM: shard -> [VAE train] -> pre_encode (train and val sets)
# -> train -> render. Every job waits for the one before it (--dependency=afterok) and is cancelled,
# not left pending, when that one fails (--kill-on-invalid-dep=yes). A stage's plan and commit are
# small jobs around its array, so its manifest appears only when all of its tasks succeeded.
# Prints one line per job, `<stage>.<step> <job id>` (steps: plan, run, commit), then the outputs.
#
#   INPUT=/data/audio CAPTIONS=/data/captions.csv OUT=s3://bucket/run1 MODEL_CONFIG=configs/dit.json \
#   PRETRANSFORM_CKPT=/ckpt/sao_vae.safetensors PROMPTS=prompts.jsonl MAX_STEPS=100000 \
#   SBATCH_ARGS="-p gpu -A myproj" bash slurm/pipeline.sh
#
# Inputs (environment variables; URLs are local paths on a shared filesystem or s3://):
#   OUT                root URL of the outputs; each stage writes under it (override one by one:
#                      SHARD_OUT=$OUT/shards VAE_OUT=$OUT/vae LATENT_OUT=$OUT/latents
#                      TRAIN_OUT=$OUT/train RENDER_OUT=$OUT/render)
#   START_AT           shard | pre_encode | train | render (default shard): the first stage to run;
#                      its input manifest must exist already
#   INPUT, CAPTIONS    raw audio folder/URL and captions file (START_AT=shard)
#   MODEL_CONFIG       the diffusion model config (with its pretransform block)
#   PRETRANSFORM_CKPT  the VAE weights (e.g. Stable Audio Open's). Without it, a VAE is trained first
#                      on the audio shards with VAE_CONFIG (an autoencoder config) for VAE_MAX_STEPS,
#                      and pre_encode uses the newest export of its ledger.
#   MAX_STEPS          diffusion training steps; PROMPTS: prompts file for render (JSON lines)
#   SHARD_TASKS=4 PRE_ENCODE_TASKS=2 RENDER_TASKS=1   array sizes (1: one job that plans and commits itself)
#   SHARD_NODES PRE_ENCODE_NODES RENDER_NODES TRAIN_NODES   nodes per job of that stage (default 1; train:
#                      as slurm/train.sh says). An array job on N nodes runs N x <STAGE>_TASKS_PER_NODE
#                      tasks (default 1; train: 8, one per GPU), each its own share of the plan, so a
#                      stage has <STAGE>_TASKS x NODES x TASKS_PER_NODE tasks in all. GPU stages ask for
#                      one GPU per task on each node (--gres=gpu:<tasks per node>).
#   PRE_ENCODE_VAL=1   also pre-encode <SHARD_OUT>/val/manifest.json to <LATENT_OUT>/val (train gets
#                      it as --val-data); 0: no validation set
#   SHARD_ARGS PRE_ENCODE_ARGS TRAIN_ARGS VAE_TRAIN_ARGS RENDER_ARGS DS_CONFIG VAE_DS_CONFIG
#                      more flags for each stage (see slurm/<stage>.sh)
#   SBATCH_ARGS        sbatch options for every job (partition, account, ...)
#   SMALL_SBATCH_ARGS  for plan and commit jobs, after SBATCH_ARGS (default
#                      "--ntasks=1 --cpus-per-task=1 --gres=none --time=01:00:00")
#   SHARD_SBATCH_ARGS PRE_ENCODE_SBATCH_ARGS VAE_SBATCH_ARGS TRAIN_SBATCH_ARGS RENDER_SBATCH_ARGS
#                      for that stage's array or train job, last (they win)
#   CANTUS_DEVICE      cuda | cpu (default cuda). cpu: GPU jobs get --gres=none, DeepSpeed runs on
#                      the CPU with an fp32 ds_config (ds_configs/zero2_cpu.json)
#   CANTUS_PYTHON      interpreter on the compute nodes (default: the repository's .venv, else python)
#   LOG_DIR            job logs (default ./cantus-logs). SLURM writes a job's log on the node its batch
#                      script runs on: without a shared filesystem, give a folder that exists on every node.
#
# Nodes need to share nothing but the object store: with every URL (OUT, INPUT, MODEL_CONFIG may stay
# local files present on every node) on s3://, each task keeps its scratch on its node's local disk
# (TMPDIR; train: SCRATCH_DIR, see slurm/train.sh).
set -euo pipefail
CANTUS_ROOT="${CANTUS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export CANTUS_ROOT
if [ -z "${CANTUS_PYTHON:-}" ]; then
  if [ -x "$CANTUS_ROOT/.venv/bin/python" ]; then CANTUS_PYTHON="$CANTUS_ROOT/.venv/bin/python"; else CANTUS_PYTHON=python; fi
fi
export CANTUS_PYTHON
export CANTUS_DEVICE="${CANTUS_DEVICE:-cuda}"

die() { echo "error: slurm/pipeline.sh: $*" >&2; exit 2; }
require() {
  local missing=()
  for name in "$@"; do [ -n "${!name:-}" ] || missing+=("$name"); done
  [ ${#missing[@]} -eq 0 ] || die "set ${missing[*]} (see the header of slurm/pipeline.sh)"
}

START_AT="${START_AT:-shard}"
case "$START_AT" in
  shard) first=0 ;; pre_encode) first=1 ;; train) first=2 ;; render) first=3 ;;
  *) die "START_AT=$START_AT: expected shard, pre_encode, train or render" ;;
esac
if [ -z "${OUT:-}" ]; then
  require SHARD_OUT LATENT_OUT TRAIN_OUT RENDER_OUT
fi
SHARD_OUT="${SHARD_OUT:-$OUT/shards}"
VAE_OUT="${VAE_OUT:-${OUT:-}/vae}"
LATENT_OUT="${LATENT_OUT:-$OUT/latents}"
TRAIN_OUT="${TRAIN_OUT:-$OUT/train}"
RENDER_OUT="${RENDER_OUT:-$OUT/render}"
SHARD_TASKS="${SHARD_TASKS:-4}" PRE_ENCODE_TASKS="${PRE_ENCODE_TASKS:-2}" RENDER_TASKS="${RENDER_TASKS:-1}"
PRE_ENCODE_VAL="${PRE_ENCODE_VAL:-1}"
SHARD_NODES="${SHARD_NODES:-1}" PRE_ENCODE_NODES="${PRE_ENCODE_NODES:-1}" RENDER_NODES="${RENDER_NODES:-1}"
SHARD_TASKS_PER_NODE="${SHARD_TASKS_PER_NODE:-1}" PRE_ENCODE_TASKS_PER_NODE="${PRE_ENCODE_TASKS_PER_NODE:-1}"
RENDER_TASKS_PER_NODE="${RENDER_TASKS_PER_NODE:-1}"
for name in SHARD_TASKS PRE_ENCODE_TASKS RENDER_TASKS SHARD_NODES PRE_ENCODE_NODES RENDER_NODES \
            SHARD_TASKS_PER_NODE PRE_ENCODE_TASKS_PER_NODE RENDER_TASKS_PER_NODE ${TRAIN_NODES:+TRAIN_NODES} \
            ${TRAIN_TASKS_PER_NODE:+TRAIN_TASKS_PER_NODE}; do
  case "${!name}" in ''|0|*[!0-9]*) die "$name=${!name}: expected a positive number" ;; esac
done
LOG_DIR="${LOG_DIR:-$PWD/cantus-logs}"
mkdir -p "$LOG_DIR"
LEDGER="$TRAIN_OUT/checkpoints/manifest.json"

# What each stage needs, checked before anything is submitted.
[ "$first" -gt 0 ] || require INPUT
[ "$first" -gt 2 ] || require MODEL_CONFIG MAX_STEPS
require PROMPTS
if [ "$first" -le 1 ] && [ -z "${PRETRANSFORM_CKPT:-}" ]; then
  require VAE_CONFIG VAE_MAX_STEPS
  [ -n "${OUT:-}" ] || require VAE_OUT
fi
exists() {
  "$CANTUS_PYTHON" -c 'import sys; from pipeline import storage; sys.exit(0 if storage.exists(sys.argv[1]) else 1)' "$1"
}
needs_input() {  # START_AT=<stage> runs only on an input manifest that exists
  exists "$1" || die "START_AT=$START_AT needs $1, which does not exist (run the stage before it first)"
}
case "$first" in
  1) needs_input "$SHARD_OUT/manifest.json"; [ "$PRE_ENCODE_VAL" = 0 ] || needs_input "$SHARD_OUT/val/manifest.json" ;;
  2) needs_input "$LATENT_OUT/manifest.json"; [ "$PRE_ENCODE_VAL" = 0 ] || needs_input "$LATENT_OUT/val/manifest.json" ;;
  3) needs_input "$LEDGER" ;;
esac

# shellcheck disable=SC2206  # the *SBATCH_ARGS are lists of options, split on spaces on purpose
COMMON=(--parsable --kill-on-invalid-dep=yes ${SBATCH_ARGS:-})
# shellcheck disable=SC2206
SMALL=(${SMALL_SBATCH_ARGS:---ntasks=1 --cpus-per-task=1 --gres=none --time=01:00:00})
GPU=()
[ "$CANTUS_DEVICE" != cpu ] || GPU=(--gres=none)

# submit NAME DEPENDENCY [VAR=VALUE ...] -- [SBATCH OPTIONS ...] SCRIPT: submit one job with those
# variables in its environment (sbatch passes the whole environment on); print `NAME ID`; set JOB.
submit() {
  local name="$1" dep="$2" vars=() opts=()
  shift 2
  while [ "$1" != -- ]; do vars+=("$1"); shift; done
  shift
  [ -z "$dep" ] || opts+=(--dependency="afterok:$dep")
  JOB="$(env "${vars[@]}" sbatch "${COMMON[@]}" "${opts[@]}" --job-name="cantus-${name//./-}" \
         --output="$LOG_DIR/%x-%j.log" "$@")"
  JOB="${JOB%%;*}"  # --parsable prints `id[;cluster]`
  echo "$name $JOB"
}

# placement NODES TASKS_PER_NODE: the sbatch options of one job on NODES nodes with TASKS_PER_NODE tasks
# each (one GPU per task on a GPU stage, GPU=1); sets PLACE.
placement() {
  PLACE=()
  [ "$1$2" = 11 ] && return
  PLACE=(--nodes="$1" --ntasks-per-node="$2" --ntasks="$(($1 * $2))")
  [ "${3:-0}" = 0 ] || [ "$CANTUS_DEVICE" = cpu ] || PLACE+=(--gres="gpu:$2")
}

# stage NAME SCRIPT TASKS NODES TASKS_PER_NODE GPU DEPENDENCY [VAR=VALUE ...] -- [SBATCH OPTIONS ...]: one
# job when it has one task in all, else plan job, array of TASKS jobs (each on NODES nodes with
# TASKS_PER_NODE tasks per node), commit job. Sets DONE to the job whose success means the manifest exists.
stage() {
  local name="$1" script="$CANTUS_ROOT/slurm/$2" tasks="$3" nodes="$4" per_node="$5" gpu="$6" dep="$7" vars=()
  shift 7
  while [ "$1" != -- ]; do vars+=("$1"); shift; done
  shift
  local total=$((tasks * nodes * per_node))
  if [ "$total" = 1 ]; then
    submit "$name.run" "$dep" "${vars[@]}" STEP=run -- "$@" "$script"
    DONE="$JOB"
    return
  fi
  placement "$nodes" "$per_node" "$gpu"
  submit "$name.plan" "$dep" "${vars[@]}" STEP=plan -- "${SMALL[@]}" "$script"
  submit "$name.run" "$JOB" "${vars[@]}" STEP=run -- --array="0-$((tasks - 1))" "${PLACE[@]}" "$@" "$script"
  submit "$name.commit" "$JOB" "${vars[@]}" STEP=commit NUM_TASKS="$total" -- "${SMALL[@]}" "$script"
  DONE="$JOB"
}

# shellcheck disable=SC2206
shard_opts=(${SHARD_SBATCH_ARGS:-})
# shellcheck disable=SC2206
pre_opts=("${GPU[@]}" ${PRE_ENCODE_SBATCH_ARGS:-})
# shellcheck disable=SC2206
vae_opts=("${GPU[@]}" ${VAE_SBATCH_ARGS:-${TRAIN_SBATCH_ARGS:-}})
train_place=()
if [ -n "${TRAIN_NODES:-}${TRAIN_TASKS_PER_NODE:-}" ]; then  # else slurm/train.sh's own #SBATCH lines
  placement "${TRAIN_NODES:-1}" "${TRAIN_TASKS_PER_NODE:-8}" 1
  train_place=("${PLACE[@]}")
fi
# shellcheck disable=SC2206
train_opts=("${GPU[@]}" "${train_place[@]}" ${TRAIN_SBATCH_ARGS:-})
# shellcheck disable=SC2206
render_opts=("${GPU[@]}" ${RENDER_SBATCH_ARGS:-})

after=""  # the job the next stage waits for
if [ "$first" -le 0 ]; then
  stage shard shard.sh "$SHARD_TASKS" "$SHARD_NODES" "$SHARD_TASKS_PER_NODE" 0 "" INPUT="$INPUT" CAPTIONS="${CAPTIONS:-}" OUTPUT="$SHARD_OUT" \
        SHARD_ARGS="${SHARD_ARGS:-}" -- "${shard_opts[@]}"
  after="$DONE"
fi

if [ "$first" -le 1 ]; then
  vae="${PRETRANSFORM_CKPT:-}"
  pre_after="$after"
  if [ -z "$vae" ]; then
    submit vae.run "$after" DATA="$SHARD_OUT/manifest.json" OUTPUT="$VAE_OUT" MODEL_CONFIG="$VAE_CONFIG" \
           MAX_STEPS="$VAE_MAX_STEPS" DS_CONFIG="${VAE_DS_CONFIG:-${DS_CONFIG:-}}" VAL_DATA= \
           TRAIN_ARGS="${VAE_TRAIN_ARGS:-}" -- "${vae_opts[@]}" "$CANTUS_ROOT/slurm/train.sh"
    vae="$VAE_OUT/checkpoints/manifest.json"  # slurm/pre_encode.sh takes its newest export
    pre_after="$JOB"
  fi
  stage pre_encode pre_encode.sh "$PRE_ENCODE_TASKS" "$PRE_ENCODE_NODES" "$PRE_ENCODE_TASKS_PER_NODE" 1 "$pre_after" INPUT="$SHARD_OUT/manifest.json" \
        OUTPUT="$LATENT_OUT" MODEL_CONFIG="$MODEL_CONFIG" PRETRANSFORM_CKPT="$vae" \
        PRE_ENCODE_ARGS="${PRE_ENCODE_ARGS:-}" -- "${pre_opts[@]}"
  after="$DONE"
  if [ "$PRE_ENCODE_VAL" != 0 ]; then
    stage pre_encode_val pre_encode.sh "$PRE_ENCODE_TASKS" "$PRE_ENCODE_NODES" "$PRE_ENCODE_TASKS_PER_NODE" 1 \
          "$pre_after" INPUT="$SHARD_OUT/val/manifest.json" \
          OUTPUT="$LATENT_OUT/val" MODEL_CONFIG="$MODEL_CONFIG" PRETRANSFORM_CKPT="$vae" \
          PRE_ENCODE_ARGS="${PRE_ENCODE_ARGS:-}" -- "${pre_opts[@]}"
    after="$after:$DONE"  # afterok:a:b waits for both
  fi
fi

if [ "$first" -le 2 ]; then
  val=""
  [ "$PRE_ENCODE_VAL" = 0 ] || val="$LATENT_OUT/val/manifest.json"
  submit train.run "$after" DATA="$LATENT_OUT/manifest.json" VAL_DATA="$val" OUTPUT="$TRAIN_OUT" \
         MODEL_CONFIG="$MODEL_CONFIG" MAX_STEPS="$MAX_STEPS" DS_CONFIG="${DS_CONFIG:-}" \
         TRAIN_ARGS="${TRAIN_ARGS:-}" -- "${train_opts[@]}" "$CANTUS_ROOT/slurm/train.sh"
  after="$JOB"
fi

stage render render.sh "$RENDER_TASKS" "$RENDER_NODES" "$RENDER_TASKS_PER_NODE" 1 "$after" CHECKPOINTS="$LEDGER" PROMPTS="$PROMPTS" \
      OUTPUT="$RENDER_OUT" RENDER_ARGS="${RENDER_ARGS:-}" -- "${render_opts[@]}"

echo "outputs: shards $SHARD_OUT, latents $LATENT_OUT, model $LEDGER, render $RENDER_OUT/manifest.json"
echo "logs: $LOG_DIR"
