#!/usr/bin/env bash
# Generation over many independent GPUs: a SLURM job array, each task one shard of the input.
#
#   sbatch --array=0-15 tools/slurm_generate_array.sh --checkpoint ckpt/llama3.1-8b-instruct \
#       --input prompts.jsonl --output out/completions.jsonl --max-new-tokens 512
#   python tools/merge_outputs.py --input prompts.jsonl --output out/completions.jsonl --num-shards 16
#
# Task I takes every 16th input line from line I+1 and writes out/completions-0000I-of-00016.jsonl; a
# failed or preempted task is simply resubmitted (sbatch --array=I ...) and resumes its own file.
#SBATCH --job-name=llama3-jax-generate
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=llama3-jax-generate-%A_%a.log
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
llama3-jax generate "$@" --num-shards "$SLURM_ARRAY_TASK_COUNT" --shard-index "$SLURM_ARRAY_TASK_ID"
