"""Hostile and absurd files: refused with the file and key/tensor named, before any big allocation,
and without running anything they contain.

  * a `.pth` whose pickle would run code: torch.load(weights_only=True) refuses it, the code never
    runs (the same file with weights_only=False does run it: the payload is live);
  * safetensors headers: a huge declared header length, overlapping offsets, offsets past the data,
    dtype x shape disagreeing with the byte count;
  * config.json sizes that would allocate absurd memory (vocab 10^12), NaN/inf/negative values;
  * index files naming shards outside the checkpoint directory;
  * run configs (YAML file or overrides) with NaN/inf, negative sizes, wrong types.
Peak Python allocation while refusing is measured with tracemalloc: well under the declared sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest

from llama3_jax import cli
from llama3_jax.convert import convert
from llama3_jax.convert.core import ConvertError

from conftest import make_hf_llama

torch = pytest.importorskip("torch")
SMALL_PEAK = 20 << 20  # bytes: the tiny model itself is ~100 KB; a hostile header declares terabytes


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "model"
    make_hf_llama(d, layers=1)
    return d


def refused(src, fmt="hf", match=None) -> str:
    """Convert `src` to jax; it must fail with ConvertError, allocating little; returns the message."""
    tracemalloc.start()
    try:
        with pytest.raises(ConvertError) as e:
            convert(src, src.parent / "out", src_format=fmt, dst_format="jax", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < SMALL_PEAK, f"{peak} bytes allocated while refusing"
    assert not (src.parent / "out").exists()
    msg = str(e.value)
    if match:
        assert match in msg, msg
    return msg


def copy_model(hf_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(hf_dir, d)
    return d


def rewrite_header(path: Path, edit) -> None:
    """Re-serialize a safetensors file with `edit(header)` applied (the data bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


NORM0, NORM1 = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"


# ---------------------------------------------------------------------------------------- pickles


class RunsCode:
    """Unpickling this calls os.system: what a malicious .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pth_that_would_run_code_is_refused_and_never_runs(tmp_path):
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps({"dim": 40, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                                                 "vocab_size": 211, "multiple_of": 8, "norm_eps": 1e-5,
                                                 "rope_theta": 500000.0}))
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": RunsCode(marker)}, src / "consolidated.00.pth")
    msg = refused(src, "meta", match="consolidated.00.pth: cannot load")
    assert "weights_only" in msg.lower() or "unpickl" in msg.lower() or "unsupported" in msg.lower(), msg
    assert not marker.exists(), "the pickle ran code"
    torch.load(src / "consolidated.00.pth", weights_only=False)  # the control: this one runs it
    assert marker.exists()


# ----------------------------------------------------------------------------------- safetensors


def test_a_huge_declared_header_is_refused_before_reading_it(hf_dir, tmp_path):
    d = copy_model(hf_dir, tmp_path)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])  # 1 TB of header declared
    refused(d, match="model.safetensors: safetensors header of 1099511627776 bytes declared")


def test_overlapping_offsets_are_refused(hf_dir, tmp_path):
    d = copy_model(hf_dir, tmp_path)
    rewrite_header(d / "model.safetensors", lambda h: h[NORM1].update(data_offsets=h[NORM0]["data_offsets"]))
    msg = refused(d, match="overlap")
    assert NORM0 in msg and NORM1 in msg


def test_offsets_past_the_data_are_refused(hf_dir, tmp_path):
    d = copy_model(hf_dir, tmp_path)

    def far(h):
        b, e = h[NORM0]["data_offsets"]
        h[NORM0]["data_offsets"] = [b + 10**12, e + 10**12]
    rewrite_header(d / "model.safetensors", far)
    refused(d, match=f"tensor {NORM0}: data_offsets [")


def test_dtype_and_shape_disagreeing_with_the_byte_count_are_refused(hf_dir, tmp_path):
    d = copy_model(hf_dir, tmp_path)
    rewrite_header(d / "model.safetensors", lambda h: h[NORM0].update(shape=[10**6, 10**6]))
    refused(d, match=f"tensor {NORM0}: F32 [1000000, 1000000] needs 4000000000000 bytes")
    rewrite_header(d / "model.safetensors", lambda h: h[NORM0].update(shape=[40], dtype="F64"))
    refused(d, match=f"tensor {NORM0}: F64 [40] needs 320 bytes")


def test_index_entries_outside_the_directory_are_refused(hf_dir, tmp_path):
    for target in ("../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"):
        d = copy_model(hf_dir, tmp_path / target.replace("/", "_"))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {NORM0: target}}))
        refused(d, match=f"{target!r} points outside")


# ------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("key,value,named", [
    ("vocab_size", 10**12, "vocab_size=1000000000000"),
    ("hidden_size", -40, "dim=-40"),
    ("num_hidden_layers", "2", "n_layers='2'"),
    ("rms_norm_eps", float("nan"), "norm_eps=nan"),
    ("rope_theta", float("inf"), "rope_theta=inf"),
])
def test_absurd_config_json_values_are_refused_by_key(hf_dir, tmp_path, key, value, named):
    d = copy_model(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    cfg.pop("rope_parameters", None) if key == "rope_theta" else None
    (d / "config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity, as Python's reader accepts
    msg = refused(d, match=named)
    assert str(d / "config.json") in msg


# ------------------------------------------------------------------------------------- run configs


@pytest.mark.parametrize("override,named", [
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("optim.lr=.inf", "optim.lr: expected a finite number"),
    ("batch_size=-8", "batch_size must be >= 1"),
    ("steps=ten", "steps: expected int"),
    ("model={preset: tiny, vocab_size: 1000000000000}", "vocab_size=1000000000000"),
    ("model={preset: test-small, dim: 0}", "dim=0"),
    ("data.eval_fraction=.nan", "data.eval_fraction: expected a finite number"),
])
def test_bad_run_config_values_are_refused_by_key(override, named, tmp_path, capsys):
    assert cli.main(["train", f"workdir={tmp_path / 'wd'}", "tokenizer=bytes", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "wd").exists()


def test_a_yaml_file_with_nan_names_the_key(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 3\noptim:\n  weight_decay: .inf\n")
    assert cli.main(["train", "--config", str(f)]) == 2
    assert "optim.weight_decay: expected a finite number, got inf" in capsys.readouterr().err
