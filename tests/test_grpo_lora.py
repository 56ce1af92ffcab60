"""GRPO with LoRA from an `init_from` checkpoint, rewarded by a reward checkpoint (`model:DIR`) and a
function together, weighted (issue 21 sections 1 and 3).

One uninterrupted CLI run (`lora_run`: 1 prompt x 4 completions a step, so rollouts.jsonl holds every
completion of each rollout; num_iterations 2; beta > 0; a checkpoint at step 3, inside a rollout's two
updates) serves the checks:
  * the reference is the init_from model, the base with the adapters off: kl is exactly 0 at step 1,
    and at step 4 it equals the k3 estimate recomputed here from the init_from checkpoint's log-probs
    and the step-3 checkpoint's (base + adapters merged) on the completions step 4 trains on;
  * `rewards/<dir name>/mean` is the RewardModel's (serve/reward.py) mean score of the logged
    completions, scored here again; each line's reward is the weighted sum of both sources' answers;
  * SIGKILL after step 5 and a rerun from checkpoint 3 give the uninterrupted run's per-step rewards,
    losses and kl exactly, and the same rollouts.jsonl.
The two checkpoints (a tiny policy, a tiny reward model of the same shape with a `score` head) are made
directly (random init, saved as `convert --to jax` saves), as tests/test_reward_score.py does.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama3_jax.config_loader import load_yaml_config
from llama3_jax.data.prompts import render_prompt
from llama3_jax.model.llama import abstract_model
from llama3_jax.serve.reward import RewardModel
from llama3_jax.store import checkpoint
from llama3_jax.tokenizer import ByteTokenizer
from llama3_jax.train import TrainConfig, model_config
from llama3_jax.train.step import init_params

from faults_helpers import REPO, cli, cli_env, run_ok, train_killed_then_rerun
from train_helpers import read_metrics

CONFIG = REPO / "configs" / "grpo.yaml"
WEIGHTS = (0.5, 2.0)  # the reward model's, the function's
BETA = 0.04
REWARDS = """
def ascii_share(prompts, completions, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ord(ch) < 128 for ch in t) / len(t) if t else 0.0 for t in texts]
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy init_from dir, reward checkpoint dir, the function's file): the shipped config's model."""
    d = tmp_path_factory.mktemp("grpo_lora_models")
    mc = model_config(load_yaml_config(TrainConfig, CONFIG, []))
    checkpoint.save_params(d / "policy", mc, init_params(mc, seed=3), tokenizer="bytes")
    rm = dataclasses.replace(mc, head="score")
    checkpoint.save_params(d / "judge", rm, init_params(rm, seed=4), tokenizer="bytes")
    (d / "dense.py").write_text(REWARDS)
    return d / "policy", d / "judge", d / "dense.py"


def lora_cmd(workdir, models) -> list[str]:
    policy, judge, fn = models
    kv = {"workdir": workdir, "init_from": policy, "model": "null", "lora.rank": 4,
          "steps": 6, "batch_size": 1, "grpo.num_generations": 4, "grpo.max_completion_length": 8,
          "grpo.beta": BETA, "grpo.num_iterations": 2, "grpo.reward_funcs": f"[model:{judge},{fn}:ascii_share]",
          "grpo.reward_weights": f"[{WEIGHTS[0]},{WEIGHTS[1]}]", "log_every": 1, "checkpoint_every": 3,
          "optim.warmup_steps": 0, "progress": "false", "async_checkpoint": "false"}
    return cli("train", "--config", CONFIG, *[f"{k}={v}" for k, v in kv.items()])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, models):
    workdir = tmp_path_factory.mktemp("grpo_lora") / "run"
    run_ok(lora_cmd(workdir, models), cli_env())
    return workdir


def by_step(workdir, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def rollout(workdir, step: int) -> list[dict]:
    lines = [json.loads(x) for x in (workdir / "rollouts.jsonl").read_text().splitlines()]
    return sorted((r for r in lines if r["step"] == step), key=lambda r: r["generation"])


def completion_logps(params: dict, cfg, prompt_ids: list[int], completions: list[list[int]]) -> list[np.ndarray]:
    """log p(completion token | everything before it) under `params`, float32 (temperature 1), for each
    completion of one prompt: one forward of the rows right-padded (segment 0; causal, so the padding
    after a row's tokens changes nothing in them)."""
    seqs = [prompt_ids + c for c in completions]
    width = max(len(s) for s in seqs) - 1
    tokens, seg = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s) - 1], seg[i, :len(s) - 1] = s[:-1], 1

    @jax.jit
    def logps(p, tokens, seg):
        model = nnx.merge(nnx.split(abstract_model(dataclasses.replace(cfg, dtype="float32")))[0], p)
        logits, _ = model(tokens, jnp.broadcast_to(jnp.arange(width), tokens.shape), seg)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    out = np.asarray(logps(params, tokens, seg))
    return [out[i, np.arange(len(prompt_ids) - 1, len(s) - 1), c] for i, (s, c) in enumerate(zip(seqs, completions))]


def test_kl_starts_at_zero_and_the_reference_is_the_init_from_model(lora_run, models):
    kl = by_step(lora_run, "kl")
    assert kl[1] == 0.0 and kl[4] > 0  # the adapters start as a no-op (B = 0), then move the policy
    # step 4 is the second update on the rollout drawn at step 3, with the params checkpoint 3 holds
    cfg, policy = checkpoint.restore_params(lora_run, step=3)  # base + adapters, merged
    _, ref = checkpoint.restore_params(models[0])
    tok = ByteTokenizer()
    group = rollout(lora_run, 3)
    prompt_ids, completions = render_prompt(tok, group[0]["prompt"]), [r["completion_ids"] for r in group]
    lp, ref_lp = (np.concatenate(completion_logps(p, cfg, prompt_ids, completions)) for p in (policy, ref))
    d = ref_lp.astype(np.float64) - lp
    assert kl[4] == pytest.approx(np.mean(np.exp(d) - d - 1), rel=1e-5)  # measured: 9e-7 apart


def test_reward_model_scores_and_weights(lora_run, models):
    judge = RewardModel(models[1], dtype="float32")
    tok = ByteTokenizer()
    for step in (1, 3, 5):  # each rollout (num_iterations 2); batch_size 1: all its completions are logged
        group = rollout(lora_run, step)
        prompt_ids = render_prompt(tok, group[0]["prompt"])
        scores = judge.rewards([prompt_ids + r["completion_ids"] for r in group])
        text = [sum(ord(ch) < 128 for ch in r["completion"]) / len(r["completion"]) if r["completion"] else 0.0
                for r in group]
        assert [r["rewards"]["judge"] for r in group] == pytest.approx(scores, abs=1e-5)
        assert [r["rewards"]["ascii_share"] for r in group] == pytest.approx(text, abs=1e-6)
        weighted = [WEIGHTS[0] * s + WEIGHTS[1] * t for s, t in zip(scores, text)]
        assert [r["reward"] for r in group] == pytest.approx(weighted, abs=1e-5)
        for s in (step, step + 1):  # both updates of the rollout log its reward metrics
            assert by_step(lora_run, "rewards/judge/mean")[s] == pytest.approx(np.mean(scores), abs=1e-5)
            assert by_step(lora_run, "rewards/ascii_share/mean")[s] == pytest.approx(np.mean(text), abs=1e-6)
            assert by_step(lora_run, "reward")[s] == pytest.approx(np.mean(weighted), abs=1e-5)
    assert np.std(scores) > 1e-3  # the reward model tells completions apart: a real signal to compare


def test_a_lora_run_killed_and_rerun_gives_the_same_steps(lora_run, models, tmp_path):
    workdir = tmp_path / "run"
    # killed after step 5: checkpoint 3 sits inside the rollout of steps 3-4, whose batch is read back
    assert train_killed_then_rerun(lora_cmd(workdir, models), workdir, "train.step:5") == 3
    for key in ("loss", "reward", "rewards/judge/mean", "kl", "entropy", "grad_norm"):
        assert by_step(workdir, key) == by_step(lora_run, key), key
    assert (workdir / "rollouts.jsonl").read_text() == (lora_run / "rollouts.jsonl").read_text()
