"""`convert` at scale. Across processes (tools/launch_local.py, 2 processes x 4 fake CPU devices):
`--to jax` writes one sharded orbax checkpoint from every process's shards; `--from jax` reads per
process (a LoRA workdir on that checkpoint: base layers + merged adapters) and process 0 writes; both
round-trip bit-exact against the source safetensors. SRC and DST are given as file:// URLs (paths.py)
here and there, and the 2-process `--to jax` writes to a local:// URL (remote.py: the processes write
into a shared staging directory, $LLAMA3_JAX_STAGING, and process 0 uploads it). `--from jax` holds one output tensor at a time, not a stacked parameter: measured as
the peak resident memory while each tensor is produced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import make_hf_llama
from llama3_jax.store import checkpoint
from llama3_jax import cli
from llama3_jax.model import lora
from llama3_jax.model.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent


def _convert_on_two(*args: str, **env_extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="", **env_extra)
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
    _convert_on_two("--from", "hf", "--to", "jax", str(src), f"local://{jax_dir}",
                    LLAMA3_JAX_STAGING=str(tmp_path / "staging"))  # an fsspec URL: staged, then uploaded
    assert not any((tmp_path / "staging").iterdir())
    params = jax_dir / "0" / "params"
    # one checkpoint, written by both processes (orbax's per-process OCDBT stores), nothing left behind
    assert sorted(p.name for p in params.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert not list(tmp_path.glob(".jax.tmp-*"))

    one = tmp_path / "a b" / "hf_from_one"  # --from jax on one process; a space, percent-encoded in the URL
    assert cli.main(["convert", "--quiet", "--from", "jax", "--to", "hf", _url(jax_dir), _url(one)]) == 0
    _assert_same_tensors(src, one)
    assert [p.name for p in one.parent.iterdir()] == ["hf_from_one"]  # no temp directory left

    # --from jax on two, of a LoRA workdir on that checkpoint: each process reads its shards of every
    # layer (base and adapters) and merges them, process 0 writes; one process gives the same output
    cfg = checkpoint.load_config(jax_dir)
    lc = lora.LoraConfig(rank=2, targets=("wq", "w_down"))
    rng = np.random.default_rng(0)
    adapters = {"layers": {name: {k: rng.standard_normal(shape).astype(np.float32) * 0.1
                                  for k, (shape, _) in ab.items()} for name, ab in lora.specs(cfg, lc).items()}}
    wd = tmp_path / "lora"
    checkpoint.save_params(wd, cfg, adapters, lora_record=lora.config_record(lc, str(jax_dir.absolute())))
    two, one = tmp_path / "lora_from_two", tmp_path / "lora_from_one"
    _convert_on_two("--from", "jax", "--to", "hf", str(wd), str(two))
    assert cli.main(["convert", "--quiet", "--from", "jax", "--to", "hf", str(wd), str(one)]) == 0
    _assert_same_tensors(one, two)
    assert not list(tmp_path.glob(".lora_from_two.tmp-*"))
    np.testing.assert_equal((two / "config.json").read_text(), (one / "config.json").read_text())
    x, y = load_file(src / "model.safetensors"), load_file(two / "model.safetensors")
    adapted = [k for k in x if "q_proj" in k or "down_proj" in k]
    assert len(adapted) == 2 * cfg.n_layers and all(not np.array_equal(x[k], y[k]) for k in adapted)
    assert all(x[k].tobytes() == y[k].tobytes() for k in x if k not in adapted)  # the base, bit-exact


def _memory() -> dict[str, int]:
    """This process's resident memory now and its peak since the last reset, in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def test_from_jax_holds_one_output_tensor_at_a_time(tmp_path):
    """8 layers of a 4 MB w_gate: reading them must not hold the 32 MB stacked array. The peak resident
    memory (reset before each tensor: /proc/self/clear_refs) grows by at most one tensor's stored bytes,
    decoded chunk and copy (4-12 MB measured; 67 MB when a stacked array was restored whole); the values
    are the stored ones."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's resettable peak RSS")
    from llama3_jax.convert.native import JaxReader
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
                      intermediate_size=16384, max_seq_len=64, bos_id=1, eos_ids=(2,))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), checkpoint.abstract_params(cfg))
    checkpoint.save_params(tmp_path / "ckpt", cfg, jax.tree.map(jax.numpy.asarray, params))
    stacked = params["layers"]["w_gate"].nbytes
    tensors, growth = JaxReader(tmp_path / "ckpt").tensors(), []
    while True:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _memory()["VmRSS"]
        t = next(tensors, None)
        if t is None:
            break
        growth.append((_memory()["VmHWM"] - before, t.array.nbytes, t.name, t.layer))
        want = params["layers"][t.name[7:]][t.layer] if t.layer is not None else params[t.name]
        assert t.array.tobytes() == want.tobytes(), (t.name, t.layer)
        del t
    assert len(growth) == 3 + 9 * cfg.n_layers
    most = max(growth)
    largest = max(g[1] for g in growth)
    assert largest == stacked // cfg.n_layers  # one layer of w_gate / w_up / w_down
    # at most one tensor's stored bytes, its decoded chunk and the tensor; the stacked array is 8 tensors
    assert most[0] <= 3 * largest + (1 << 20) < stacked / 2, (most, stacked)
