#!/usr/bin/env bash
# Training on a SLURM GPU cluster: one llama3-jax process per node, all its GPUs local to it.
#
#   sbatch tools/slurm_gpu.sh --config configs/tiny.yaml workdir=/shared/runs/tiny data.path=/shared/corpus.jsonl \
#       batch_size=16   # a multiple of the 2 x 8 GPUs
#   scancel --signal=TERM --full JOBID      # one checkpoint, every process exits 0; resubmit to resume
#
# srun starts the same command on every node; llama3-jax reads SLURM's variables (SLURM_NTASKS,
# SLURM_PROCID, SLURM_STEP_NODELIST) and joins jax.distributed with the first node as coordinator.
# Run it from the repository root with its .venv (pip install -c constraints.txt -e ".[cuda12]");
# the workdir must be on a file system every node sees.
#SBATCH --job-name=llama3-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=llama3-jax-%j.log
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
# --kill-on-bad-exit: a process that dies takes the others down (they also fail on their own within
# distributed.heartbeat_timeout); --signal above gives train 300 s to save before the time limit.
srun --kill-on-bad-exit=1 llama3-jax train "$@"
