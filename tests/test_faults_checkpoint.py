"""Corrupt, partial and mismatched checkpoints: detected, reported with the step and file, never
restored as silently wrong weights.

  * a truncated, missing or bit-flipped file in the latest step: readers warn (step and file) and use
    the previous intact step; `train` resumes from it (the bad step set aside) and finishes with the
    uninterrupted run's losses; no intact step at all is an error;
  * an unfinished step directory (killed mid-save) is ignored by readers and removed by the next run;
  * a checkpoint of another model shape: an error naming the first mismatched parameter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama3_jax.store import checkpoint, integrity
from llama3_jax import cli
from llama3_jax.model.config import ModelConfig

from faults_helpers import cli as cli_cmd
from faults_helpers import cli_env, run_killed_at, run_ok
from train_helpers import base_overrides, train_losses, write_corpus

STEPS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


def train_cmd(workdir, corpus, **extra):
    return cli_cmd("train", *base_overrides(workdir, corpus, steps=STEPS, checkpoint_every=5, **extra))


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """A finished 10-step run with sealed checkpoints at steps 5 and 10."""
    wd = tmp_path_factory.mktemp("run") / "wd"
    run_ok(train_cmd(wd, corpus), cli_env())
    return wd


def biggest_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def bit_flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


CORRUPTIONS = {"truncated": (truncate, "truncated"), "missing": (Path.unlink, "missing"),
               "bit-flipped": (bit_flip, "checksum mismatch")}


def test_every_saved_step_has_a_manifest_that_matches(run):
    for step in (5, 10):
        assert integrity.is_sealed(run / str(step))
        assert integrity.verify(run / str(step)) is None
        listed = json.loads((run / str(step) / integrity.MANIFEST).read_text())["files"]
        assert any(name.startswith("params/") for name in listed) and any(n.startswith("opt_state/") for n in listed)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_latest_step_is_reported_and_the_previous_one_used(kind, run, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(run, wd)
    damage, why = CORRUPTIONS[kind]
    bad = biggest_file(wd / "10")
    damage(bad)
    rel = str(bad.relative_to(wd / "10"))
    assert checkpoint.latest_step(wd) == 10  # orbax's commit marker alone cannot see it

    assert checkpoint.latest_intact_step(wd) == 5
    err = capsys.readouterr().err
    assert f"step 10 is corrupt: {rel}: " in err and why in err and "using step 5" in err
    _, params = checkpoint.restore_params(wd)  # the readers' default: the latest intact step
    _, expected = checkpoint.restore_params(run, step=5)
    for a, b in zip(*map(lambda t: __import__("jax").tree.leaves(t), (params, expected))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_bit_flip_orbax_would_restore_is_caught(run, tmp_path, capsys):
    """Without the manifest the flipped weights load without complaint: the check is what stops them."""
    wd = tmp_path / "wd"
    shutil.copytree(run, wd)
    bit_flip(biggest_file(wd / "10"))
    _, raw = checkpoint.restore_params(wd, step=10)  # an explicit step skips the check
    _, good = checkpoint.restore_params(run, step=10)
    import jax
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(good)))
    assert checkpoint.latest_intact_step(wd) == 5


def test_train_resumes_from_the_last_intact_step_and_matches_the_uninterrupted_run(run, corpus, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(run, wd)
    bit_flip(biggest_file(wd / "10"))
    done = run_ok(train_cmd(wd, corpus), cli_env())
    assert "step 10 is corrupt" in done.stderr and f"resumed {wd} at step 5" in done.stderr
    assert (wd / "10.corrupt").is_dir(), "the corrupt step is set aside, not deleted"
    assert checkpoint.latest_intact_step(wd) == 10 and integrity.verify(wd / "10") is None
    assert train_losses(wd) == train_losses(run)


def test_no_intact_step_is_an_error_naming_each(run, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(run, wd)
    for step in (5, 10):
        truncate(biggest_file(wd / str(step)))
    with pytest.raises(ValueError, match="no intact checkpoint step .*step 10: .*truncated.*step 5: "):
        checkpoint.latest_intact_step(wd)
    out = tmp_path / "out.jsonl"
    (tmp_path / "in.jsonl").write_text('{"id": 1, "tokens": [1, 2]}\n')
    rc = cli.main(["generate", "--checkpoint", str(wd), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)])
    assert rc == 2 and "no intact checkpoint step" in capsys.readouterr().err


def test_an_unfinished_step_is_ignored_and_cleaned_up(run, corpus, tmp_path):
    wd = tmp_path / "wd"
    cmd = train_cmd(wd, corpus)
    run_killed_at(cmd, cli_env(), "train.save:2")  # the write of step 10 started, never committed
    unfinished = [p.name for p in wd.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert unfinished == ["10.orbax-checkpoint-tmp"]
    assert checkpoint.latest_intact_step(wd) == 5
    done = run_ok(cmd, cli_env())
    assert f"removed {wd / '10.orbax-checkpoint-tmp'}, a save that never finished" in done.stderr
    assert not [p for p in wd.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert train_losses(wd) == train_losses(run)


def test_a_checkpoint_of_another_shape_names_the_first_mismatched_parameter(run, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(run, wd)
    cfg = json.loads((wd / "config.json").read_text())
    cfg["model"]["dim"] = 48  # the config no longer describes the stored arrays
    (wd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"step 10: params embed has shape \(262, 40\) in the checkpoint, "
                                         r"the model expects \(262, 48\)"):
        checkpoint.restore_params(wd)
    with pytest.raises(ValueError, match=r"params lm_head has shape \(40, 262\)"):
        next(checkpoint.ParamReader(wd, ModelConfig.from_dict(cfg["model"])).arrays("lm_head"))

    from llama3_jax import train
    from llama3_jax.model.config import load_yaml_config
    from llama3_jax.parallel.sharding import make_mesh
    tc = load_yaml_config(train.TrainConfig, None, base_overrides(wd, "unused", **{"model": "{preset: test-small, vocab_size: 300}"}))
    setup = train.build(tc, train.model_config(tc), make_mesh(1, 1, 1))
    with pytest.raises(ValueError, match=r"params embed has shape \(262, 40\) in the checkpoint, the model expects \(300, 40\)"):
        train.restore_state(wd, 10, setup.abstract)
