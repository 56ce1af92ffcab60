"""PEFT adapter files in and out (convert/peft.py), against peft 0.21.2 itself.

Out: `--to peft` of a LoRA trained on a `convert --from hf` checkpoint loads with
`AutoPeftModelForCausalLM.from_pretrained(dir)` alone (the base is the transformers model the checkpoint
was converted from, recorded as config.json `source`) and gives the logits of the merged `--to hf`
export; adapter_config.json is exactly what peft writes for those settings (every key);
`--base-model-name` overrides the base; a base that records no source is a one-line error; a hub cache
snapshot is recorded by hub name and revision.

In: every bad adapter_config.json (r 0 or not an integer, wrong types, settings we do not implement,
target modules that are not Llama projections or only some layers) and every hostile
adapter_model.safetensors (truncated, absurd header, overlapping offsets, integer tensors, tensors the
config does not adapt) is a one-line error naming the file and the key or tensor, exit status 2, no
output; a config without `lora_alpha` imports with peft's default (8), giving peft's own logits.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from llama3_jax import cli
from llama3_jax.convert import convert
from llama3_jax.convert import peft as ours
from llama3_jax.model import lora
from llama3_jax.store import checkpoint

from conftest import make_hf_llama

peft = pytest.importorskip("peft")

TOKENS = np.random.default_rng(7).integers(0, 211, size=(2, 11))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKENS)).logits.float().numpy()


def hf_logits(path: Path) -> np.ndarray:
    from transformers import LlamaForCausalLM
    return torch_logits(LlamaForCausalLM.from_pretrained(path))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """d/hf (a tiny transformers model), d/jax (it, converted with `convert --from hf`)."""
    d = tmp_path_factory.mktemp("peft_io")
    make_hf_llama(d / "hf")
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return d


def lora_workdir(path: Path, base_ckpt: Path) -> Path:
    """A LoRA checkpoint as training leaves it (config.json `lora` record on `base_ckpt` + the adapters
    as `params`), with B random so the adapters change the model."""
    cfg = checkpoint.load_config(base_ckpt)
    lc = lora.LoraConfig(rank=3, alpha=5.0, targets=("wq", "wv", "w_down"))
    adapters = lora.init(cfg, lc, jax.random.key(0))
    for i, ab in enumerate(adapters["layers"].values()):
        ab["b"] = 0.3 * jax.random.normal(jax.random.key(i + 1), ab["b"].shape)
    checkpoint.save_params(path, cfg, adapters, lora_record=lora.config_record(lc, str(base_ckpt.absolute())))
    return path


@pytest.fixture(scope="module")
def workdir(base, tmp_path_factory) -> Path:
    return lora_workdir(tmp_path_factory.mktemp("peft_io_run") / "run", base / "jax")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """An adapter made by peft itself (B random) on the transformers base."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(3)
    model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base / "hf"), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("peft_io_adapter") / "adapter"
    model.save_pretrained(path)
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------- export

def test_source_is_recorded_by_convert_from_hf(base):
    recorded = json.loads((base / "jax" / "config.json").read_text())["source"]
    assert recorded == {"format": "hf", "name_or_path": str((base / "hf").resolve()), "revision": None}


def test_export_loads_with_auto_peft_model_and_gives_the_merged_export(base, workdir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(workdir), str(out)]) == 0
    assert cli.main(["convert", "--from", "jax", "--to", "hf", str(workdir), str(merged), "--quiet"]) == 0
    loaded = torch_logits(AutoPeftModelForCausalLM.from_pretrained(out))  # no base given: the config's
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str((base / "hf").resolve())
    expected = hf_logits(merged)
    assert np.abs(expected - hf_logits(base / "hf")).max() > 1e-2  # the adapters change the model
    np.testing.assert_allclose(loaded, expected, atol=1e-5, rtol=1e-5)


def test_adapter_config_is_what_peft_writes(base, workdir, tmp_path):
    """Every key and value that peft 0.21.2's LoraConfig writes for the same settings."""
    out = tmp_path / "adapter"
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(workdir), str(out)]) == 0
    written = json.loads((out / "adapter_config.json").read_text())
    made = peft.LoraConfig(r=3, lora_alpha=5.0, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                           task_type="CAUSAL_LM", inference_mode=True,
                           base_model_name_or_path=str((base / "hf").resolve()))
    made.save_pretrained(tmp_path / "by_peft")
    by_peft = json.loads((tmp_path / "by_peft" / "adapter_config.json").read_text())
    assert set(written) == set(by_peft), set(written) ^ set(by_peft)
    assert len(written) == 41 and written["peft_version"] == peft.__version__ == ours.PEFT_VERSION
    assert set(written.pop("target_modules")) == set(by_peft.pop("target_modules"))  # peft writes a set
    assert written == by_peft


def test_base_model_name_overrides_and_no_source_is_one_line(base, tmp_path, capsys):
    bare = tmp_path / "bare"  # a jax base that records no source (converted before it was recorded)
    shutil.copytree(base / "jax", bare)
    config = json.loads((bare / "config.json").read_text())
    del config["source"]
    (bare / "config.json").write_text(json.dumps(config))
    run = lora_workdir(tmp_path / "run", bare)
    err = one_line_error(capsys, ["convert", "--from", "jax", "--to", "peft", str(run), str(tmp_path / "a")])
    assert str(bare / "config.json") in err and "--base-model-name" in err, err
    assert not (tmp_path / "a").exists()
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(run), str(tmp_path / "b"),
                     "--base-model-name", "meta-llama/Llama-3.2-1B"]) == 0
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["revision"]) == ("meta-llama/Llama-3.2-1B", None)
    err = one_line_error(capsys, ["convert", "--from", "jax", "--to", "hf", str(run), str(tmp_path / "c"),
                                  "--base-model-name", "x"])
    assert "--base-model-name applies only to --to peft" in err


def test_a_hub_cache_snapshot_is_recorded_by_hub_name_and_revision(tmp_path):
    from llama3_jax.convert.hf import hf_source
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "4e20de362430cd3b72f300e6b0f"
    snapshot.mkdir(parents=True)
    assert hf_source(snapshot) == {"format": "hf", "name_or_path": "meta-llama/Llama-3.2-1B",
                                   "revision": "4e20de362430cd3b72f300e6b0f"}
    assert hf_source(tmp_path / "hub")["name_or_path"] == str((tmp_path / "hub").resolve())


def test_kept_adapters_on_a_transformers_base_export_onto_it(base, adapter, tmp_path):
    """--keep-adapters converts the hf base beside the adapters (recording it as source), so the
    adapters export back onto the transformers directory, loadable with AutoPeftModelForCausalLM."""
    from peft import AutoPeftModelForCausalLM
    kept, back = tmp_path / "kept", tmp_path / "back"
    assert cli.main(["convert", "--from", "peft", "--to", "jax", str(adapter), str(kept), "--base",
                     str(base / "hf"), "--keep-adapters", "--quiet"]) == 0
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(kept), str(back)]) == 0
    written = json.loads((back / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str((base / "hf").resolve())
    np.testing.assert_allclose(torch_logits(AutoPeftModelForCausalLM.from_pretrained(back)),
                               torch_logits(AutoPeftModelForCausalLM.from_pretrained(adapter)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- import

def edited_adapter(adapter: Path, dst: Path, **changes) -> Path:
    """A copy of `adapter` whose adapter_config.json has `changes` (a value of ... deletes the key)."""
    shutil.copytree(adapter, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def import_argv(adapter: Path, out: Path, base: Path) -> list[str]:
    return ["convert", "--from", "peft", "--to", "hf", str(adapter), str(out), "--base", str(base / "hf"), "--quiet"]


BAD_CONFIGS = [
    ("r", 0), ("r", "4"), ("r", 2.5), ("r", True), ("r", None), ("lora_alpha", "16"), ("lora_alpha", float("nan")),
    ("lora_alpha", None), ("lora_dropout", 1.5), ("lora_dropout", "0.1"), ("use_rslora", "yes"),
    ("target_modules", 5), ("target_modules", []), ("target_modules", ["lm_head"]), ("target_modules", "(q_proj"),
    ("target_modules", ["layers.0.self_attn.q_proj"]), ("target_modules", r".*\.1\.self_attn\.q_proj"),
    ("peft_type", "IA3"), ("bias", "all"), ("use_dora", True), ("layers_to_transform", 0),
    ("modules_to_save", ["lm_head"]), ("exclude_modules", ["v_proj"]), ("lora_bias", True),
]


@pytest.mark.parametrize("key,value", BAD_CONFIGS, ids=[f"{k}={v!r}" for k, v in BAD_CONFIGS])
def test_a_bad_adapter_config_is_one_line_naming_file_and_key(base, adapter, tmp_path, capsys, key, value):
    bad = edited_adapter(adapter, tmp_path / "bad", **{key: value})
    err = one_line_error(capsys, import_argv(bad, tmp_path / "out", base))
    assert f"{bad / 'adapter_config.json'}: {key}" in err, err
    assert not (tmp_path / "out").exists()


def test_an_adapter_config_that_is_not_an_object_is_one_line(base, adapter, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    (bad / "adapter_config.json").write_text("[1, 2]")
    err = one_line_error(capsys, import_argv(bad, tmp_path / "out", base))
    assert str(bad / "adapter_config.json") in err and "JSON object" in err, err


def test_missing_lora_alpha_takes_peft_default(base, adapter, tmp_path):
    from transformers import LlamaForCausalLM
    plain = edited_adapter(adapter, tmp_path / "plain", lora_alpha=...)
    assert cli.main(import_argv(plain, tmp_path / "merged", base)) == 0
    by_peft = torch_logits(peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base / "hf"), plain))
    assert np.abs(by_peft - torch_logits(peft.AutoPeftModelForCausalLM.from_pretrained(adapter))).max() > 1e-3
    np.testing.assert_allclose(hf_logits(tmp_path / "merged"), by_peft, atol=1e-5, rtol=1e-5)


def safetensors_bytes(header: dict, data: bytes, declared: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def hostile_files(adapter: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (adapter_model.safetensors bytes, what the error must say), from the real adapter's."""
    from safetensors.numpy import load_file
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    header, blob, offset = {}, b"", 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blob, offset = blob + b, offset + len(b)
    first, second, last = list(header)[0], list(header)[1], list(header)[-1]
    overlap = json.loads(json.dumps(header))
    overlap[second]["data_offsets"] = [o - 4 for o in overlap[second]["data_offsets"]]
    ints = json.loads(json.dumps(header))
    ints[first]["dtype"] = "I32"
    extra_name = first.replace("q_proj", "k_proj")  # a module target_modules does not adapt
    extra = json.loads(json.dumps(header)) | {extra_name: {**header[first], "data_offsets": [offset, offset + len(
        blob[slice(*header[first]["data_offsets"])])]}}
    return {
        "empty": (b"", "truncated"),
        "truncated": (safetensors_bytes(header, blob)[:-100], "past the end"),
        "absurd header": (safetensors_bytes(header, blob, declared=2**62), "refusing to read"),
        "overlap": (safetensors_bytes(overlap, blob), "overlap"),
        "integer tensor": (safetensors_bytes(ints, blob), f"{first} has dtype I32"),
        "extra tensor": (safetensors_bytes(extra, blob + blob[slice(*header[first]["data_offsets"])]),
                         f"unexpected tensor {extra_name}"),
        "missing tensor": (safetensors_bytes({k: v for k, v in header.items() if k != last},
                                             blob[:header[last]["data_offsets"][0]]), f"missing tensor {last}"),
    }


HOSTILE = ["empty", "truncated", "absurd header", "overlap", "integer tensor", "extra tensor", "missing tensor"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_adapter_weights_are_one_line_naming_file_and_tensor(base, adapter, tmp_path, capsys, case):
    content, says = hostile_files(adapter)[case]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    (bad / "adapter_model.safetensors").write_bytes(content)
    err = one_line_error(capsys, import_argv(bad, tmp_path / "out", base))
    assert str(bad / "adapter_model.safetensors") in err and says in err, err
    assert not (tmp_path / "out").exists()
