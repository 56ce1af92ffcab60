#!/usr/bin/env bash
# Training, decoding and GRPO at real shapes on one NVIDIA GPU, side by side with transformers + torch
# (and TRL's GRPOTrainer for the GRPO row, where trl is installed).
#
#   benchmarks/gpu.sh            # full: needs jax[cuda] (+ flax, optax) already installed; < 8 minutes
#   benchmarks/gpu.sh smoke      # tiny shapes on whatever jax sees (CPU here): the same code end to end
#
# No network: the project is installed with --no-deps (full mode) and only jax, flax, optax, numpy (and
# transformers + torch for the comparison, when present) are used; grain, orbax and llama-models are
# not needed (the GRPO row uses orbax and trl when present, and says "not run" in the JSON when not).
# What it measures: benchmarks/gpu_bench.py. Output: a markdown table for docs/performance.md, then one
# JSON line; both are also written to benchmarks/gpu-results-<date>.md.
set -euo pipefail
mode="${1:-full}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python}"
if [[ "$mode" == "full" ]]; then
  "$py" -m pip install --no-deps --no-build-isolation -q . || "$py" -m pip install --no-deps -q .
  "$py" -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()" || {
    echo "gpu.sh: jax sees no GPU (run 'gpu.sh smoke' for the CPU smoke test)" >&2; exit 2; }
elif [[ "$mode" == "smoke" ]]; then
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # smoke: run from the checkout, install nothing
else
  echo "usage: benchmarks/gpu.sh [full|smoke]" >&2; exit 2
fi
out="benchmarks/gpu-results-$(date -u +%Y-%m-%d)-$mode.md"
timeout 900 "$py" benchmarks/gpu_bench.py --mode "$mode" | tee "$out"
echo "gpu.sh: wrote $out" >&2
