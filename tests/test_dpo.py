"""DPO (objectives.dpo through the one train step): the first loss is ln 2 (policy = reference), for
full fine-tuning and LoRA; the loss and TRL's metrics on a fixed batch equal an independent torch
computation from the same log-probs; a short run on a toy preference set learns the preference; eval
logs DPO's metrics; SIGKILL and rerun give the uninterrupted run's losses bit for bit."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama3_jax.train import objectives
from llama3_jax import train
from llama3_jax.model.config import load_yaml_config
from llama3_jax.convert import convert
from llama3_jax.data import DataConfig, make_iterator
from llama3_jax.parallel.sharding import make_mesh

from conftest import make_hf_llama
from faults_helpers import cli, train_killed_then_rerun
from train_helpers import VOCAB, base_overrides, read_metrics, train_losses

COLOURS = "red green blue cyan pink gold teal plum".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_base")
    make_hf_llama(d / "hf", vocab=VOCAB)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return d / "jax"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Prefer a polite answer to a curt one, whatever the colour; string and chat prompts mixed."""
    lines = []
    for i, c in enumerate(COLOURS * 2):
        if i % 2:
            lines.append({"prompt": f"Q: favourite colour? A:", "chosen": f" {c}, thank you.", "rejected": " no."})
        else:
            lines.append({"prompt": [{"role": "user", "content": f"Name {c}."}],
                          "chosen": [{"role": "assistant", "content": f"Sure: {c}."}],
                          "rejected": [{"role": "assistant", "content": "No."}]})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def dpo_overrides(workdir, pairs, base, **extra) -> list[str]:
    kv = {"objective": "dpo", "steps": 14, "seq_len": 128, "batch_size": 4, "optim.lr": 3e-3,
          "optim.warmup_steps": 1, "data.eval_fraction": 0.0, "checkpoint_every": 100, **extra}
    return base_overrides(workdir, pairs, base, **kv)


def dpo_cfg(workdir, pairs, base, **extra):
    return load_yaml_config(train.TrainConfig, None, dpo_overrides(workdir, pairs, base, **extra))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pairs, base):
    wd = tmp_path_factory.mktemp("dpo_full") / "run"
    train.train(dpo_cfg(wd, pairs, base))
    return [r for r in read_metrics(wd) if "loss" in r]


def test_first_dpo_loss_is_ln2_and_metrics_are_trls(full_run):
    first = full_run[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0 and first["loss_tokens"] > 0
    assert set(objectives.DPO_METRICS) <= set(first)


def test_short_run_learns_the_preference(full_run):
    last = full_run[-3:]
    assert np.mean([r["rewards/accuracies"] for r in last]) > 0.8, full_run
    assert all(r["rewards/margins"] > 0 for r in last) and last[-1]["loss"] < math.log(2) - 0.1


def test_lora_dpo_first_loss_is_ln2_and_eval_logs_dpo_metrics(tmp_path, pairs, base):
    """The reference is the base with the adapters off: zero-init adapters give exactly ln 2. Eval
    after step 1 (learning rate 0 in warmup: the policy is still the reference) logs DPO's loss, ln 2,
    and TRL's metrics with an `eval_` prefix, not a perplexity (meaningless for a pair loss)."""
    train.train(dpo_cfg(tmp_path / "run", pairs, base, steps=1, eval_every=1, eval_batches=1,
                        **{"lora.rank": 4, "data.eval_fraction": 0.3}))
    first, ev = read_metrics(tmp_path / "run")
    assert first["learning_rate"] == 0 and abs(first["loss"] - math.log(2)) < 1e-6
    assert set(ev) == {"step", "eval_loss", "eval_pairs", *(f"eval_{k}" for k in objectives.DPO_METRICS)}, ev
    assert abs(ev["eval_loss"] - math.log(2)) < 1e-6 and ev["eval_pairs"] >= 1
    assert ev["eval_rewards/chosen"] == ev["eval_rewards/margins"] == ev["eval_rewards/accuracies"] == 0.0
    assert ev["eval_logps/chosen"] < 0 and ev["eval_logps/rejected"] < 0


def sequence_logps_by_loop(logps, batch):
    """(chosen, rejected) per pair by walking each row's segments (independent of pair_logps)."""
    chosen, rejected = [], []
    for r, seg in enumerate(batch["segment_ids"]):
        for s in range(1, seg.max() + 1, 2):
            pick = lambda k: float(np.sum(logps[r][(seg == k) & (batch["loss_mask"][r] == 1)], dtype=np.float64))
            chosen.append(pick(s))
            rejected.append(pick(s + 1))
    return torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


def test_dpo_loss_equals_torch_from_the_same_logps(pairs, base):
    """TRL's sigmoid loss with label smoothing, written from the paper's definition in torch."""
    beta, eps = 0.3, 0.1
    with make_iterator(DataConfig(path=str(pairs), eval_fraction=0.0, prefetch=0), tokenizer=train.ByteTokenizer(),
                       seq_len=128, batch_size=4, seed=0, kind="dpo") as it:
        batch = next(it)
        assert it.truncated == 0
    rng = np.random.default_rng(0)
    policy = (-rng.exponential(2.0, batch["tokens"].shape)).astype(np.float32)  # any log-probs will do
    ref = (-rng.exponential(2.0, batch["tokens"].shape)).astype(np.float32)
    loss_sum, count, metrics = jax.jit(objectives.dpo, static_argnums=(3, 4))(policy, ref, batch, beta, eps)

    pc, pr = sequence_logps_by_loop(policy, batch)
    rc, rr = sequence_logps_by_loop(ref, batch)
    logits = (pc - rc) - (pr - rr)
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    assert int(count) == len(pc) >= 4
    np.testing.assert_allclose(float(loss_sum / count), losses.mean().item(), rtol=1e-5)
    expected = {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                "rewards/accuracies": (chosen_r > rejected_r).double().mean(),
                "rewards/margins": (chosen_r - rejected_r).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    for k, v in expected.items():
        np.testing.assert_allclose(float(metrics[k] / count), v.item(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_precomputed_reference_gives_the_in_step_losses(tmp_path, pairs, base, full_run):
    """dpo.precompute_reference: one pass before training, no reference copy in the step, the same run."""
    cfg = dpo_cfg(tmp_path / "run", pairs, base, steps=4, **{"dpo.precompute_reference": True})
    setup = train.build(cfg, train.model_config(cfg), make_mesh(1, 1, 1))
    assert setup.frozen_abstract == {}  # full DPO without a second copy of the weights
    train.train(cfg)
    table = json.loads((tmp_path / "run" / "reference_logps.json").read_text())
    assert len(table) == len(set(pairs.read_text().splitlines()))  # one entry per distinct pair
    got = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    for a, b in zip(got, full_run[:4], strict=True):
        for k in ("loss", *objectives.DPO_METRICS):
            if k == "rewards/accuracies":
                continue  # a step function of the rewards: margins ~0 early on make it flip on rounding
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-5, err_msg=f"step {a['step']} {k}")


def test_pairs_prepared_once_give_the_jsonl_losses(tmp_path, pairs, base, full_run):
    """tools/prepare_data.py --objective dpo: the pairs rendered once into ArrayRecord shards, read by
    index: the first steps have the JSONL run's losses and metrics, bit for bit."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import prepare_data
    out = tmp_path / "prepared"
    assert prepare_data.main([str(pairs), str(out), "--objective", "dpo", "--tokenizer", "bytes",
                              "--eval-fraction", "0.0", "--quiet"]) == 0
    train.train(dpo_cfg(tmp_path / "run", out, base, steps=3))
    got = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [{k: r[k] for k in ("step", "loss", *objectives.DPO_METRICS)} for r in got] == \
        [{k: r[k] for k in ("step", "loss", *objectives.DPO_METRICS)} for r in full_run[:3]]


def test_sigkill_and_rerun_give_bit_identical_dpo_losses(tmp_path, pairs, base, full_run):
    """Full DPO (in-step reference) killed with SIGKILL inside step 5, after a checkpoint, then the same
    command again: each step's loss equals the uninterrupted run's (`full_run`; a fixed decay_steps
    makes its first 6 steps those of a 6-step run), bit for bit, each logged once."""
    wd = tmp_path / "run"
    cmd = cli("train", *dpo_overrides(wd, pairs, base, steps=6, checkpoint_every=2))
    assert train_killed_then_rerun(cmd, wd, "train.step:5") in (2, 4)
    assert train_losses(wd) == {r["step"]: r["loss"] for r in full_run[:6]}
