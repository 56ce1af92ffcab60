"""`init_from` and `generate`/`score --checkpoint` naming a Hugging Face (or Meta) directory: converted
on the fly onto the run's mesh (convert/load.py), with exactly the results of the same directory run
through `convert --to jax` first, and nothing written into the source or anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llama3_jax import cli, train
from llama3_jax.config_loader import load_yaml_config
from llama3_jax.convert import convert
from llama3_jax.serve import restore
from llama3_jax.store import checkpoint

from conftest import make_hf_llama
from train_helpers import VOCAB, base_overrides, train_losses, write_corpus

REPO = Path(__file__).resolve().parent.parent
CONVERTED = {"hf": "jax", "meta": "meta_jax"}  # each source and its `convert --to jax` output


class _Load:
    """convert/load.py, imported on first use (so that each test fails on its own where it is absent)."""

    def __getattr__(self, name):
        from llama3_jax.convert import load as module
        return getattr(module, name)


load = _Load()


def snapshot(root: Path) -> dict:
    """Every file under `root`: (size, sha256); and the directories."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{hf, meta, jax, meta_jax}: a tiny random transformers Llama (float32, untied, GQA), the same in
    Meta's layout, each converted to ours; the corpus; and snapshots of the sources taken first."""
    d = tmp_path_factory.mktemp("src")
    make_hf_llama(d / "hf", vocab=VOCAB)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    convert(d / "hf", d / "meta", src_format="hf", dst_format="meta", progress=False)
    convert(d / "meta", d / "meta_jax", src_format="meta", dst_format="jax", progress=False)
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")
    before = {k: snapshot(d / k) for k in ("hf", "meta")}
    yield {"hf": d / "hf", "meta": d / "meta", "jax": d / "jax", "meta_jax": d / "meta_jax", "corpus": corpus}
    # (d) nothing was written into the sources, and no converted copy appeared beside them
    assert {k: snapshot(d / k) for k in ("hf", "meta")} == before
    assert sorted(p.name for p in d.iterdir()) == ["hf", "jax", "meta", "meta_jax"]


def flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same(a: dict, b: dict) -> None:
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def run_train(workdir: Path, corpus: Path, init_from: Path, **extra) -> tuple[dict, dict]:
    kv = dict(steps=2, eval_every=0, checkpoint_every=2, **extra)
    cfg = load_yaml_config(train.TrainConfig, None, base_overrides(workdir, corpus, init_from, **kv))
    train.train(cfg)
    _, params = load.restore_params_any(workdir)
    return train_losses(workdir), params


def test_formats_are_recognised_and_configs_equal_the_converted_ones(dirs):
    assert load.is_hf_dir(dirs["hf"]) and not load.is_meta_dir(dirs["hf"])
    assert load.is_meta_dir(dirs["meta"]) and not load.is_hf_dir(dirs["meta"])
    assert not load.is_hf_dir(dirs["jax"]) and not load.is_meta_dir(dirs["jax"])
    for kind in ("hf", "meta"):  # (params.json has no bos/eos ids: Meta's gets Llama 3's, as convert does)
        assert load.model_config_of(dirs[kind]) == checkpoint.load_config(dirs[CONVERTED[kind]])
    assert load.model_config_of(dirs["jax"]) == checkpoint.load_config(dirs["jax"])


@pytest.mark.parametrize("kind", ["hf", "meta"])
def test_streamed_params_equal_the_converted_checkpoints_bit_for_bit(dirs, kind):
    """(c) a Meta directory reads like the HF one; in float32 and cast to bfloat16 on the way."""
    import dataclasses
    cfg = checkpoint.load_config(dirs[CONVERTED[kind]])
    for dtype in ("float32", "bfloat16"):
        c = dataclasses.replace(cfg, param_dtype=dtype)
        _, want = checkpoint.restore_params(dirs[CONVERTED[kind]], cfg=c)
        got_cfg, got = load.restore_params_any(dirs[kind], cfg=c)
        assert got_cfg == c
        assert_same(got, want)


def test_train_from_an_hf_directory_equals_train_from_its_conversion(dirs, tmp_path):
    """(a) `init_from` an HF directory: the same losses and trained weights as from the converted one
    (on 1 device; 8 devices: test_streamed_params_land_on_a_sharded_mesh...); the workdir records
    the run's tokenizer as usual."""
    losses_hf, params_hf = run_train(tmp_path / "hf", dirs["corpus"], dirs["hf"])
    losses_jax, params_jax = run_train(tmp_path / "jax", dirs["corpus"], dirs["jax"])
    assert losses_hf == losses_jax and sorted(losses_hf) == [1, 2]
    assert_same(params_hf, params_jax)
    assert checkpoint.load_tokenizer_spec(tmp_path / "hf") == "bytes"
    assert checkpoint.load_config(tmp_path / "hf") == checkpoint.load_config(tmp_path / "jax")


def test_lora_on_an_hf_base_trains_and_reads_merged_like_on_its_conversion(dirs, tmp_path):
    """`lora.rank` with init_from an HF directory: the base streamed (and streamed again for the
    workdir's merged model, as generate reads it), the same losses and merged weights as on the
    converted base."""
    losses_hf, _ = run_train(tmp_path / "hf", dirs["corpus"], dirs["hf"], **{"lora.rank": 2})
    losses_jax, _ = run_train(tmp_path / "jax", dirs["corpus"], dirs["jax"], **{"lora.rank": 2})
    assert losses_hf == losses_jax
    cfg = checkpoint.load_config(tmp_path / "jax")
    _, merged_hf = load.restore_params_any(tmp_path / "hf", cfg=cfg)
    _, merged_jax = checkpoint.restore_params(tmp_path / "jax", cfg=cfg)
    assert_same(merged_hf, merged_jax)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_from_an_hf_directory_equals_the_converted_checkpoint(dirs, tmp_path):
    """(b) `generate --checkpoint` an HF directory: the same tokens (`score` restores through the same
    restore.load_params; a Meta directory through the same restore_params_any: params compared above)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "tokens": [1, 5 + i, 40, 7 * i + 3]}) + "\n" for i in range(3)))
    results = {}
    for name in ("hf", "jax"):
        out = tmp_path / f"{name}.jsonl"
        assert cli.main(["generate", "--checkpoint", str(dirs[name]), "--tokenizer", "bytes", "--input", str(inp),
                         "--output", str(out), "--max-new-tokens", "6", "--ignore-eos"]) == 0
        results[name] = sorted(read_jsonl(out), key=lambda r: r["id"])
    assert results["hf"] == results["jax"]
    assert [len(r["tokens"]) for r in results["hf"]] == [6, 6, 6]


def test_the_python_api_reads_a_source_directory_as_generate_does(dirs):
    """serve/restore.py (what a Python `Generator` and `generate`/`score` restore through) reads an HF
    or Meta directory itself: the same config and bit-identical params as its conversion."""
    for kind in ("hf", "meta"):
        want_cfg, want, _ = restore.load_params(dirs[CONVERTED[kind]], "float32", None, None, None, None, False)
        cfg, got, _ = restore.load_params(dirs[kind], "float32", None, None, None, None, False)
        assert cfg == want_cfg, kind
        assert_same(got, want)


def test_a_bad_source_directory_is_one_line_naming_file_and_tensor(dirs, tmp_path):
    """A shape that is not the run's model: the reader's/stream's one-line error, nothing placed."""
    import dataclasses
    cfg = dataclasses.replace(checkpoint.load_config(dirs["jax"]), intermediate_size=80)
    with pytest.raises(ValueError, match=r"mlp\.(down|gate|up)_proj\.weight") as e:
        load.restore_params_any(dirs["hf"], cfg=cfg)
    assert "\n" not in str(e.value)


SHARDED = """
import sys, dataclasses, jax, numpy as np
from llama3_jax.convert import load
from llama3_jax.store import checkpoint
from llama3_jax.parallel.sharding import make_mesh
assert jax.device_count() == 8
hf, meta, conv = sys.argv[1:4]
mesh = make_mesh(2, 2, 2)
cfg = dataclasses.replace(checkpoint.load_config(conv), param_dtype="float32")
target = checkpoint.abstract_params(cfg, mesh)
_, want = checkpoint.restore_params(conv, mesh, cfg=cfg)
for src in (hf, meta):
    _, got = load.restore_params_any(src, mesh, cfg=cfg)
    for g, w, t in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(target)):
        assert g.sharding == t.sharding, (g.sharding, t.sharding)
        assert np.array_equal(np.asarray(g), np.asarray(w))
print("ok")
"""


def test_streamed_params_land_on_a_sharded_mesh_equal_to_the_converted_ones(dirs):
    """(a, 8 fake devices) data=2, fsdp=2, tensor=2: every array with its target sharding, bit for bit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(dirs["hf"]), str(dirs["meta"]), str(dirs["jax"])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
