#!/bin/bash
# Multi-node ESM-2 pretraining on Slurm: one task per node, each running torchrun with one process per GPU; the
# nodes meet at a c10d rendezvous on the first node. Submit from the recipe folder, entrypoint and Hydra overrides
# as arguments:
#
#   sbatch slurm.sh train_fsdp2.py --config-name L1_650M num_train_steps=2000
#   sbatch --nodes=4 --time=24:00:00 slurm.sh train_mfsdp.py --config-name L1_15B
#   CONTAINER_IMAGE=~/esm2-te.sqsh CONTAINER_MOUNTS=/lustre/uniref:/data sbatch slurm.sh train_ddp.py \
#       --config-name L0_sanity dataset.path=/data/uniref50.parquet
#
# Settings (environment variables of the submitting shell; sbatch passes them on):
#   GPUS_PER_NODE     processes per node                    (default: the GPUs Slurm gives each node, else 8)
#   CONTAINER_IMAGE   container image for pyxis/enroot, e.g. the Dockerfile's image imported with
#                     `enroot import -o esm2-te.sqsh dockerd://esm2-te` (unset: run in the node's own environment)
#   CONTAINER_MOUNTS  extra "host_path:container_path[,...]" mounts (data, checkpoints); the recipe folder is always
#                     mounted at its own path and is the working directory
#   MASTER_PORT       rendezvous port on the first node     (default: derived from the job id)
#   RECIPE_DIR        the recipe folder as the nodes see it (default: the folder sbatch was called from)
#   REQUEUE_ON_PREEMPT=1  after a preemption signal and the checkpoint it triggers, requeue this job
#                     (`scontrol requeue`): it starts again by itself and resumes from the checkpoint
#   SLURM_DRY_RUN=1   print the srun (or torchrun) command instead of running it
#
# Without Slurm, the per-node launch runs as it would on a node (e.g. two "nodes" on one machine: start it twice
# with SLURM_NODEID=0 and 1, SLURM_NNODES=2, MASTER_ADDR and MASTER_PORT set):
#   SLURM_NNODES=1 SLURM_NODEID=0 GPUS_PER_NODE=2 bash slurm.sh --node train_fsdp2.py --config-name L0_sanity
#
# Preemption: 300 s before the time limit Slurm sends SIGUSR1 to this batch shell (B:), which passes it through srun
# to each node's launcher and from there to the training processes only (torchrun itself ignores it); they save a
# checkpoint and stop. Resubmitting the same command resumes from it, or, with REQUEUE_ON_PREEMPT=1, the job requeues
# itself (same job id; the log continues in the same file, --open-mode=append).
#
#SBATCH --job-name=esm2-te
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append

set -euo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"
# Under sbatch this script runs from a copy in Slurm's spool folder, so the recipe is where the job was submitted.
RECIPE_DIR="${RECIPE_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}}"

# Run "$@" in the background, hand SIGUSR1 to `relay PID` while it runs, and return its exit status.
run_relaying_usr1() {
  local relay=$1
  shift
  "$@" &
  local pid=$! status=0
  # shellcheck disable=SC2064  # the PID is known now, when the trap is set
  trap "$relay $pid" USR1
  wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again
    status=0
    wait "$pid" || status=$?
  done
  trap - USR1
  return "$status"
}

PREEMPTED=0
signal_srun() { PREEMPTED=1; kill -USR1 "$1"; }    # srun forwards the signal to every node's task
signal_ranks() { pkill -USR1 -P "$1" || true; }    # torchrun's children: the training processes

# One node's share of the job: torchrun over this node's GPUs, joining the rendezvous on the first node.
launch_node() {
  local cmd=(
    torchrun
    --nnodes="${SLURM_NNODES:-1}"
    --nproc_per_node="$GPUS_PER_NODE"
    --rdzv_backend=c10d
    --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
    --rdzv_id="${SLURM_JOB_ID:-local}"
    # c10d numbers the nodes itself (torchrun ignores --node_rank for it); SLURM_NODEID only says which node
    # hosts the rendezvous store, so no node has to guess it from host names.
    --rdzv_conf="is_host=$(( ${SLURM_NODEID:-0} == 0 ))"
    "$@"
  )
  cd "$RECIPE_DIR"
  if [[ "${SLURM_DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    return
  fi
  echo "node ${SLURM_NODEID:-0} of ${SLURM_NNODES:-1} ($(hostname)): ${cmd[*]}"
  # torchrun (and its children, until they install their own handler) ignore SIGUSR1; signal_ranks delivers it.
  run_relaying_usr1 signal_ranks bash -c 'trap "" USR1; exec "$@"' torchrun-ignoring-usr1 "${cmd[@]}"
}

# The whole job, run by sbatch on the first node: one `slurm.sh --node` task per node through srun.
launch_job() {
  if [[ $# -eq 0 ]]; then
    echo "usage: sbatch slurm.sh ENTRYPOINT [--config-name NAME] [key=value ...]" >&2
    return 2
  fi
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # sed reads to the end: no SIGPIPE
  MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
  export MASTER_ADDR MASTER_PORT GPUS_PER_NODE
  local srun_cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
  if [[ -n "$CONTAINER_IMAGE" ]]; then
    srun_cmd+=(
      --container-image="$CONTAINER_IMAGE"
      --container-mounts="$RECIPE_DIR:$RECIPE_DIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
      --container-workdir="$RECIPE_DIR"
    )
  fi
  srun_cmd+=(bash "$RECIPE_DIR/slurm.sh" --node "$@")
  if [[ "${SLURM_DRY_RUN:-0}" == 1 ]]; then
    echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT GPUS_PER_NODE=$GPUS_PER_NODE ${srun_cmd[*]}"
    return
  fi
  echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT"
  local status=0
  run_relaying_usr1 signal_srun "${srun_cmd[@]}" || status=$?
  if [[ "$PREEMPTED" == 1 && "$status" == 0 && "${REQUEUE_ON_PREEMPT:-0}" == 1 ]]; then
    echo "job $SLURM_JOB_ID: preempted after a checkpoint; requeueing it to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}

if [[ "${1:-}" == "--node" ]]; then
  shift
  launch_node "$@"
else
  launch_job "$@"
fi
