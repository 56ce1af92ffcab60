"""LoRA (lora.py, convert/peft.py): zero-init adapters give the base's logits; after a few LoRA SFT
steps the JAX LoRA forward == the merged model in JAX == the `--to hf` export in transformers == the
`--to peft` export loaded by peft onto the transformers base; an adapter made by peft imports merged
and gives peft's logits; a LoRA workdir whose base is gone is a one-line error naming the path."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama3_jax import checkpoint, cli, lora, train
from llama3_jax.config import load_yaml_config
from llama3_jax.convert import convert
from llama3_jax.model import Adapters, abstract_model
from llama3_jax.sharding import make_mesh

from conftest import make_hf_llama
from train_helpers import VOCAB, base_overrides, read_metrics, train_losses

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0
DIALOGS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."},
            {"role": "assistant", "content": f"{w}!"}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": f"{w} {w}."}] for w in "red green blue cyan pink gold".split()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_base")
    make_hf_llama(d / "hf", vocab=VOCAB)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return d


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in DIALOGS * 3))
    return path


def lora_overrides(workdir, chats, base, **extra) -> list[str]:
    kv = dict(objective="sft", steps=6, seq_len=96, batch_size=4, **{"lora.rank": RANK, "lora.alpha": ALPHA,
              "optim.lr": 2e-2, "data.eval_fraction": 0.0, "eval_every": 0, "checkpoint_every": 6})
    kv.update(extra)
    return base_overrides(workdir, chats, base / "jax", **kv)


def lora_cfg(workdir, chats, base, **extra):
    return load_yaml_config(train.TrainConfig, None, lora_overrides(workdir, chats, base, **extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, chats, base):
    wd = tmp_path_factory.mktemp("lora_run") / "run"
    summary = train.train(lora_cfg(wd, chats, base))
    assert summary["last_loss"] < summary["first_loss"]
    return wd


def tokens_batch():
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 261, size=(2, 13), dtype=np.int32)
    return tokens, np.tile(np.arange(13, dtype=np.int32), (2, 1)), np.ones((2, 13), np.int32)


def jax_logits(params, cfg, adapters=None):
    cfg = dataclasses.replace(cfg, dtype="float32")
    model = abstract_model(cfg)
    nnx.update(model, params)
    logits, _ = model(*tokens_batch(), lora=adapters)
    return np.asarray(logits)


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(tokens_batch()[0].astype(np.int64))).logits.float().numpy()


def test_zero_b_gives_the_base_logits(base):
    cfg, params = checkpoint.restore_params(base / "jax")
    lc = lora.LoraConfig(rank=RANK, alpha=ALPHA)
    adapters = lora.init(cfg, lc, jax.random.key(0))
    assert all(float(jnp.abs(ab["b"]).max()) == 0 and float(jnp.abs(ab["a"]).max()) > 0
               for ab in adapters["layers"].values())
    np.testing.assert_array_equal(jax_logits(params, cfg, Adapters(adapters["layers"], lc.scale)),
                                  jax_logits(params, cfg))


def test_lora_workdir_trains_adapters_only(trained, chats, base):
    cfg = lora_cfg(trained, chats, base)
    setup = train.build(cfg, train.model_config(cfg, trained), make_mesh(1, 1, 1))
    # trained: the adapters (float32) and their optimizer state; the base is frozen in the compute dtype
    assert set(setup.abstract["params"]["layers"]) == set(lora.TARGETS)
    assert {a.shape for a in jax.tree.leaves(setup.abstract["opt_state"]) if a.ndim} <= \
        {a.shape for a in jax.tree.leaves(setup.abstract["params"])}
    assert {a.dtype for a in jax.tree.leaves(setup.frozen_abstract["base"])} == {jnp.dtype(cfg.compute_dtype)}
    record = json.loads((trained / "config.json").read_text())["lora"]
    assert record == {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": list(lora.TARGETS),
                      "base": str((base / "jax").absolute())}


def test_merged_hf_and_peft_exports_equal_the_lora_forward(trained, base, tmp_path):
    cfg, base_params = checkpoint.restore_params(base / "jax")
    lc = lora.from_record(json.loads((trained / "config.json").read_text())["lora"])
    adapters = checkpoint.restore_adapters(trained, cfg, lc)
    assert min(float(jnp.abs(ab["b"]).max()) for ab in adapters["layers"].values()) > 1e-3  # really trained
    ours = jax_logits(base_params, cfg, Adapters(adapters["layers"], lc.scale))
    assert np.abs(ours - jax_logits(base_params, cfg)).max() > 1e-3  # the adapters change the model

    _, merged = checkpoint.restore_params(trained)  # what generate / score / init_from read
    np.testing.assert_allclose(jax_logits(merged, cfg), ours, atol=1e-5, rtol=1e-5)

    from transformers import LlamaForCausalLM
    assert cli.main(["convert", "--from", "jax", "--to", "hf", str(trained), str(tmp_path / "hf"), "--quiet"]) == 0
    np.testing.assert_allclose(torch_logits(LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()), ours,
                               atol=1e-5, rtol=1e-5)

    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(trained), str(tmp_path / "peft")]) == 0
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    hf_base = LlamaForCausalLM.from_pretrained(base / "hf").eval()
    with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    np.testing.assert_allclose(torch_logits(with_adapter), ours, atol=1e-5, rtol=1e-5)


def test_adapter_made_by_peft_imports_with_peft_logits(base, tmp_path):
    from transformers import LlamaForCausalLM
    torch.manual_seed(3)
    model = LlamaForCausalLM.from_pretrained(base / "hf").eval()
    made = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj",
                               "o_proj", "down_proj"], init_lora_weights=False)).eval()  # B random, not zero
    made.save_pretrained(tmp_path / "adapter")
    expected = torch_logits(made)
    assert np.abs(expected - torch_logits(LlamaForCausalLM.from_pretrained(base / "hf").eval())).max() > 1e-3
    for src_base in ("hf", "jax"):  # --base: a transformers or a llama3-jax checkpoint
        out = tmp_path / f"merged_{src_base}"
        assert cli.main(["convert", "--from", "peft", "--to", "jax", str(tmp_path / "adapter"), str(out),
                         "--base", str(base / src_base), "--quiet"]) == 0
        cfg, params = checkpoint.restore_params(out)
        np.testing.assert_allclose(jax_logits(params, cfg), expected, atol=1e-5, rtol=1e-5)


def test_missing_base_is_one_line_naming_the_path(trained, tmp_path, capsys):
    wd = tmp_path / "moved"
    shutil.copytree(trained, wd)
    config = json.loads((wd / "config.json").read_text())
    gone = tmp_path / "deleted-base"
    config["lora"]["base"] = str(gone)
    (wd / "config.json").write_text(json.dumps(config))
    assert cli.main(["convert", "--from", "jax", "--to", "hf", str(wd), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(gone) in err and "LoRA base" in err, err
    with pytest.raises(FileNotFoundError, match=str(gone)):
        checkpoint.restore_params(wd)


def test_sharded_lora_sft_gives_the_losses_of_one_device(trained, chats, base, tmp_path):
    """8 fake devices (data=2, fsdp=2, tensor=2), SFT with LoRA: the 1-device run's losses, and its
    checkpoint restores on 1 device and fsdp=4 (tests/train_helpers.py)."""
    cmd = [sys.executable, str(REPO / "tests" / "train_helpers.py"), str(tmp_path),
           *lora_overrides(tmp_path / "run", chats, base)]
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    sharded = {int(k): v for k, v in report["losses"].items()}
    single = train_losses(trained)
    assert sorted(sharded) == sorted(single) == list(range(1, 7))
    np.testing.assert_allclose([sharded[s] for s in single], list(single.values()), rtol=1e-4)
    assert report["restores"]["fsdp4"]["identical"] and report["restores"]["single"]["identical"]
    # the adapters follow the logical rules: A's embed dim over fsdp, B's heads over tensor
    specs = report["restores"]["mesh222"]["specs"]
    assert specs["['params']['layers']['wq']['a']"] == [None, "fsdp", None]
    assert specs["['params']['layers']['wq']['b']"] == [None, None, "tensor", None]


def _wait(proc, predicate, what, timeout=180):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run exited before {what}: {proc.stdout.read()[-2000:]}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigkill_and_rerun_give_bit_identical_sft_losses(chats, base, tmp_path):
    """LoRA SFT killed with SIGKILL after its first checkpoint, then the same command again: every
    step's loss equals the uninterrupted run's, bit for bit, each logged once."""
    steps = 80
    ref = tmp_path / "ref"
    train.train(lora_cfg(ref, chats, base, steps=steps, checkpoint_every=10))
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "llama3_jax.cli", "train",
           *lora_overrides(wd, chats, base, steps=steps, checkpoint_every=10)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(proc, lambda: wd.exists() and any(p.name.isdigit() for p in wd.iterdir()), "the first checkpoint")
    proc.kill()
    proc.wait()
    resumed_from = checkpoint.latest_step(wd)
    assert resumed_from is not None and resumed_from < steps, "the kill landed after the run finished"
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"resumed {wd} at step {resumed_from}" in done.stderr, done.stderr[-2000:]
    assert train_losses(wd) == train_losses(ref)


def test_dropout_acts_on_the_adapter_input_only_and_is_seeded(base):
    """lora.dropout: with B != 0 a dropout key changes the output, the same key gives the same output,
    and with B = 0 dropout cannot change anything (it only feeds the low-rank path)."""
    cfg, params = checkpoint.restore_params(base / "jax")
    lc = lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.5)
    ad = lora.init(cfg, lc, jax.random.key(0))
    key = jax.random.key(7)
    zero_b = [Adapters(ad["layers"], lc.scale, lc.dropout, k) for k in (None, key)]
    np.testing.assert_array_equal(*(jax_logits(params, cfg, a) for a in zero_b))
    trained = jax.tree.map(lambda x: x + 0.05, ad)
    outs = [jax_logits(params, cfg, Adapters(trained["layers"], lc.scale, lc.dropout, k)) for k in (None, key, key)]
    assert np.abs(outs[0] - outs[1]).max() > 1e-4
    np.testing.assert_array_equal(outs[1], outs[2])
