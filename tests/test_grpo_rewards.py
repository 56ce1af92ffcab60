"""GRPO reward functions that answer None or misbehave (issue 21 section 3), against TRL 1.16's rules.

TRL 1.16 (trl/trainer/grpo_trainer.py, `_calculate_rewards` and `_generate_and_score_completions`): a
function's None (or NaN) is "not applicable"; a completion no function scored is "unscorable": it warns
("All reward functions returned None ..."), leaves the row out of its group's mean and std (nanmean,
nanstd) and out of the logged reward statistics, and gives it advantage 0 (nan_to_num). Checked here on
one CLI run, transcribed with numpy from the function's own answers (which it logs), then the same run
meets an answer that is not a number at step 3's second prompt: one line naming the function and that
prompt's FILE:LINE, checkpoint 2 intact, nothing logged after step 2.

Every other way a function can answer badly (the wrong length, a string, a list, a bool, an infinity)
is checked on reward_fns.RewardFn, the one place that checks every answer, without a run.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess

import numpy as np
import pytest

from llama3_jax.serve import reward_fns
from llama3_jax.store import checkpoint

from faults_helpers import REPO, cli, cli_env
from train_helpers import read_metrics

CONFIG = REPO / "configs" / "grpo.yaml"

PICKY = """
import json, os
calls = []

def picky(prompts, completions, id, **columns):
    # steps 1-2: completion 0 of each prompt unscored (None), NaN for completion 1 of the first prompt,
    # and every completion of the 4th prompt (step 2's second) unscored; step 3's second prompt: a string
    calls.append(1)
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    out = [sum(ord(ch) < 128 for ch in t) / len(t) if t else 0.0 for t in texts]
    out[0] = None
    if len(calls) == 1:
        out[1] = float("nan")
    if len(calls) == 4:
        out = [None] * len(out)
    if len(calls) == 6:
        out[0] = "0.5"
    with open(os.environ["GRPO_REWARD_CALLS"], "a") as f:
        f.write(json.dumps({"id": id[0], "out": out}) + "\\n")
    return out
"""


def nanstd(x) -> float:
    """TRL's nanstd: Bessel-corrected, over the non-NaN values."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(np.std(x, ddof=1)) if len(x) > 1 else math.nan


@pytest.fixture(scope="module")
def picky_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_picky")
    fn, calls = d / "picky.py", d / "calls.jsonl"
    fn.write_text(PICKY)
    kv = {"workdir": d / "run", "steps": 6, "batch_size": 2, "grpo.num_generations": 4,
          "grpo.max_completion_length": 8, "grpo.reward_funcs": f"[{fn}:picky]", "log_every": 1,
          "checkpoint_every": 2, "optim.warmup_steps": 0, "progress": "false", "async_checkpoint": "false"}
    proc = subprocess.run(cli("train", "--config", CONFIG, *[f"{k}={v}" for k, v in kv.items()]),
                          env=cli_env(GRPO_REWARD_CALLS=str(calls)), capture_output=True, text=True, timeout=300)
    answers = [json.loads(x) for x in calls.read_text().splitlines()]
    return proc, d / "run", answers, fn


def test_a_non_number_stops_the_run_in_one_line_naming_the_function_and_the_prompts_line(picky_run):
    proc, workdir, answers, fn = picky_run
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    bad = answers[5]  # the 6th call: step 3's second prompt (not the step's first), id k on line k + 1
    assert re.fullmatch(rf"llama3-jax train: error: \S*grpo_prompts\.jsonl:{bad['id'] + 1}: reward function "
                        + re.escape(f"{fn}:picky returned '0.5' for completion 0, not a number or None"), last), \
        proc.stderr[-2000:]
    assert checkpoint.latest_intact_step(workdir) == 2  # the state before step 3, whole
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]


def test_none_and_nan_are_not_applicable_and_an_unscored_completion_is_left_out_as_trl_does(picky_run):
    proc, workdir, answers, _ = picky_run
    metrics = {r["step"]: r for r in read_metrics(workdir)}
    for step in (1, 2):
        per_prompt = [[math.nan if a is None else a for a in c["out"]] for c in answers[2 * step - 2:2 * step]]
        rows = np.array(sum(per_prompt, []), np.float64)  # every completion here has one function: its answer
        m = metrics[step]
        assert m["reward"] == pytest.approx(np.nanmean(rows), abs=1e-6)
        assert m["rewards/picky/mean"] == pytest.approx(np.nanmean(rows), abs=1e-6)
        assert m["reward_std"] == pytest.approx(nanstd(rows), abs=1e-5)
        group_std = [nanstd(g) for g in per_prompt]  # NaN for a group nobody scored: not "zero std"
        assert m["frac_reward_zero_std"] == pytest.approx(np.mean([abs(s) <= 1e-8 for s in group_std]))
    assert all(a is None for a in answers[3]["out"])  # step 2's second prompt: no completion scored
    assert "every reward function returned None" in proc.stderr  # TRL warns too

    first = [json.loads(x) for x in (workdir / "rollouts.jsonl").read_text().splitlines()]
    for step in (1, 2):
        group = sorted((r for r in first if r["step"] == step), key=lambda r: r["generation"])
        answer = np.array([math.nan if a is None else a for a in answers[2 * step - 2]["out"]], np.float64)
        assert [r["reward"] for r in group] == [None if math.isnan(a) else pytest.approx(a, abs=1e-6) for a in answer]
        mean, std = np.nanmean(answer), nanstd(answer)
        expected = np.nan_to_num((answer - mean) / (std + 1e-4), nan=0.0)  # TRL: unscorable -> advantage 0
        assert [r["advantage"] for r in group] == pytest.approx(expected.tolist(), abs=1e-4)
        assert group[0]["advantage"] == 0.0 and group[0]["rewards"] == {"picky": None}
    assert math.isnan(answers[0]["out"][1])  # the NaN answer above: None in rollouts.jsonl, left out likewise


# ------------------------------------------------------------------ every bad answer, without a run

WHERE = "data/prompts.jsonl:7"


def call(fn, n: int = 4):
    return reward_fns.RewardFn("rewards.py:judge", fn)("Say a.", ["a"] * n, [[97, 260]] * n, {"id": 6}, WHERE)


@pytest.mark.parametrize("answer, why", [
    ([0.5, 0.5, 0.5], "returned 3 rewards for 4 completions"),
    ([0.5] * 5, "returned 5 rewards for 4 completions"),
    ("0.5", "returned str, not a list of floats"),
    (0.5, "returned float, not a list of floats"),
    (None, "returned NoneType, not a list of floats"),
    ({"a": 1.0}, "returned dict, not a list of floats"),
    ([0.5, "0.5", 0.5, 0.5], "returned '0.5' for completion 1, not a number or None"),
    ([[0.5], [0.5], [0.5], [0.5]], "returned [0.5] for completion 0, not a number or None"),
    ([0.5, 0.5, True, 0.5], "returned True for completion 2, not a number or None"),
    ([0.5, 0.5, 0.5, math.inf], "returned inf for completion 3; rewards must be finite (None: not applicable)"),
])
def test_each_bad_answer_is_one_line_naming_the_function_and_the_prompts_line(answer, why):
    with pytest.raises(ValueError) as e:
        call(lambda prompts, completions, **kw: answer)
    assert str(e.value) == f"{WHERE}: reward function rewards.py:judge {why}"


def test_a_raising_function_is_its_first_line_and_what_trl_passes_is_what_it_gets():
    def boom(prompts, completions, **kw):
        raise RuntimeError("no judge\nsecond line")
    with pytest.raises(ValueError) as e:
        call(boom)
    assert str(e.value) == f"{WHERE}: reward function rewards.py:judge raised RuntimeError: no judge"

    seen = {}

    def judge(prompts, completions, completion_ids, **columns):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, columns=columns)
        return np.array([1.0, math.nan, 0.25, 0.0], np.float32)  # an array is a list; NaN is None, as in TRL
    assert call(judge) == [1.0, None, 0.25, 0.0]
    assert seen == {"prompts": ["Say a."] * 4, "completions": ["a"] * 4, "completion_ids": [[97, 260]] * 4,
                    "columns": {"id": [6] * 4}}


def test_an_async_function_is_awaited_as_trl_awaits_it():
    async def judge(prompts, completions, **kw):
        await asyncio.sleep(0)
        return [0.5, None, 1, 0.0]

    async def fails(prompts, completions, **kw):
        raise RuntimeError("timeout")
    assert call(judge) == [0.5, None, 1.0, 0.0]
    with pytest.raises(ValueError, match=re.escape(f"{WHERE}: reward function rewards.py:judge raised RuntimeError: "
                                                   f"timeout")):
        call(fails)
