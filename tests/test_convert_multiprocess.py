"""`convert` across processes (tools/launch_local.py, 2 processes x 4 fake CPU devices): `--to jax`
writes one sharded orbax checkpoint from every process's shards; `--from jax` restores per process and
process 0 writes; both round-trip bit-exact against the source safetensors. SRC and DST are given as
file:// URLs (paths.py) here and there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from conftest import make_hf_llama
from llama3_jax import cli

ROOT = Path(__file__).resolve().parent.parent


def _convert_on_two(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "launch_local.py"), "-n", "2", "--cpu-devices", "4",
                           "--", sys.executable, "-m", "llama3_jax.cli", "convert", "--quiet", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
        assert x[name].tobytes() == y[name].tobytes(), name  # bit-exact


def _url(path: Path) -> str:
    return "file://" + str(path).replace("%", "%25").replace(" ", "%20")


def test_convert_on_two_processes_round_trips_bit_exact(tmp_path):
    src = tmp_path / "hf"
    make_hf_llama(src)
    jax_dir = tmp_path / "jax"
    _convert_on_two("--from", "hf", "--to", "jax", str(src), _url(jax_dir))
    params = jax_dir / "0" / "params"
    # one checkpoint, written by both processes (orbax's per-process OCDBT stores), nothing left behind
    assert sorted(p.name for p in params.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert not list(tmp_path.glob(".jax.tmp-*"))

    one = tmp_path / "a b" / "hf_from_one"  # --from jax on one process; a space, percent-encoded in the URL
    assert cli.main(["convert", "--quiet", "--from", "jax", "--to", "hf", _url(jax_dir), _url(one)]) == 0
    _assert_same_tensors(src, one)
    assert [p.name for p in one.parent.iterdir()] == ["hf_from_one"]  # no temp directory left

    two = tmp_path / "hf_from_two"  # --from jax on two: each restores its shards, process 0 writes
    _convert_on_two("--from", "jax", "--to", "hf", str(jax_dir), str(two))
    _assert_same_tensors(src, two)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not list(tmp_path.glob(".hf_from_two.tmp-*"))
    np.testing.assert_equal((two / "config.json").read_text(), (one / "config.json").read_text())
