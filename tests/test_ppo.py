"""`objective: ppo` in the one training loop (issue 21 section 2): rollouts from the live weights, a
score at the end of each completion, a value model, GAE and TRL's clipped losses in one jitted step.

One uninterrupted CLI run of the shipped config on a small job (`full_run`: 8 prompts, 2 epochs x 2
mini batches x 2 microbatches per step, a missing-EOS penalty, a checkpoint at step 2) serves:
  * every metric TRL's PPOTrainer logs (and ours) on every line; objective/kl exactly 0 at step 1
    (policy == reference), not after;
  * rollouts.jsonl: each score is the toy reward recomputed from the completion's text; the rewards,
    GAE, returns, whitened advantages and objective/* metrics the step used, recomputed here with
    numpy from the logged log-probs, reference log-probs, values and scores (TRL v0.19's recursion
    written out again), equal the step's; the logged log-probs and values of step 3 equal a plain
    forward of checkpoint 2's policy and value model over each row (prompt rendered here, ids as drawn):
    the completion positions, the temperature and the value of the state after the last token line up;
  * SIGKILL after step 3's rollout (kill point ppo.rollout), then a rerun from checkpoint 2, gives the
    uninterrupted run's per-step metrics and rollouts.jsonl exactly.
The same job on 2 processes of 4 fake devices each (`spread_run`: jax.distributed, one data x fsdp x
tensor mesh over the 8) draws the same completions and scores, with the same metrics to float32
summation order; each process calls the reward function on its own half of a step's prompts; process
1's function answering None at step 3 stops both processes with one line naming it and process 1's
prompt, checkpoint 2 intact. Every other bad answer (raises, wrong length, a string, NaN) is one line
on rewards.score, the reward path PPO shares with GRPO, without a run.
A reward checkpoint as ppo.reward_model, with LoRA (`rm_lora_run`): scores equal RewardModel's of
prompt + completion ids, the value model starts as the reward model (its value of the state after the
last token is the score at step 1), the workdir holds adapters. Bad ppo.* keys are one line. The shipped
configs/ppo.yaml raises the mean score of its toy task.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from llama3_jax.config_loader import load_yaml_config
from llama3_jax.store import checkpoint
from llama3_jax.train.config import TrainConfig
from llama3_jax.train.ppo_loss import PPO_METRICS

from faults_helpers import REPO, cli, cli_env, run_ok, train_killed_then_rerun
from train_helpers import read_metrics

CONFIG = REPO / "configs" / "ppo.yaml"
NAMES = ("loss", *PPO_METRICS, "rollout_seconds", "rollout_tokens_per_second", "update_seconds")
KL, PENALTY, W = 0.1, 0.5, 7  # the small run's ppo.kl_coef, missing_eos_penalty, completion positions


def small_env(**extra) -> dict:
    """The small runs' environment: LLVM's -O0 for XLA's CPU kernels (the same HLO program after XLA's
    passes and fusions as a user's run; measured: ~35% less compile time, which is most of a small
    run's). Every run compared with another takes it; the shipped config's runs as a user's does."""
    return cli_env(XLA_FLAGS="--xla_backend_optimization_level=0", **extra)


def small_run(workdir, **extra) -> list[str]:
    kv = {"workdir": workdir, "steps": 3, "batch_size": 8, "ppo.max_completion_length": W - 1,
          "ppo.num_ppo_epochs": 2, "ppo.num_mini_batches": 2, "grad_accum": 2, "ppo.kl_coef": KL,
          "ppo.missing_eos_penalty": PENALTY, "log_every": 1, "checkpoint_every": 2, "optim.warmup_steps": 0,
          "progress": "false", "async_checkpoint": "false"}
    kv.update(extra)
    return cli("train", "--config", CONFIG, *[f"{k}={v}" for k, v in kv.items()])


def by_step(workdir, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def rollouts(workdir) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for line in (workdir / "rollouts.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append(r)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ppo_full") / "run"
    run_ok(small_run(workdir), small_env())
    return workdir


def test_every_metric_on_every_line_and_kl_starts_at_zero(full_run):
    lines = read_metrics(full_run)
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        missing = [k for k in NAMES if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
    kl = by_step(full_run, "objective/kl")
    assert kl[1] == 0.0  # the policy is the reference before any update
    assert kl[2] != 0.0 and kl[3] != 0.0


def letter_fraction(text: str) -> float:
    return sum(ch == "a" for ch in text) / len(text) if text else 0.0


def numpy_targets(rows: list[dict]) -> dict:
    """TRL v0.19 PPOTrainer's rollout targets (ppo_trainer.py lines 492-535) again, in numpy float64."""
    n = len(rows)
    arr = {k: np.zeros((n, W)) for k in ("logps", "ref_logps", "values")}
    for r, row in enumerate(rows):
        for k in arr:
            arr[k][r, :len(row[k])] = row[k]
    length = np.array([row["length"] for row in rows])
    score = np.array([row["score"] - (PENALTY if row["truncated"] else 0.0) for row in rows])
    t = np.arange(W)[None, :]
    mask, mask1 = t < length[:, None], t <= length[:, None]
    kl = (arr["logps"] - arr["ref_logps"]) * mask
    rewards = -KL * kl
    rewards[np.arange(n), np.where(length < W, length, length - 1)] += score
    values = arr["values"] * mask1
    adv, last = np.zeros((n, W)), np.zeros(n)
    for i in reversed(range(W)):
        nxt = values[:, i + 1] if i < W - 1 else 0.0
        last = rewards[:, i] + nxt - values[:, i] + 0.95 * last  # gamma 1, lam 0.95
        adv[:, i] = last
    returns = adv + values
    m = mask.sum()
    mean = (adv * mask).sum() / m
    var = (((adv - mean) ** 2) * mask).sum() / (m - 1)
    return {"advantages": (adv - mean) / np.sqrt(var + 1e-8) * mask, "returns": returns,
            "objective/kl": kl.sum(1).mean(), "objective/scores": score.mean(),
            "objective/non_score_reward": (-KL * kl).sum(1).mean(),
            "objective/entropy": (-arr["logps"] * mask).sum(1).mean()}


def test_rollout_targets_are_trls_recomputed_from_the_logged_rollout(full_run):
    logged = rollouts(full_run)
    assert sorted(logged) == [1, 2, 3]
    for step, rows in logged.items():
        assert [r["row"] for r in rows] == list(range(8))
        for r in rows:
            assert r["score"] == pytest.approx(letter_fraction(r["completion"]), abs=1e-6)
            assert r["length"] == len(r["completion_ids"]) and len(r["logps"]) == min(r["length"] + 1, W)
        want = numpy_targets(rows)
        for r, row in enumerate(rows):
            n = len(row["logps"])
            np.testing.assert_allclose(row["advantages"], want["advantages"][r, :n], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(row["returns"], want["returns"][r, :n], rtol=1e-4, atol=1e-5)
        line = next(x for x in read_metrics(full_run) if x["step"] == step)
        for k in ("objective/kl", "objective/scores", "objective/non_score_reward", "objective/entropy"):
            assert line[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (step, k)
        assert line["objective/rlhf_reward"] == pytest.approx(want["objective/non_score_reward"]
                                                              + want["objective/scores"], rel=1e-4, abs=1e-6)
    assert any(r["truncated"] for r in logged[1])  # the penalty was exercised


def row_outputs(graphdef, params):
    """A jitted plain forward of one row, padded to seq_len 112 (padding: segment 0): (112, V or 1)."""
    @jax.jit
    def run(p, tokens, segment_ids):
        out, _ = nnx.merge(graphdef, p)(tokens[None], jnp.arange(112)[None], segment_ids[None])
        return out[0]

    def view(ids: list[int], start: int) -> np.ndarray:  # the outputs at positions start .. start + W - 1
        tokens = np.zeros(112, np.int32)
        tokens[:len(ids)] = ids
        return np.asarray(run(params, tokens, (np.arange(112) < len(ids)).astype(np.int32)), np.float64)[start:start + W]
    return view


def test_logged_logps_and_values_are_the_checkpointed_models_on_each_row(full_run):
    from llama3_jax.data.prompts import render_prompt
    from llama3_jax.model.llama import abstract_model
    from llama3_jax.tokenizer import ByteTokenizer
    cfg, params = checkpoint.restore_params(full_run, step=2)
    cfg = dataclasses.replace(cfg, dtype="float32")
    vcfg = dataclasses.replace(cfg, head="score")  # a reward function: the value model is the policy's shape
    with checkpoint.manager(full_run, read_only=True) as m:
        value = m.restore(2, args=ocp.args.Composite(
            value=ocp.args.StandardRestore(checkpoint.abstract_params(vcfg))))["value"]
    policy_at = row_outputs(nnx.split(abstract_model(cfg))[0], params)
    value_at = row_outputs(nnx.split(abstract_model(vcfg))[0], value)
    tok = ByteTokenizer()
    for row in rollouts(full_run)[3]:  # drawn from checkpoint 2's weights
        prompt = render_prompt(tok, row["prompt"])
        ids, n = prompt + row["completion_ids"], len(row["logps"])
        logits = policy_at(ids, len(prompt) - 1) / (1.0 + 1e-7)  # temperature 1 (the config)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        got = [logp[t, c] for t, c in enumerate(row["completion_ids"][:n])]
        np.testing.assert_allclose(row["logps"][:len(got)], got, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(row["values"], value_at(ids, len(prompt) - 1)[:n, 0], rtol=1e-4, atol=1e-4)


def test_sigkill_after_a_rollout_and_rerun_give_the_same_metrics(tmp_path, full_run):
    workdir = tmp_path / "run"
    assert train_killed_then_rerun(small_run(workdir), workdir, "ppo.rollout:3", small_env()) == 2
    for key in ("loss", "grad_norm", *PPO_METRICS):
        assert by_step(workdir, key) == by_step(full_run, key), key
    assert (workdir / "rollouts.jsonl").read_text() == (full_run / "rollouts.jsonl").read_text()


JUDGE = """
import json, os

calls = []

def letter_a(prompts, completions, **columns):
    # the toy reward (configs/rewards/toy.py: the share of "a"s); each call appends {pid, id} to
    # PPO_REWARD_CALLS (which process scored which prompt); PPO_REWARD_NONE=P:N: process P's N-th call
    # answers None
    calls.append(1)
    with open(os.environ["PPO_REWARD_CALLS"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "id": columns["id"][0]}) + "\\n")
    import jax
    if [jax.process_index(), len(calls)] == [int(x) for x in os.environ["PPO_REWARD_NONE"].split(":")]:
        return [None] * len(completions)
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch == "a" for ch in t) / len(t) if t else 0.0 for t in texts]
"""


@pytest.fixture(scope="module")
def spread_run(tmp_path_factory):
    """The small run on 2 processes (tools/launch_local.py: jax.distributed, gloo on 127.0.0.1) of 4 fake
    devices each, one data 2 x fsdp 2 x tensor 2 mesh over the 8, the reward function `letter_a` above:
    process 1's function answers None at its 9th call (step 3: 4 prompts a step are its share)."""
    d = tmp_path_factory.mktemp("ppo_spread")
    judge, calls, workdir = d / "judge.py", d / "calls.jsonl", d / "run"
    judge.write_text(JUDGE)
    cmd = [sys.executable, str(REPO / "tools" / "launch_local.py"), "-n", "2", "--cpu-devices", "4", "--",
           *small_run(workdir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                  "ppo.reward_model": f"{judge}:letter_a"})]
    proc = subprocess.run(cmd, env=small_env(PPO_REWARD_CALLS=str(calls), PPO_REWARD_NONE="1:9"),
                          capture_output=True, text=True, timeout=400)
    return workdir, proc, judge, [json.loads(x) for x in calls.read_text().splitlines()]


def test_eight_devices_over_two_processes_give_one_devices_completions_and_metrics(spread_run, full_run):
    """Steps 1-2 (step 3 stops on the reward below): the same completions and scores exactly; the float
    metrics sum the same terms in another order over the shards (measured: <= 2e-5 relative)."""
    workdir, proc, _, _ = spread_run
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in proc.stderr, proc.stderr[-3000:]
    got, want = rollouts(workdir), rollouts(full_run)
    assert sorted(got) == [1, 2]
    for step in got:
        assert [(r["completion_ids"], r["score"]) for r in got[step]] == \
            [(r["completion_ids"], r["score"]) for r in want[step]]
    for key in ("loss", "grad_norm", *PPO_METRICS):
        g, w = by_step(workdir, key), by_step(full_run, key)
        assert sorted(g) == [1, 2], key
        np.testing.assert_allclose([g[s] for s in (1, 2)], [w[s] for s in (1, 2)], rtol=1e-4, atol=1e-6, err_msg=key)


def process_calls(spread_run) -> tuple[list[dict], list[dict]]:
    """The reward function's calls of process 0 and of process 1 (process 0's share: each step's first
    4 prompts, as rollouts.jsonl's rows 0-3 name them)."""
    workdir, _, _, calls = spread_run
    first4 = {int(r["where"].rpartition(":")[2]) - 1 for r in rollouts(workdir)[1][:4]}
    pid0 = {c["pid"] for c in calls if c["id"] in first4}
    assert len(pid0) == 1, calls
    return [c for c in calls if c["pid"] in pid0], [c for c in calls if c["pid"] not in pid0]


def test_each_process_scores_its_own_share_of_the_prompts(spread_run):
    workdir = spread_run[0]
    ids = {s: [int(r["where"].rpartition(":")[2]) - 1 for r in rows] for s, rows in rollouts(workdir).items()}
    p0, p1 = process_calls(spread_run)
    assert len(p0) + len(p1) == len(spread_run[3])
    # each prompt once in the job, not once per process; step 3: process 0's 4, then process 1's None
    assert [c["id"] for c in p0[:8]] == ids[1][:4] + ids[2][:4] and len(p0) == 12
    assert [c["id"] for c in p1[:8]] == ids[1][4:] + ids[2][4:] and len(p1) == 9


def test_a_none_score_on_one_process_stops_every_process_in_one_line_after_the_last_checkpoint(spread_run):
    """None has no meaning for a PPO score (docs/post-training.md): process 1's None at step 3 stops
    both processes, process 0 whose prompts scored fine too, each with the one line naming the function
    and process 1's prompt; checkpoint 2 (the state before step 3) intact, nothing logged after it."""
    workdir, proc, judge, _ = spread_run
    assert proc.returncode == 2, proc.stderr[-3000:]
    failed = process_calls(spread_run)[1][-1]["id"]  # process 1's first prompt of step 3
    errors = [ln for ln in proc.stderr.splitlines() if "llama3-jax train: error:" in ln]
    assert len(errors) == 2, proc.stderr[-3000:]
    for i in range(2):
        assert any(re.fullmatch(rf"\[process {i}\] llama3-jax train: error: \S*grpo_prompts\.jsonl:{failed + 1}: "
                                rf"reward function {re.escape(str(judge))}:letter_a returned None for completion 0: "
                                rf"objective ppo needs a score for every completion", e) for e in errors), errors
    assert checkpoint.latest_intact_step(workdir) == 2
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]


BAD = """
def judge(prompts, completions, id, **columns):
    # a fine answer for the first prompt (id 0), then the answer this test names (env-free: a module global)
    if id[0] == 0:
        return [0.5] * len(completions)
    return ANSWER(completions)
"""


@pytest.mark.parametrize("answer, why", [
    ("lambda c: 1 / 0", "raised ZeroDivisionError: division by zero"),
    ("lambda c: [0.5] * (len(c) + 1)", "returned 2 rewards for 1 completions"),
    ("lambda c: ['high'] * len(c)", "returned 'high' for completion 0, not a number or None"),
    ("lambda c: [None] * len(c)", "returned None for completion 0: objective ppo needs a score for every completion"),
    ("lambda c: [float('nan')] * len(c)",
     "returned None for completion 0: objective ppo needs a score for every completion"),
])
def test_each_bad_score_is_one_line_naming_the_function_and_the_prompts_line(tmp_path, answer, why):
    """PPO's scoring (rewards.score, the path GRPO's rewards take, with PPO's rule for None) on a real
    rollout batch of 2 prompts: the second prompt's bad answer names that prompt; GRPO's rule keeps None."""
    from llama3_jax.serve.rollout import RolloutBatch
    from llama3_jax.tokenizer import ByteTokenizer
    from llama3_jax.train import rewards
    fn = tmp_path / "bad.py"
    fn.write_text(BAD + f"\nANSWER = {answer}\n")
    source = rewards.RewardSource(f"{fn}:judge", "ppo.reward_model", None, seq_len=112, rows=2, mesh=None,
                                  tok=ByteTokenizer())
    prompts = [{"prompt": "Say a.", "ids": [1, 2], "columns": {"id": k}, "where": f"p.jsonl:{k + 1}"} for k in (0, 1)]
    rb = RolloutBatch(np.arange(2), np.zeros(2, np.int32), [[97, 97], [98]], np.array([-1, 260], np.int32),
                      np.array([2, 1], np.int32), 0.1, 3)
    with pytest.raises(ValueError) as e:
        rewards.score([source], prompts, rb, ByteTokenizer(), 1, none="objective ppo needs a score for every completion")
    assert str(e.value) == f"p.jsonl:2: reward function {fn}:judge {why}"
    if why.startswith("returned None"):  # GRPO's rule: None (or NaN) is "not applicable", kept as NaN
        got = rewards.score([source], prompts, rb, ByteTokenizer(), 1)
        assert got[0, 0] == 0.5 and np.isnan(got[1, 0])


def save_random(path, head: str, seed: int, **shape):
    """A random checkpoint of a tiny byte-tokenizer model (a reward model's head scaled up)."""
    from llama3_jax.model.config import ModelConfig, load_model_config
    from llama3_jax.train.step import init_params
    keys = {"vocab_size": 262, "dim": 48, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 12,
            "intermediate_size": 96, "tie_embeddings": True, "max_seq_len": 128, **shape}
    cfg = ModelConfig.from_dict(load_model_config("tiny").to_dict() | keys | {"head": head}, source="test")
    params = init_params(cfg, seed)
    if head == "score":
        params["score"] = params["score"] * 100.0
    checkpoint.save_params(path, cfg, params, tokenizer="bytes")
    return path


@pytest.fixture(scope="module")
def rm_lora_run(tmp_path_factory):
    """LoRA adapters on a base policy, scored by a reward checkpoint of another shape (the value model
    starts from it: its own frozen trunk)."""
    d = tmp_path_factory.mktemp("ppo_rm")
    base = save_random(d / "base", "lm", 1, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=192)
    rm = save_random(d / "rm", "score", 2)
    workdir = d / "run"
    run_ok(small_run(workdir, steps=2, **{"ppo.reward_model": rm, "init_from": base, "model": "null",
                                          "lora.rank": 4, "ppo.missing_eos_penalty": "null"}), small_env())
    return workdir, rm


def test_a_reward_checkpoints_scores_are_its_score_of_prompt_and_completion(rm_lora_run):
    from llama3_jax.data.prompts import render_prompt
    from llama3_jax.serve.reward import RewardModel
    from llama3_jax.tokenizer import ByteTokenizer
    workdir, rm = rm_lora_run
    rows = rollouts(workdir)[1]
    tok = ByteTokenizer()
    want = RewardModel(rm, dtype="float32").rewards([render_prompt(tok, r["prompt"]) + r["completion_ids"]
                                                     for r in rows])
    assert [r["score"] for r in rows] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert np.std(want) > 0.05  # a reward that tells the completions apart


def test_the_value_model_starts_as_the_reward_model(rm_lora_run):
    workdir, _ = rm_lora_run
    for r in rollouts(workdir)[1]:  # before any update: V(the state after the last token) is the score
        if r["length"] < W:
            assert r["values"][r["length"]] == pytest.approx(r["score"], rel=1e-4, abs=1e-4)


def test_lora_policy_starts_as_the_reference_and_the_workdir_holds_adapters(rm_lora_run):
    workdir, _ = rm_lora_run
    kl = by_step(workdir, "objective/kl")
    assert kl[1] == 0.0 and kl[2] != 0.0  # adapters start at B = 0: policy == base == reference
    assert json.loads((workdir / "config.json").read_text())["lora"]["rank"] == 4
    stored = ocp.StandardCheckpointHandler().metadata(workdir / "2" / "value").tree
    assert set(stored) == {"layers", "score"} and "wq" in stored["layers"]  # adapters + head, no trunk
    assert "embed" not in ocp.StandardCheckpointHandler().metadata(workdir / "2" / "params").tree


@pytest.mark.parametrize("override, message", [
    ("ppo.kl_coef=-1", "ppo.kl_coef=-1.0: expected >= 0"),
    ("ppo.lam=2", "ppo.lam=2.0: expected 0 <= lam <= 1"),
    ("ppo.num_mini_batches=0", "ppo.num_mini_batches=0: expected >= 1"),
    ("ppo.klcoef=0.1", "unknown key 'ppo.klcoef'"),
    ("ppo.cliprange=x", "ppo.cliprange: expected float, got 'x'"),
    ("ppo.reward_model=null", "objective ppo needs ppo.reward_model"),
    ("ppo.max_completion_length=112", "ppo.max_completion_length 112 leaves no room for a prompt"),
    ("ppo.num_mini_batches=3", "batch_size 16 does not split into ppo.num_mini_batches 3"),
])
def test_bad_ppo_keys_are_one_line(override, message):
    with pytest.raises(ValueError) as e:
        load_yaml_config(TrainConfig, CONFIG, [override])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_value_or_reward_checkpoint_that_cannot_serve_is_one_line_naming_its_key(tmp_path):
    from llama3_jax.train.config import model_config
    from llama3_jax.train.ppo_step import value_config
    other = save_random(tmp_path / "rm300", "score", 2, vocab_size=300)
    for override, message in [(f"ppo.reward_model={tmp_path / 'none'}", f"ppo.reward_model {tmp_path / 'none'}: "),
                              (f"ppo.value_model={other}", f"ppo.value_model {other}: the value model has "
                                                           f"vocab_size 300, the policy 262")]:
        cfg = load_yaml_config(TrainConfig, CONFIG, [override])
        with pytest.raises(ValueError) as e:
            value_config(cfg, model_config(cfg))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_the_shipped_config_raises_the_mean_score(tmp_path):
    run_ok(cli("train", "--config", CONFIG, f"workdir={tmp_path / 'run'}", "progress=false"), cli_env())
    scores = by_step(tmp_path / "run", "objective/scores")
    last = max(scores)
    assert scores[1] < 0.05 and (scores[last] + scores[last - 5]) / 2 > 0.5, scores
