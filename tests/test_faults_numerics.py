"""Non-finite losses and loss spikes.

The fault: a token id outside the vocabulary in the data (a corrupt shard, a tokenizer mismatch):
`jnp.take` fills the embedding row with NaN, so that batch's loss and gradients are NaN. A tokenizer
that emits such an id for documents containing "POISON" puts it into real runs of `train`.

  * the jitted step with nan_policy=skip keeps params and optimizer state bit for bit on a NaN batch,
    and changes nothing on a finite one;
  * nan_policy=stop (default): the run ends with exit status 2, the error names the first poisoned
    step, nothing from that step on is saved (the last checkpoint is the last good state);
  * nan_policy=skip: the poisoned steps are skipped and counted (`skipped_updates`), the run finishes
    with finite weights; more than nan_max_consecutive skips in a row stop it;
  * spike_factor: a loss above k x the running mean logs a warning line.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from llama3_jax.store import checkpoint
from llama3_jax import train
from llama3_jax.model.config import load_yaml_config
from llama3_jax.data import DataConfig, make_iterator
from llama3_jax.parallel.sharding import make_mesh
from llama3_jax.train.numerics import Guard

from faults_helpers import cli_env
from train_helpers import VOCAB, base_overrides, read_metrics, write_corpus

STEPS = 20
POISON_ID = 10**6


class PoisonTokenizer(train.ByteTokenizer):
    def encode(self, text, *, bos, eos):
        ids = super().encode(text, bos=bos, eos=eos)
        return ids[:3] + [POISON_ID] + ids[3:] if "POISON" in text else ids


SCRIPT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
    from test_faults_numerics import PoisonTokenizer
    from llama3_jax import cli
    from llama3_jax.train import loop
    loop.make_tokenizer = lambda spec: PoisonTokenizer()
    sys.exit(cli.main(["train", *sys.argv[1:]]))
""")


def poisoned_corpus(path, poisoned=()):
    write_corpus(path)
    lines = path.read_text().splitlines()
    for i in poisoned:
        lines[i] = json.dumps({"text": f"{i}: POISON " + json.loads(lines[i])["text"]})
    path.write_text("\n".join(lines) + "\n")
    return path


def poisoned_steps(corpus, steps=STEPS) -> list[int]:
    """Independently of the trainer: which batches of the run's data order carry the bad id."""
    with make_iterator(DataConfig(path=str(corpus), eval_fraction=0.1), tokenizer=PoisonTokenizer(), seq_len=32,
                       batch_size=8, seed=0) as it:
        return [s for s in range(1, steps + 1) if (next(it)["tokens"] >= VOCAB).any()]


def run_poisoned(workdir, corpus, **extra) -> subprocess.CompletedProcess:
    overrides = base_overrides(workdir, corpus, steps=STEPS, checkpoint_every=5, **extra)
    return subprocess.run([sys.executable, "-c", SCRIPT, *overrides], env=cli_env(), capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------------ the jitted step


@pytest.fixture(scope="module")
def steps_and_batches(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("c") / "docs.jsonl")
    with make_iterator(DataConfig(path=str(corpus), eval_fraction=0.1), tokenizer=train.ByteTokenizer(),
                       seq_len=32, batch_size=8, seed=0) as it:
        batch = next(it)
    bad = {k: v.copy() for k, v in batch.items()}
    bad["tokens"][2, 5] = POISON_ID
    setups = {}
    for policy in ("stop", "skip"):
        cfg = load_yaml_config(train.TrainConfig, None, base_overrides("/unused", corpus, nan_policy=policy))
        setups[policy] = train.build(cfg, train.model_config(cfg), make_mesh(1, 1, 1))
    init = _host(setups["stop"].init_state(0))  # one init compile; each step gets a fresh copy (donation)
    return setups, batch, bad, init


def _fresh(setup, init):
    return jax.device_put(init, setup.shardings)


def _host(state):
    return jax.tree.map(np.asarray, state)


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_skip_keeps_the_state_bit_for_bit_on_a_nan_batch(steps_and_batches):
    setups, good, bad, init = steps_and_batches
    s = setups["skip"]
    after, metrics = s.step_fn(_fresh(s, init), s.put_batch(bad))
    before = init
    assert not math.isfinite(float(metrics["loss"]))
    after = _host(after)
    assert _equal(after["params"], before["params"]) and _equal(after["opt_state"], before["opt_state"])
    assert int(after["step"]) == 1

    # the same batch without the guard poisons the weights: the select is what protects them
    t = setups["stop"]
    poisoned, _ = t.step_fn(_fresh(t, init), t.put_batch(bad))
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(poisoned["params"]))


def test_skip_changes_nothing_on_a_finite_batch(steps_and_batches):
    setups, good, _, init = steps_and_batches
    out = {p: _host(s.step_fn(_fresh(s, init), s.put_batch(good))) for p, s in setups.items()}
    assert _equal(out["skip"], out["stop"])


# ---------------------------------------------------------------------------------------- the loop


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    corpus = poisoned_corpus(tmp_path / "docs.jsonl", poisoned=(30, 31, 60))
    bad_steps = poisoned_steps(corpus)
    assert bad_steps, "no poisoned batch within the run"
    first = bad_steps[0]
    proc = run_poisoned(tmp_path / "wd", corpus)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    good_ckpt = (first - 1) // 5 * 5 or None
    assert f"step {first}: non-finite loss nan" in line and "nan_policy=stop" in line
    if good_ckpt:
        assert f"the last checkpoint (step {good_ckpt}) is intact" in line
    assert checkpoint.latest_intact_step(tmp_path / "wd") == good_ckpt


def test_skip_counts_the_skipped_steps_and_finishes_with_finite_weights(tmp_path):
    corpus = poisoned_corpus(tmp_path / "docs.jsonl", poisoned=(30, 31, 60))
    bad_steps = poisoned_steps(corpus)
    proc = run_poisoned(tmp_path / "wd", corpus, nan_policy="skip")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for s in bad_steps:
        assert f"step {s}: non-finite loss nan" in proc.stderr and "update skipped" in proc.stderr
    lines = {r["step"]: r for r in read_metrics(tmp_path / "wd") if "loss" in r}
    assert lines[STEPS]["skipped_updates"] == len(bad_steps)
    assert [s for s, r in lines.items() if not math.isfinite(r["loss"])] == bad_steps
    _, params = checkpoint.restore_params(tmp_path / "wd")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_skip_stops_after_too_many_consecutive_nans(tmp_path):
    corpus = poisoned_corpus(tmp_path / "docs.jsonl", poisoned=range(120))
    proc = run_poisoned(tmp_path / "wd", corpus, nan_policy="skip", nan_max_consecutive=2)
    assert proc.returncode == 2
    assert "step 3: non-finite loss nan" in proc.stderr and "3 non-finite steps in a row" in proc.stderr
    assert checkpoint.latest_step(tmp_path / "wd") is None


# ------------------------------------------------------------------------------------ the host guard


def test_spike_warning_and_consecutive_count():
    out = io.StringIO()
    g = Guard("skip", max_consecutive=2, spike_factor=3.0, out=out)
    for step, loss in enumerate([2.0, 2.2, 1.8, 2.0, 2.0, 5.0, 8.0, 2.0], start=1):
        g.check(step, loss, 1.0)
    lines = out.getvalue().splitlines()
    assert lines == ["train: warning: loss spike at step 7: 8.0000 > 3 x running mean 2.5000"]
    g.check(9, float("nan"), 1.0)
    g.check(10, 2.0, float("inf"))  # grad norm alone counts too
    with pytest.raises(ValueError, match="step 11: .*3 non-finite steps in a row"):
        g.check(11, float("inf"), 1.0)
    assert g.skipped == 3
