"""`train --dry-run`: one real train step compiled from abstract shapes, its memory and cost reported,
nothing allocated; memory linear in the sequence length with the blockwise backend; TPU topologies
through libtpu's compile-only mode when libtpu is installed."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from llama3_jax import cli
from llama3_jax.model.config import load_yaml_config
from llama3_jax.train import TrainConfig
from llama3_jax.train import roofline
from llama3_jax.train.config import model_config
from llama3_jax.train.dryrun import compile_step, cost_estimate, dry_run
from llama3_jax.train.roofline import executed_flops

KEYS = {"topology", "devices", "bytes_per_device", "device_memory_bytes", "fits", "flops_per_step",
        "estimated_step_seconds", "estimated_mfu", "estimate"}
SMALL = ["model={preset: test-small, vocab_size: 262}", "tokenizer=bytes", "batch_size=2", "seq_len=64",
         "compute_dtype=float32"]


def config(*extra) -> TrainConfig:
    return load_yaml_config(TrainConfig, None, [*SMALL, *extra])


def test_dry_run_on_local_devices_prints_the_report_last(capsys):
    assert cli.main(["train", *SMALL, "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert set(report) == KEYS and set(report["bytes_per_device"]) == {"arguments", "temporaries", "outputs", "peak"}
    assert report["fits"] is True and report["devices"] == 1 and report["flops_per_step"] > 0
    # the donated state aliases the outputs: the peak counts it once
    b = report["bytes_per_device"]
    assert b["arguments"] <= b["peak"] < b["arguments"] + b["temporaries"] + b["outputs"]


def test_dry_run_that_does_not_fit_exits_3(capsys):
    # 405B in float32 with AdamW moments: ~4.9 TB of arguments on one CPU device
    code = cli.main(["train", "model=llama3.1-405b", "tokenizer=bytes", "batch_size=1", "seq_len=16",
                     "remat=full", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["fits"] is False
    assert "does not fit: needs" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--num-slices", "2"], "--num-slices needs --topology"),
    (["--topology", "v5e:4x4"], "--topology and --num-slices need --dry-run"),
    (["attention=flash", "--dry-run"], "attention must be one of"),
])
def test_dry_run_config_errors_exit_2(argv, message, capsys):
    assert cli.main(["train", *SMALL, *argv]) == 2
    assert message in capsys.readouterr().err


def test_train_step_memory_is_linear_in_seq_len_with_blockwise():
    """Compiled temporaries of one train step (batch 1): doubling T from 4096 to 8192 at most ~doubles
    them with attention=blockwise (the reference's (T, T) scores would quadruple them)."""
    temps = {}
    for t in (4096, 8192):
        compiled, _, _ = compile_step(config("batch_size=1", f"seq_len={t}", "attention=blockwise"), jax.devices()[:1])
        temps[t] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[8192] <= 2.2 * temps[4096], temps


# 8 fake CPU devices (a subprocess: jax reads XLA_FLAGS at import); prints temporaries with the `act_seq`
# rule as the table has it, then with the residual stream whole (the layout before sequence parallelism)
SEQ_PARALLEL = """
import json, jax
from llama3_jax.parallel import sharding
from llama3_jax.model.config import load_yaml_config
from llama3_jax.train import TrainConfig
from llama3_jax.train.dryrun import compile_step
cfg = load_yaml_config(TrainConfig, None, ["model={preset: test-small, vocab_size: 262, dim: 64, n_layers: 6, max_seq_len: 256}",
    "tokenizer=bytes", "batch_size=2", "seq_len=256", "compute_dtype=float32", "remat=full", "mesh.fsdp=2",
    "mesh.tensor=4", "attention=reference"])
temps = []
for rule in (sharding.RULES["act_seq"], None):
    sharding.RULES["act_seq"] = rule
    temps.append(compile_step(cfg, jax.devices())[0].memory_analysis().temp_size_in_bytes)
print(json.dumps(temps))
"""


def test_sequence_parallel_residual_stream_splits_the_saved_layer_inputs():
    """remat=full keeps each layer's input for the backward; with `act_seq` over tensor (4 ways here)
    every device keeps a quarter of the positions: the 6 layers' saved inputs (1 row x 256 positions x
    64 x 4 B each per device) shrink by at least 3/4 of their size."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", SEQ_PARALLEL], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split, whole = json.loads(proc.stdout.strip().splitlines()[-1])
    saved_inputs = 6 * 1 * 256 * 64 * 4
    assert whole - split >= saved_inputs * 3 / 4, (split, whole)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) is not installed")
def test_dry_run_compiles_for_a_tpu_topology_with_the_splash_kernel():
    """v5e:2x2 through libtpu's compile-only mode: auto attention = splash, compiled by Mosaic for real chips."""
    out = io.StringIO()
    report = dry_run(config("mesh.fsdp=4", "batch_size=4", "seq_len=256", "compute_dtype=bfloat16"), "v5e:2x2", out=out)
    assert report["devices"] == 4 and report["fits"] and report["estimated_step_seconds"] > 0
    assert report["device_memory_bytes"] == 16 * 2**30 and 0 < report["estimated_mfu"] < 1
    assert report["estimate"] in ("libtpu cost model", "roofline")


@pytest.mark.parametrize("remat", ["none", "full", "offload"])
def test_roofline_counts_the_flops_the_compiler_counts_where_it_sees_every_matmul(remat):
    """On one CPU device the program has no compiler-made loops, so XLA's cost analysis counts every
    matmul: the roofline's hand count (weights, recompute per remat policy, attention) must agree with
    it, the compiler's count being larger only by the elementwise work (norms, softmax, SiLU: < 8%)."""
    cfg = config("model={preset: test-small, vocab_size: 262, dim: 256, intermediate_size: 768, n_heads: 4, "
                 "n_kv_heads: 2, head_dim: 64}", f"remat={remat}", "attention=reference")
    mc = model_config(cfg)
    compiler, _, hbm_bytes = cost_estimate(cfg, mc, jax.devices()[:1])
    counted = executed_flops(mc, remat, cfg.batch_size, cfg.seq_len, causal_skip=False)
    assert 1.0 <= compiler / counted < 1.08, (compiler, counted)
    assert hbm_bytes > 0
    roof = roofline.estimate(mc, remat, cfg.batch_size, cfg.seq_len, {"fsdp": 16}, "TPU v5 lite", 16,
                             compiler / 16, hbm_bytes / 16)
    assert roof.compute_s == pytest.approx(max(counted, compiler) / 16 / 197e12)
    assert roof.seconds == max(roof.compute_s, roof.memory_s, roof.network_s) and roof.network_s > 0
