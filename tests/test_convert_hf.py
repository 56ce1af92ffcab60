"""HF <-> jax conversion: bit-exact round trips, sharded files, dtypes, and bad inputs."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_hf_llama
from llama3_jax.store import checkpoint
from llama3_jax import cli
from llama3_jax.convert import ConvertError, convert


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tie", [False, True])
def test_hf_jax_hf_bit_exact_with_sharded_output(tmp_path, tie):
    hf = make_hf_llama(tmp_path / "hf", tie=tie)
    convert(tmp_path / "hf", tmp_path / "jax", src_format="hf", dst_format="jax", progress=False)
    convert(tmp_path / "jax", tmp_path / "hf2", src_format="jax", dst_format="hf", progress=False,
            max_shard_size="30KiB")
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    _assert_same_state(hf, back)
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie and cfg["rope_scaling"]["factor"] == 8.0
    assert json.loads((tmp_path / "hf2" / "generation_config.json").read_text())["eos_token_id"] == [2]


def test_sharded_safetensors_input_and_bfloat16_kept(tmp_path):
    hf = make_hf_llama(None, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg = convert(tmp_path / "hf", tmp_path / "jax", src_format="hf", dst_format="jax", progress=False)
    assert cfg.param_dtype == "bfloat16"
    _, params = checkpoint.restore_params(tmp_path / "jax")
    assert str(params["embed"].dtype) == "bfloat16"
    convert(tmp_path / "jax", tmp_path / "hf2", src_format="jax", dst_format="hf", progress=False)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.bfloat16)
    _assert_same_state(hf, back)


def test_dtype_option_casts(tmp_path):
    hf = make_hf_llama(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "hf16", src_format="hf", dst_format="hf", dtype="bfloat16", progress=False)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf16", dtype=torch.bfloat16)
    ref = hf.to(torch.bfloat16)
    _assert_same_state(ref, back)


def test_transformers_v4_config_form_reads_the_same(tmp_path):
    from llama3_jax.model.config import from_hf_config, to_hf_config

    make_hf_llama(tmp_path / "hf")
    v5 = json.loads((tmp_path / "hf" / "config.json").read_text())
    v4 = dict(v5)
    rope = dict(v4.pop("rope_parameters"))
    v4 |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    assert from_hf_config(v4) == from_hf_config(v5)
    assert from_hf_config(to_hf_config(from_hf_config(v5))) == from_hf_config(v5)
    # Llama 3.0 style: rope_scaling null
    v3 = dict(v4, rope_scaling=None)
    assert from_hf_config(v3).rope_scaling is None


def _bad(tmp_path, mutate):
    make_hf_llama(tmp_path / "hf")
    mutate(tmp_path / "hf")
    with pytest.raises(ConvertError) as e:
        convert(tmp_path / "hf", tmp_path / "out", src_format="hf", dst_format="jax", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp dir left behind
    return str(e.value)


def _rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_truncated_file_names_the_file(tmp_path):
    def cut(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = _bad(tmp_path, cut)
    assert "model.safetensors" in msg and "truncated" in msg


def test_missing_tensor_named(tmp_path):
    msg = _bad(tmp_path, lambda d: _rewrite_safetensors(
        d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")))
    assert "model.layers.1.mlp.up_proj.weight" in msg


def test_extra_tensor_named(tmp_path):
    msg = _bad(tmp_path, lambda d: _rewrite_safetensors(
        d / "model.safetensors", lambda t: t.__setitem__("model.layers.9.bogus.weight", torch.zeros(3))))
    assert "model.layers.9.bogus.weight" in msg


def test_transposed_projection_is_refused_though_its_size_matches(tmp_path):
    """k_proj (kv_heads * head_dim, dim) = (20, 40) stored as (40, 20): same element count, wrong shape."""
    name = "model.layers.1.self_attn.k_proj.weight"

    def transpose(t):
        assert t[name].shape[0] != t[name].shape[1]
        t[name] = t[name].T.contiguous()
    msg = _bad(tmp_path, lambda d: _rewrite_safetensors(d / "model.safetensors", transpose))
    assert "model.safetensors" in msg and name in msg and "(40, 20)" in msg and "(20, 40)" in msg
    assert len(msg.splitlines()) == 1


def test_config_disagreeing_with_weights_named(tmp_path):
    def widen(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 80
        (d / "config.json").write_text(json.dumps(cfg))
    msg = _bad(tmp_path, widen)
    assert "mlp.gate_proj.weight" in msg or "mlp.up_proj.weight" in msg or "mlp.down_proj.weight" in msg


def test_missing_config_and_unknown_format(tmp_path):
    msg = _bad(tmp_path, lambda d: (d / "config.json").unlink())
    assert "config.json" in msg
    with pytest.raises(ConvertError, match="unknown format"):
        convert(tmp_path / "hf", tmp_path / "o", src_format="gguf", dst_format="jax")


def test_cli_reports_one_line_and_exits_nonzero(tmp_path, capsys):
    make_hf_llama(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00\x01")
    capsys.readouterr()
    rc = cli.main(["convert", "--from", "hf", "--to", "jax", str(tmp_path / "hf"), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.safetensors" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "exists").mkdir()
    assert cli.main(["convert", "--from", "hf", "--to", "jax", str(tmp_path / "hf"), str(tmp_path / "exists")]) == 2


@pytest.mark.parametrize("to, flags, says", [
    ("meta", ["--max-shard-size", "5GB"], "--max-shard-size applies only to --to hf"),
    ("jax", ["--max-shard-size", "5GB"], "--max-shard-size applies only to --to hf"),
    ("hf", ["--shards", "2"], "--shards applies only to --to meta"),
    ("jax", ["--shards", "1"], "--shards applies only to --to meta"),
    ("hf", ["--max-shard-size", "abc"], "--max-shard-size 'abc': not a size"),
    ("hf", ["--max-shard-size", "5XB"], "--max-shard-size '5XB': not a size"),
    ("hf", ["--max-shard-size", "0"], "--max-shard-size '0': must be at least 1 byte"),
])
def test_cli_refuses_options_that_do_not_apply_in_one_line(tmp_path, capsys, to, flags, says):
    (tmp_path / "src").mkdir()
    rc = cli.main(["convert", "--from", "jax", "--to", to, str(tmp_path / "src"), str(tmp_path / "dst"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "dst").exists()


def test_shard_sizes_read_as_transformers_reads_them():
    from transformers.utils.hub import convert_file_size_to_int
    from llama3_jax.convert.core import parse_size
    for text in ["5GB", "500MB", "5GiB", "30KB", "30KiB", "2mib", "5Gb", "500mb", 1000]:
        assert parse_size(text, "--max-shard-size") == convert_file_size_to_int(text), text
    assert parse_size("1000", "--max-shard-size") == 1000  # a plain number is bytes


def test_cli_converts_and_reports_summary(tmp_path, capsys):
    hf = make_hf_llama(tmp_path / "hf")
    assert cli.main(["convert", "--from", "hf", "--to", "jax", str(tmp_path / "hf"), str(tmp_path / "j")]) == 0
    assert "converted" in capsys.readouterr().err
    assert cli.main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "j"), str(tmp_path / "h")]) == 0
    _assert_same_state(hf, AutoModelForCausalLM.from_pretrained(tmp_path / "h"))
    np.testing.assert_equal(checkpoint.latest_step(tmp_path / "j"), 0)


def test_inspect_checkpoint_tool_lists_every_parameter(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    make_hf_llama(tmp_path / "hf", tie=True)
    convert(tmp_path / "hf", tmp_path / "j", src_format="hf", dst_format="jax", progress=False)
    tool = Path(__file__).resolve().parent.parent / "tools" / "inspect_checkpoint.py"
    out = subprocess.run([sys.executable, str(tool), str(tmp_path / "j")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr, out.stderr  # e.g. absl's "Metadata file does not exist"
    _, params = checkpoint.restore_params(tmp_path / "j")
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()[-len(
        jax_leaves(params)):]}
    for name, array in jax_leaves(params).items():
        assert listed[name].startswith(str(tuple(array.shape))), name
    assert "lm_head" not in listed and "tie_embeddings: True" in out.stdout
    bad = subprocess.run([sys.executable, str(tool), str(tmp_path / "hf")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a llama3-jax config" in bad.stderr


def jax_leaves(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out |= jax_leaves(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out
