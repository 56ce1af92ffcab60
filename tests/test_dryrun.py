"""`train --dry-run`: one real train step compiled from abstract shapes, its memory and cost reported,
nothing allocated; memory linear in the sequence length with the blockwise backend; TPU topologies
through libtpu's compile-only mode when libtpu is installed."""

from __future__ import annotations

import importlib.util
import io
import json

import jax
import pytest

from llama3_jax import cli
from llama3_jax.config import load_yaml_config
from llama3_jax.train import TrainConfig
from llama3_jax.train.dryrun import compile_step, dry_run

KEYS = {"topology", "devices", "bytes_per_device", "device_memory_bytes", "fits", "flops_per_step",
        "estimated_step_seconds", "estimated_mfu"}
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


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) is not installed")
def test_dry_run_compiles_for_a_tpu_topology_with_the_splash_kernel():
    """v5e:2x2 through libtpu's compile-only mode: auto attention = splash, compiled by Mosaic for real chips."""
    out = io.StringIO()
    report = dry_run(config("mesh.fsdp=4", "batch_size=4", "seq_len=256", "compute_dtype=bfloat16"), "v5e:2x2", out=out)
    assert report["devices"] == 4 and report["fits"] and report["estimated_step_seconds"] > 0
    assert report["device_memory_bytes"] == 16 * 2**30 and 0 < report["estimated_mfu"] < 1
