"""`objective: reward` in the one training loop (issue 20): a Bradley-Terry reward model trained from a
tiny converted transformers LlamaForCausalLM (its output layer dropped, `score` drawn as init_params
draws it) ranks pairs it never saw; SIGKILL and rerun give the uninterrupted run's losses bit for bit;
8 fake devices give one device's losses; a LoRA reward run trains adapters and the head, and its
merged model is base + adapters + the trained head, computed here from the stored arrays; the shipped
configs/reward.yaml and its toy preference set parse and are whole. One shared base model and one
uninterrupted run (`full_run`) serve every test."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama3_jax import train
from llama3_jax.config_loader import load_yaml_config
from llama3_jax.convert import convert
from llama3_jax.data import corpus_documents, skipped_line_count
from llama3_jax.parallel.sharding import make_mesh
from llama3_jax.serve.reward import RewardModel
from llama3_jax.store import checkpoint
from llama3_jax.train import objectives
from llama3_jax.train.state import start_params

from conftest import make_hf_llama
from faults_helpers import REPO, cli, cli_env, run_ok, train_killed_then_rerun
from train_helpers import VOCAB, base_overrides, read_metrics, train_losses

COLOURS = "red green blue cyan pink gold teal plum grey navy".split()
UNSEEN = "amber olive coral ivory lilac mauve ochre rust sand slate".split()  # in no training pair
CURT = ["no.", "go away.", "not now.", "whatever.", "ask later."]
METRICS = ("loss", *objectives.REWARD_METRICS)


def preference(word: str, i: int) -> dict:
    """A full, polite answer naming the colour preferred to a curt one; string and chat prompts mixed."""
    if i % 2:
        return {"prompt": f"Colour {i}?", "chosen": f" {word}, thank you.", "rejected": f" {CURT[i % len(CURT)]}"}
    return {"prompt": [{"role": "user", "content": f"Name {i}."}],
            "chosen": [{"role": "assistant", "content": f"Sure: {word}."}],
            "rejected": [{"role": "assistant", "content": CURT[i % len(CURT)].capitalize()}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random transformers LlamaForCausalLM (an HF directory) and its `convert --to jax` output."""
    d = tmp_path_factory.mktemp("reward_base")
    make_hf_llama(d / "hf", vocab=VOCAB)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return d


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward_pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(preference(c, i)) + "\n" for i, c in enumerate(COLOURS * 4)))
    return path


def reward_overrides(workdir, pairs, init_from, **extra) -> list[str]:
    kv = {"objective": "reward", "steps": 16, "seq_len": 128, "batch_size": 4, "optim.lr": 3e-3,
          "optim.warmup_steps": 1, "data.eval_fraction": 0.2, "checkpoint_every": 100, "eval_every": 16,
          "eval_batches": 2, **extra}
    return base_overrides(workdir, pairs, init_from, **kv)


def reward_cfg(workdir, pairs, init_from, **extra) -> train.TrainConfig:
    return load_yaml_config(train.TrainConfig, None, reward_overrides(workdir, pairs, init_from, **extra))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pairs, base):
    """16 steps from the converted language model; eval on the held-out pairs at the end."""
    wd = tmp_path_factory.mktemp("reward_full") / "run"
    summary = train.train(reward_cfg(wd, pairs, base / "jax"))
    return wd, read_metrics(wd), summary


def test_start_is_the_language_models_trunk_and_a_fresh_score(tmp_path, pairs, base):
    """A score target from a language model: every trunk array is the checkpoint's, bit for bit, the
    output layer is gone, `score` is init_params' for the seed; the HF directory, streamed, gives the
    same arrays as its converted checkpoint."""
    cfg = reward_cfg(tmp_path / "run", pairs, base / "jax")
    mc = train.model_config(cfg)
    assert mc.head == "score" and mc.tie_embeddings is False
    setup = train.build(cfg, mc, make_mesh(1, 1, 1))
    got = start_params(cfg, setup)
    _, lm = checkpoint.restore_params(base / "jax")
    assert set(lm) - set(got) == {"lm_head"} and set(got) - set(lm) == {"score"}
    for k in lm.keys() - {"lm_head"}:
        for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(lm[k]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
    # init_params' draw for the seed (transformers' N(0, 0.02)); eager and jitted draws differ in the last bit
    drawn = np.asarray(train.init_params(mc, cfg.seed)["score"])
    np.testing.assert_allclose(np.asarray(got["score"]), drawn, rtol=1e-6, atol=0)
    assert 0.01 < drawn.std() < 0.03
    from_hf = start_params(dataclasses.replace(cfg, init_from=str(base / "hf")), setup)
    for a, b in zip(jax.tree.leaves(from_hf), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reward_model_ranks_unseen_pairs(full_run, pairs):
    """The held-out split (by hash: pairs the run never trained on) is ranked right by the run's own
    eval, and fresh pairs of colours no training pair names are ranked right by the serving path
    (serve/reward.py: its own rendering and left-padded batches) restoring the final checkpoint."""
    wd, metrics, summary = full_run
    train_lines = [r for r in metrics if "loss" in r]
    assert set(METRICS) <= set(train_lines[0]) and abs(train_lines[0]["loss"] - np.log(2)) < 0.05
    assert train_lines[-1]["loss"] < 0.3 and train_lines[-1]["accuracy"] == 1.0, train_lines
    ev = [r for r in metrics if "eval_loss" in r][-1]
    assert set(ev) == {"step", "eval_loss", "eval_pairs", *(f"eval_{k}" for k in objectives.REWARD_METRICS)}, ev
    assert ev["eval_pairs"] >= 4 and ev["eval_accuracy"] >= 0.9 and ev["eval_margin"] > 0, ev
    assert ev["eval_min_reward"] <= ev["eval_mean_reward"] <= ev["eval_max_reward"]
    assert summary["sample"] is None and not (wd / "sample.txt").exists()  # no output layer to sample
    rm = RewardModel(wd, dtype="float32", tokenizer=train.ByteTokenizer())
    fresh = [preference(w, i) for i, w in enumerate(UNSEEN)]
    sides = [rm.render({"prompt": p["prompt"], "completion": p[side]}) for p in fresh for side in ("chosen", "rejected")]
    r = np.asarray(rm.rewards(sides)).reshape(-1, 2)
    assert np.mean(r[:, 0] > r[:, 1]) >= 0.9, r


def test_sigkill_and_rerun_give_bit_identical_reward_losses(tmp_path, pairs, base, full_run):
    """Killed with SIGKILL inside step 5 (after the step-4 checkpoint), then the same command again:
    every step's loss and metrics equal the uninterrupted run's, bit for bit, each logged once."""
    wd = tmp_path / "run"
    cmd = cli("train", *reward_overrides(wd, pairs, base / "jax", steps=6, checkpoint_every=2, eval_every=0))
    assert train_killed_then_rerun(cmd, wd, "train.step:5") in (2, 4)
    want = {r["step"]: {k: r[k] for k in METRICS} for r in full_run[1] if "loss" in r and r["step"] <= 6}
    got = {r["step"]: {k: r[k] for k in METRICS} for r in read_metrics(wd) if "loss" in r}
    assert train_losses(wd) and got == want


def test_eight_devices_give_one_devices_losses(tmp_path, pairs, base, full_run):
    """data=2 x fsdp=2 x tensor=2 on 8 fake CPU devices: the 1-device run's loss and reward metrics
    (min / max combined over devices, not added) to rtol 1e-5."""
    wd = tmp_path / "run"
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    run_ok(cli("train", *reward_overrides(wd, pairs, base / "jax", steps=4, eval_every=0, **mesh)),
           cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    want = [r for r in full_run[1] if "loss" in r][:4]
    got = [r for r in read_metrics(wd) if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        for k in ("loss", "margin", "mean_reward", "min_reward", "max_reward"):  # accuracy: a step function
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {k}")


def test_lora_reward_run_and_its_merged_model(tmp_path, pairs, base, full_run):
    """LoRA (rank 4) on the language model: the head trains with the adapters (PEFT's modules_to_save);
    zero-init adapters and the same fresh head give the full run's first loss; the workdir stores
    adapters + head, and its merged model (checkpoint.restore_params, what convert/score read) is
    base + alpha/rank * A B + the trained head, computed here in numpy from the stored arrays."""
    wd = tmp_path / "lora"
    train.train(reward_cfg(wd, pairs, base / "jax", steps=3, eval_every=0, **{"lora.rank": 4}))
    first = [r for r in read_metrics(wd) if "loss" in r][0]
    np.testing.assert_allclose(first["loss"], full_run[1][0]["loss"], rtol=1e-6)
    step = checkpoint.latest_step(wd)
    with ocp.PyTreeCheckpointer() as c:
        stored = jax.tree.map(np.asarray, c.restore(Path(wd).absolute() / str(step) / "params"))
    assert set(stored) == {"layers", "score"}
    _, lm = checkpoint.restore_params(base / "jax")
    cfg, merged = checkpoint.restore_params(wd)
    assert cfg.head == "score" and set(merged) == set(lm) - {"lm_head"} | {"score"}
    np.testing.assert_array_equal(np.asarray(merged["score"]), stored["score"])
    assert not np.array_equal(stored["score"], np.asarray(train.init_params(cfg, 0)["score"]))  # it trained
    scale = 16.0 / 4  # lora.alpha / lora.rank
    for name, w in lm["layers"].items():
        want = np.asarray(w, np.float64)
        if name in stored["layers"]:
            a, b = stored["layers"][name]["a"], stored["layers"][name]["b"]
            want = want + scale * np.stack([np.tensordot(a[i], b[i], 1) for i in range(a.shape[0])])
        np.testing.assert_allclose(np.asarray(merged["layers"][name]), want, rtol=1e-5, atol=1e-6, err_msg=name)
    for k in ("embed", "norm"):
        np.testing.assert_array_equal(np.asarray(merged[k]), np.asarray(lm[k]))


def test_head_refusals_are_one_line(tmp_path, pairs, base, full_run):
    """A reward checkpoint given to sft (no output layer to train) and a language model resumed as a
    reward model are refused in one line naming the directory; a reward checkpoint as init_from of a
    reward run restores everything, its trained head included."""
    wd = full_run[0]
    cfg = reward_cfg(tmp_path / "sft", pairs, wd, objective="sft")
    with pytest.raises(ValueError, match=r"head='score'.*objective sft") as e:
        train.model_config(cfg)
    assert str(wd) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"head='lm'.*objective reward.*new workdir") as e:
        train.model_config(reward_cfg(base / "jax", pairs, None, model="null"), resume_dir=base / "jax")
    assert "\n" not in str(e.value)
    again = reward_cfg(tmp_path / "again", pairs, wd)
    setup = train.build(again, train.model_config(again), make_mesh(1, 1, 1))
    _, trained = checkpoint.restore_params(wd)
    for a, b in zip(jax.tree.leaves(start_params(again, setup)), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shipped_reward_config_parses_and_its_pairs_are_whole():
    """configs/reward.yaml: a reward run of a score-head model on its bundled preference set, every
    record valid and no pair too long for seq_len (none skipped), with held-out pairs to evaluate."""
    cfg = load_yaml_config(train.TrainConfig, str(REPO / "configs" / "reward.yaml"),
                           [f"data.path={REPO / 'configs' / 'data' / 'chat_reward.jsonl'}"])
    assert cfg.objective == "reward" and cfg.reward.center_rewards_coefficient is None
    assert train.model_config(cfg).head == "score" and cfg.sample_tokens == 0
    before = skipped_line_count()
    docs = corpus_documents(cfg.data, "reward")
    assert len(docs) >= 100 and skipped_line_count() == before
    from llama3_jax.data import make_iterator, split_sizes
    assert split_sizes(cfg.data, docs)["eval"] >= 8
    with make_iterator(cfg.data, tokenizer=train.make_tokenizer(cfg.tokenizer), seq_len=cfg.seq_len,
                       batch_size=cfg.batch_size, seed=0, kind="reward", num_epochs=1, documents=docs) as it:
        for _ in it:
            pass
        assert it.truncated == 0 and skipped_line_count() == before
