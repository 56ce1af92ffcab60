"""`benchmarks/gpu.sh smoke` runs end to end on this CPU: the GPU script's code (training step, decode
at several batch sizes, the matmul and copy references, transformers + torch side by side) on tiny
shapes, so the script a GPU user runs once, with no network, is known to work before a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_script_smoke_mode_runs_end_to_end():
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["mode"] == "smoke" and report["device"] == "cpu"
    assert report["train_tokens_per_s"] > 0 and report["decode_b1_tokens_per_s"] > 0
    assert report["matmul_bf16_flops"] > 0 and 0 < report["decode_b1_bandwidth_fraction"]
    assert report["torch_decode_b1_tokens_per_s"] > 0  # the transformers + torch column ran too
    # the GRPO row: our GRPO.step (rollout, reward, update) and TRL's GRPOTrainer on the same run
    assert report["grpo_step_s"] > 0 and report["grpo_rollout_tokens_per_s"] > 0 and report["grpo_packed"]
    assert report["grpo_rollout_s"] + report["grpo_update_s"] < report["grpo_step_s"] * 1.01
    assert report["trl_grpo_step_s"] > 0
    assert any(line.startswith("| GRPO steps/s (tiny") for line in lines)
    assert any(line.startswith("| train tokens/s |") for line in lines)  # the README table
    written = proc.stderr.strip().splitlines()[-1].split("wrote ", 1)[1]
    assert (REPO / written).read_text().strip().splitlines()[-1] == lines[-1]
