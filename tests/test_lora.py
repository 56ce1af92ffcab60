"""LoRA (lora.py, convert/peft.py): zero-init adapters give the base's logits; after a few LoRA SFT
steps the JAX LoRA forward == the merged model in JAX == the `--to hf` export in transformers == the
`--to peft` export loaded by peft onto the transformers base; an adapter made by peft imports merged
and gives peft's logits, or imports as adapters that training continues from and that export back to
peft; a LoRA workdir whose base is gone is a one-line error naming the path; LoRA and full SFT give the
1-device losses on 8 fake devices and bit-identical losses after a SIGKILL and rerun."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama3_jax.store import checkpoint
from llama3_jax import cli, train
from llama3_jax.model import lora
from llama3_jax.model.config import load_yaml_config
from llama3_jax.convert import convert
from llama3_jax.model.llama import Adapters, abstract_model
from llama3_jax.parallel.sharding import make_mesh

from conftest import make_hf_llama
from faults_helpers import cli as cli_cmd, train_killed_then_rerun
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


# full fine-tuning: the same run without adapters, at a learning rate suited to all the weights
FULL = {"lora.rank": 0, "optim.lr": 3e-3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, chats, base):
    wd = tmp_path_factory.mktemp("lora_run") / "run"
    summary = train.train(lora_cfg(wd, chats, base))
    assert summary["last_loss"] < summary["first_loss"]
    return wd


@pytest.fixture(scope="module")
def full_trained(tmp_path_factory, chats, base):
    wd = tmp_path_factory.mktemp("full_run") / "run"
    summary = train.train(lora_cfg(wd, chats, base, **FULL))
    assert summary["last_loss"] < summary["first_loss"]
    return wd


@pytest.fixture(scope="module")
def peft_adapter(base, tmp_path_factory):
    """An adapter made by peft itself (B random, not zero) on the transformers base: (dir, its logits)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(3)
    model = LlamaForCausalLM.from_pretrained(base / "hf").eval()
    made = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj",
                               "o_proj", "down_proj"], init_lora_weights=False)).eval()
    path = tmp_path_factory.mktemp("peft") / "adapter"
    made.save_pretrained(path)
    expected = torch_logits(made)
    assert np.abs(expected - torch_logits(LlamaForCausalLM.from_pretrained(base / "hf").eval())).max() > 1e-3
    return path, expected


def tokens_batch():
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 261, size=(2, 13), dtype=np.int32)
    return tokens, np.tile(np.arange(13, dtype=np.int32), (2, 1)), np.ones((2, 13), np.int32)


@functools.cache
def _logits_fn(cfg, scale, dropout):
    """One jitted forward per (model, LoRA scale, dropout): eager calls compile op by op, every time."""
    graphdef = nnx.graphdef(abstract_model(dataclasses.replace(cfg, dtype="float32")))

    def fn(params, weights, key, tokens, positions, segments):
        adapters = None if weights is None else Adapters(weights, scale, dropout, key)
        return nnx.merge(graphdef, params)(tokens, positions, segments, lora=adapters)[0]
    return jax.jit(fn)


def jax_logits(params, cfg, adapters=None):
    a = adapters or Adapters(None, 0.0)
    return np.asarray(_logits_fn(cfg, a.scale, a.dropout)(params, a.weights, a.key, *tokens_batch()))


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


def test_adapter_made_by_peft_imports_with_peft_logits(base, peft_adapter, tmp_path):
    adapter, expected = peft_adapter
    for src_base in ("hf", "jax"):  # --base: a transformers or a llama3-jax checkpoint
        out = tmp_path / f"merged_{src_base}"
        assert cli.main(["convert", "--from", "peft", "--to", "jax", str(adapter), str(out),
                         "--base", str(base / src_base), "--quiet"]) == 0
        assert "lora" not in json.loads((out / "config.json").read_text())  # the default merges
        cfg, params = checkpoint.restore_params(out)
        np.testing.assert_allclose(jax_logits(params, cfg), expected, atol=1e-5, rtol=1e-5)


def peft_first_batch_loss(model, batch) -> float:
    """Mean next-token loss of a packed SFT batch by the torch model, one packed dialog at a time (its
    own positions from 0, so no document mask is needed): the oracle for a train step's first loss."""
    total, count = 0.0, 0
    for r in range(batch["tokens"].shape[0]):
        for seg in set(batch["segment_ids"][r].tolist()) - {0}:
            at = batch["segment_ids"][r] == seg
            assert (batch["positions"][r][at] == np.arange(at.sum())).all()
            with torch.no_grad():
                logits = model(torch.tensor(batch["tokens"][r][at][None].astype(np.int64))).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()[np.arange(at.sum()), batch["targets"][r][at]]
            mask = batch["loss_mask"][r][at] == 1
            total, count = total - float(logp[mask].sum()), count + int(mask.sum())
    return total / count


def test_peft_adapter_imported_as_adapters_trains_on_and_exports_back(base, peft_adapter, chats, tmp_path):
    """--keep-adapters: a LoRA checkpoint (adapters + the converted base) that reads as peft's model;
    `lora.init_from` trains those adapters on (the first loss is the peft model's on that batch) and
    `--to peft` gives back an adapter peft loads, with the imported rank, alpha and modules."""
    from transformers import LlamaForCausalLM
    from llama3_jax.data import make_iterator
    adapter, expected = peft_adapter
    out = tmp_path / "imported"
    assert cli.main(["convert", "--from", "peft", "--to", "jax", str(adapter), str(out), "--base",
                     str(base / "hf"), "--keep-adapters", "--quiet"]) == 0
    record = json.loads((out / "config.json").read_text())["lora"]
    assert record == {"rank": 3, "alpha": 5.0, "dropout": 0.0, "targets": ["wq", "wv", "wo", "w_down"],
                      "base": str((out / "base").absolute())}
    cfg, merged = checkpoint.restore_params(out)  # what generate / score read
    np.testing.assert_allclose(jax_logits(merged, cfg), expected, atol=1e-5, rtol=1e-5)

    run = tmp_path / "run"
    overrides = base_overrides(run, chats, None, objective="sft", steps=2, seq_len=96, batch_size=4, eval_every=0,
                               **{"lora.init_from": str(out), "optim.lr": 2e-2, "data.eval_fraction": 0.0,
                                  "optim.warmup_steps": 0})
    tcfg = load_yaml_config(train.TrainConfig, None, [o for o in overrides if not o.startswith("model=")])
    train.train(tcfg)
    assert json.loads((run / "config.json").read_text())["lora"] == record  # the same adapters, trained on
    first = read_metrics(run)[0]
    with make_iterator(dataclasses.replace(tcfg.data, prefetch=0), tokenizer=train.ByteTokenizer(),
                       seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed, kind="sft") as it:
        batch = next(it)
    hf_base = LlamaForCausalLM.from_pretrained(base / "hf").eval()
    with_import = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
    np.testing.assert_allclose(first["loss"], peft_first_batch_loss(with_import, batch), rtol=1e-5)

    lc = lora.from_record(record)
    start, now = (checkpoint.restore_adapters(d, cfg, lc) for d in (out, run))
    assert min(float(jnp.abs(now["layers"][t]["b"] - start["layers"][t]["b"]).max()) for t in lc.targets) > 1e-4
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(run), str(tmp_path / "back")]) == 0
    exported = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    original = json.loads((adapter / "adapter_config.json").read_text())
    assert (exported["r"], exported["lora_alpha"]) == (original["r"], original["lora_alpha"])
    assert set(exported["target_modules"]) == set(original["target_modules"])
    _, trained_merged = checkpoint.restore_params(run)
    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base / "hf").eval(), tmp_path / "back")
    np.testing.assert_allclose(torch_logits(loaded.eval()), jax_logits(trained_merged, cfg), atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sharded_sft_gives_the_losses_of_one_device(kind, request, chats, base, tmp_path):
    """8 fake devices (data=2, fsdp=2, tensor=2), SFT with LoRA and full SFT: the 1-device run's losses,
    and its checkpoint restores on 1 device and fsdp=4 (tests/train_helpers.py)."""
    single = train_losses(request.getfixturevalue("trained" if kind == "lora" else "full_trained"))
    cmd = [sys.executable, str(REPO / "tests" / "train_helpers.py"), str(tmp_path),
           *lora_overrides(tmp_path / "run", chats, base, **(FULL if kind == "full" else {}))]
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    sharded = {int(k): v for k, v in report["losses"].items()}
    assert sorted(sharded) == sorted(single) == list(range(1, 7))
    np.testing.assert_allclose([sharded[s] for s in single], list(single.values()), rtol=1e-4)
    assert report["restores"]["fsdp4"]["identical"] and report["restores"]["single"]["identical"]
    specs = report["restores"]["mesh222"]["specs"]
    if kind == "lora":  # the adapters follow the logical rules: A's embed dim over fsdp, B's heads over tensor
        assert specs["['params']['layers']['wq']['a']"] == [None, "fsdp", None]
        assert specs["['params']['layers']['wq']['b']"] == [None, None, "tensor", None]
    else:  # full: the model's own weights, their AdamW moments sharded alike
        moments = [k for k in specs if k.startswith("['opt_state']") and k.endswith("['layers']['wq']")]
        assert moments and all(specs[k] == specs["['params']['layers']['wq']"] for k in moments)
        assert "tensor" in specs["['params']['layers']['wq']"]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sigkill_and_rerun_give_bit_identical_sft_losses(kind, request, chats, base, tmp_path):
    """SFT (LoRA, and full) killed with SIGKILL inside step 5 (after a checkpoint), then the same
    command again: every step's loss equals the uninterrupted run's (the module's 1-device run), bit
    for bit, each logged once."""
    reference = train_losses(request.getfixturevalue("trained" if kind == "lora" else "full_trained"))
    wd = tmp_path / "run"
    cmd = cli_cmd("train", *lora_overrides(wd, chats, base, checkpoint_every=2, **(FULL if kind == "full" else {})))
    assert train_killed_then_rerun(cmd, wd, "train.step:5") in (2, 4)
    assert train_losses(wd) == reference


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
