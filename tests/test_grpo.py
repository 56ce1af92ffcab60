"""`objective: grpo` in the one training loop (issue 21): rollouts drawn by the serving engine from the
live weights, rewards from a Python function with TRL's signature, TRL's GRPO loss in the jitted step.

One uninterrupted CLI run (`full_run`: num_iterations 2 so a rollout batch serves two updates, beta > 0
so a reference is held, a checkpoint in the middle of a rollout's updates; the reward `ascii_share`,
written here, is dense, so every group has a spread of rewards and every update a real gradient)
serves the checks:
  * every metric TRL logs (and ours) on every line; kl is 0 at step 1 (policy == reference) and not
    after an update; the importance ratio is 1 on a rollout's first update (no clipping);
  * rollouts.jsonl's rewards are the reward recomputed here from the completion's text, and its
    advantages are TRL's group formula computed here with numpy from those rewards;
  * SIGKILL at a step, then a rerun from the checkpoint in the middle of a rollout's updates, gives the
    uninterrupted run's per-step rewards and losses exactly;
  * 8 fake devices (data 2 x fsdp 2 x tensor 2), and 2 processes under jax.distributed (gloo on
    127.0.0.1, one device each, each running the reward function on its own prompt), give the one-device
    run's completions and rewards exactly and its losses to float32 tolerance; a reward function raising
    on process 1 alone stops both processes with the same line;
  * a reward function that raises stops the run in one line naming it and the prompt's FILE:LINE,
    and the last checkpoint is intact;
  * the shipped configs/grpo.yaml learns its toy task: the mean reward rises from near 0.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama3_jax.store import checkpoint
from llama3_jax.train.grpo_loss import GRPO_METRICS

from faults_helpers import REPO, cli, cli_env, run_ok, train_killed_then_rerun
from train_helpers import read_metrics

CONFIG = REPO / "configs" / "grpo.yaml"
TRL_NAMES = ("loss", "reward", "reward_std", "rewards/ascii_share/mean", "rewards/ascii_share/std",
             "frac_reward_zero_std", *GRPO_METRICS, "completions/mean_length", "completions/max_length",
             "completions/clipped_ratio", "rollout_tokens_per_second", "rollout_seconds", "update_seconds")


REWARDS = """
import json, os

calls = []

def ascii_share(prompts, completions, **columns):
    # the share of the completion's characters that are ASCII (0 for an empty one); with GRPO_REWARD_CALLS
    # set, each call appends {pid, id} there (which process scored which prompt); GRPO_REWARD_FAIL=P:N:
    # process P raises at its N-th call
    calls.append(1)
    if os.environ.get("GRPO_REWARD_CALLS"):
        with open(os.environ["GRPO_REWARD_CALLS"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "id": columns["id"][0]}) + "\\n")
    if os.environ.get("GRPO_REWARD_FAIL"):
        import jax
        if [jax.process_index(), len(calls)] == [int(x) for x in os.environ["GRPO_REWARD_FAIL"].split(":")]:
            raise RuntimeError("judge offline")
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ord(ch) < 128 for ch in t) / len(t) if t else 0.0 for t in texts]
"""


def ascii_share(text: str) -> float:
    return sum(ord(ch) < 128 for ch in text) / len(text) if text else 0.0


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grpo_rewards") / "dense.py"
    path.write_text(REWARDS)
    return path


def small_run(workdir, rewards_file, **extra) -> list[str]:
    """The shipped config on a smaller job: 2 prompts x 4 completions of up to 8 tokens, per-step
    metrics, a reference (beta), two updates per rollout, a checkpoint at an odd step, the dense reward."""
    kv = {"workdir": workdir, "steps": 6, "batch_size": 2, "grpo.num_generations": 4,
          "grpo.reward_funcs": f"[{rewards_file}:ascii_share]",
          "grpo.max_completion_length": 8, "grpo.beta": 0.04, "grpo.num_iterations": 2, "log_every": 1,
          "checkpoint_every": 3, "optim.warmup_steps": 0, "progress": "false", "async_checkpoint": "false"}
    kv.update(extra)
    return cli("train", "--config", CONFIG, *[f"{k}={v}" for k, v in kv.items()])


def by_step(workdir, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, rewards_file):
    workdir = tmp_path_factory.mktemp("grpo_full") / "run"
    run_ok(small_run(workdir, rewards_file), cli_env())
    return workdir


def test_metrics_have_trls_names_and_kl_starts_at_zero(full_run):
    lines = read_metrics(full_run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for r in lines:
        missing = [k for k in TRL_NAMES if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert 0 < r["completions/max_length"] <= 8 + 1  # the stop token counted, as TRL counts it
        assert 0 <= r["reward"] <= 1
    kl = by_step(full_run, "kl")
    assert kl[1] == 0.0  # policy == reference before any update
    assert kl[2] > 0 and kl[6] > 0  # the updates moved the policy off the reference
    for step in (1, 3, 5):  # a rollout's first update: ratio exactly 1, nothing clipped
        assert by_step(full_run, "clip_ratio/region_mean")[step] == 0.0


def test_rollout_samples_carry_the_rewards_and_trls_advantages(full_run):
    lines = [json.loads(x) for x in (full_run / "rollouts.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in lines})
    assert steps == [1, 3, 5]  # one rollout per two updates, log_every 1
    for step in steps:
        group = sorted((r for r in lines if r["step"] == step), key=lambda r: r["generation"])
        assert [r["generation"] for r in group] == [0, 1, 2, 3]
        assert len({r["where"] for r in group}) == 1 and re.fullmatch(r".*grpo_prompts\.jsonl:\d+", group[0]["where"])
        rewards = np.array([r["reward"] for r in group], np.float64)
        assert rewards.tolist() == pytest.approx([ascii_share(r["completion"]) for r in group], abs=1e-6)
        assert [r["rewards"] for r in group] == [{"ascii_share": r["reward"]} for r in group]
        assert rewards.std() > 0.05  # a spread to normalise: the advantages below are not all 0
        expected = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4)  # TRL: group std, Bessel, + 1e-4
        assert [r["advantage"] for r in group] == pytest.approx(expected.tolist(), abs=1e-4)
        for r in group:  # the ids the reward and the update saw: the text is their decoding
            assert bytes(i for i in r["completion_ids"] if i < 256).decode(errors="replace") == r["completion"]
            assert len(r["completion_ids"]) <= 8 + (not r["truncated"])


def test_sigkill_and_rerun_give_the_same_rewards_and_losses(tmp_path, full_run, rewards_file):
    workdir = tmp_path / "run"
    # killed after step 5's update: the last checkpoint is step 3, inside the rollout of steps 3-4 (0-based
    # updates 2, 3): the rerun must read that rollout's batch back, not draw a new one
    resumed = train_killed_then_rerun(small_run(workdir, rewards_file), workdir, "train.step:5")
    assert resumed == 3
    for key in ("loss", "reward", "kl", "entropy"):
        assert by_step(workdir, key) == by_step(full_run, key), key
    assert (workdir / "rollouts.jsonl").read_text() == (full_run / "rollouts.jsonl").read_text()


def assert_same_run(got: Path, want: Path, steps: int = 6) -> None:
    """The same completions and rewards exactly (the sampled tokens decide them: rollouts.jsonl holds the
    first prompt's ids, the reward metrics all of them), and the losses to float32 tolerance: another
    mesh sums the same float32 terms in another order (rows over 4 batch shards, the model's matmuls over
    2 tensor shards), ~1e-7 relative per sum, and Adam's per-coordinate normalisation lets that grow over
    six updates (measured: <= 4e-5 relative); atol for step 1, whose loss is ~1e-7 (the advantages of a
    group sum to 0 and the importance ratio is 1)."""
    def upto(d: dict) -> dict:
        return {s: v for s, v in d.items() if s <= steps}
    samples = [[x for x in (run / "rollouts.jsonl").read_text().splitlines() if json.loads(x)["step"] <= steps]
               for run in (got, want)]
    assert samples[0] == samples[1]
    for key in ("reward", "reward_std", "rewards/ascii_share/mean", "frac_reward_zero_std", "completions/mean_length"):
        assert by_step(got, key) == upto(by_step(want, key)), key
    for key in ("loss", "kl", "entropy", "grad_norm"):
        g, w = by_step(got, key), upto(by_step(want, key))
        assert sorted(g) == sorted(w) == list(range(1, steps + 1)), key
        np.testing.assert_allclose([g[s] for s in w], list(w.values()), rtol=1e-4, atol=1e-6, err_msg=key)


def test_eight_fake_devices_give_one_devices_rewards_and_losses(tmp_path, full_run, rewards_file):
    workdir = tmp_path / "run"
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    proc = run_ok(small_run(workdir, rewards_file, **mesh), cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in proc.stderr
    assert_same_run(workdir, full_run)


def test_two_processes_give_one_process_rewards_and_losses(tmp_path, full_run, rewards_file):
    """`train` on 2 processes (tools/launch_local.py: jax.distributed, gloo on 127.0.0.1), one device each,
    one data=2 mesh: the rollouts are drawn on the global mesh, each process scores its own prompt (the
    reward function's calls say which process ran it), num_iterations 2 takes the old log-probs of the
    global batch, and steps 1-4 are the one-process run's. Then process 1's reward function raises at
    the third rollout (step 5): process 0, whose own prompt scored fine, stops too, both with the one
    line naming the function and process 1's prompt, and checkpoint 3 is intact."""
    workdir, calls = tmp_path / "run", tmp_path / "calls.jsonl"
    cmd = [sys.executable, str(REPO / "tools" / "launch_local.py"), "-n", "2", "--cpu-devices", "1", "--",
           *small_run(workdir, rewards_file, **{"mesh.data": 2})]
    proc = subprocess.run(cmd, env=cli_env(XLA_FLAGS="", GRPO_REWARD_CALLS=str(calls), GRPO_REWARD_FAIL="1:3"),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_same_run(workdir, full_run, steps=4)
    assert checkpoint.latest_intact_step(workdir) == 3
    calls = [json.loads(x) for x in calls.read_text().splitlines()]
    assert len(calls) == 6  # 3 rollouts x 2 prompts: each prompt scored once in the job, not once per process
    pairs = [calls[2 * k:2 * k + 2] for k in range(3)]  # a rollout's calls end before the next's (the gather waits)
    assert all(a["pid"] != b["pid"] and a["id"] != b["id"] for a, b in pairs)
    firsts = {int(r["where"].rpartition(":")[2]) - 1 for r in map(json.loads, (workdir / "rollouts.jsonl").open())
              if r["generation"] == 0}  # the id of the first prompt of rollouts 1 and 2 (line id + 1)
    process0 = {r["pid"] for pair in pairs[:2] for r in pair if r["id"] in firsts}
    assert len(process0) == 1  # process 0 scores the first prompt of each step, process 1 the second
    failed = next(r for r in pairs[2] if r["pid"] not in process0)  # process 1's prompt of the third rollout
    errors = [ln for ln in proc.stderr.splitlines() if "llama3-jax train: error:" in ln]
    assert len(errors) == 2, proc.stderr[-3000:]
    for i in range(2):  # the same line on both processes: process 1's prompt, process 1's function
        assert any(re.fullmatch(rf"\[process {i}\] llama3-jax train: error: \S*grpo_prompts\.jsonl:{failed['id'] + 1}: "
                                rf"reward function {re.escape(str(rewards_file))}:ascii_share raised RuntimeError: "
                                rf"judge offline", e) for e in errors), errors


def test_a_failing_reward_function_is_one_line_and_the_checkpoint_stays(tmp_path):
    fn = tmp_path / "flaky.py"
    fn.write_text("calls = []\n\n"
                  "def shaky(prompts, completions, **kw):\n"
                  "    calls.append(1)\n"
                  "    if len(calls) > 4:  # 2 prompts a step: the 3rd step's first prompt\n"
                  "        raise RuntimeError('judge offline')\n"
                  "    return [0.5] * len(completions)\n")
    workdir = tmp_path / "run"
    cmd = small_run(workdir, fn, **{"grpo.reward_funcs": f"[{fn}:shaky]", "checkpoint_every": 2,
                                "grpo.num_iterations": 1, "grpo.beta": 0.0})
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"llama3-jax train: error: .*grpo_prompts\.jsonl:\d+: reward function {re.escape(str(fn))}"
                        rf":shaky raised RuntimeError: judge offline", last), proc.stderr[-2000:]
    assert checkpoint.latest_intact_step(workdir) == 2  # the state before the failed step, whole
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]


def test_the_shipped_config_raises_the_mean_reward(tmp_path):
    run_ok(cli("train", "--config", CONFIG, f"workdir={tmp_path / 'run'}", "progress=false"), cli_env())
    reward = by_step(tmp_path / "run", "reward")
    first, last = reward[1], (reward[35] + reward[40]) / 2
    assert first < 0.05 and last > 0.5, reward  # the share of "a"s: ~1/261 at random init (measured: 0.93)
