"""Kill anywhere: SIGKILL `train`, `generate`, `score` and `convert` at chosen or random moments, rerun
the same command, and check that nothing is lost, doubled or silently wrong.

  * train: killed inside a step, during an async checkpoint write, during eval, during the final save
    (kill points), and at random moments (seeded): the finished run's per-step losses and eval lines
    equal an uninterrupted run's bit for bit, each step logged once, no unfinished step dir left;
  * generate / score: killed at random moments: every id exactly once in the output, rows equal an
    uninterrupted run's, no torn line left;
  * convert: killed at random moments and at kill points: DST is absent or complete and identical to
    an uninterrupted conversion; the rerun succeeds and leaves no temp directory behind.

Tiny model (test-small, byte tokenizer, float32), a shared persistent compilation cache so reruns do
not recompile. The `slow` variants only add more seeds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from faults_helpers import cli, cli_env, count_lines, run_killed_at, run_killed_when, run_ok
from train_helpers import base_overrides, read_metrics, train_losses, write_corpus

STEPS = 23  # not a multiple of checkpoint_every: the final save is its own save


@pytest.fixture(scope="module")
def env():
    return cli_env()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


def train_cmd(workdir, corpus) -> list[str]:
    return cli("train", *base_overrides(workdir, corpus, steps=STEPS, checkpoint_every=5, eval_every=10,
                                        eval_batches=2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, env):
    """The uninterrupted run every killed run is compared with; also the checkpoint generate, score and
    convert read."""
    wd = tmp_path_factory.mktemp("reference") / "run"
    run_ok(train_cmd(wd, corpus), env)
    return wd


def unfinished(workdir) -> list[str]:
    return [p.name for p in Path(workdir).iterdir() if "tmp" in p.name and p.is_dir()]


def assert_same_run(workdir, reference):
    assert train_losses(workdir) == train_losses(reference)  # same steps, bit-identical losses
    evals = [r for r in read_metrics(workdir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, STEPS]
    assert evals == [r for r in read_metrics(reference) if "eval_loss" in r]
    from llama3_jax.store import checkpoint
    assert checkpoint.latest_step(workdir) == STEPS
    assert not unfinished(workdir)


def test_train_killed_inside_a_step_a_save_an_eval_and_the_final_save(reference, corpus, env, tmp_path):
    wd = tmp_path / "run"
    cmd = train_cmd(wd, corpus)
    run_killed_at(cmd, env, "train.step:7")        # between checkpoints 5 and 10
    run_killed_at(cmd, env, "train.save")          # the async write of step 10 just started
    run_killed_at(cmd, env, "train.eval")          # between the two eval batches of step 10
    run_killed_at(cmd, env, "train.final_save")    # the write of step 23 just started
    done = run_ok(cmd, env)
    assert "done: steps" in done.stderr
    assert_same_run(wd, reference)


def _logged(workdir) -> int:
    try:
        return max(train_losses(workdir), default=0)
    except (FileNotFoundError, json.JSONDecodeError, AssertionError):
        return 0


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_train_killed_at_random_moments(reference, corpus, env, tmp_path, seed):
    """Three kills, each once a random step has been logged plus a random delay (startup, steps,
    saves and evals alike), then a run to the end."""
    from llama3_jax.store import checkpoint
    rng = random.Random(seed)
    wd = tmp_path / "run"
    cmd = train_cmd(wd, corpus)
    for _ in range(3):
        start = checkpoint.latest_step(wd) or 0 if wd.exists() else 0
        target = rng.randint(start, STEPS)
        run_killed_when(cmd, env, lambda: _logged(wd) >= target, delay=rng.uniform(0, 0.15))
    run_ok(cmd, env)
    assert_same_run(wd, reference)


# --------------------------------------------------------------------------- generate and score

N_ROWS = 16


def _ids_input(path: Path, kind: str) -> Path:
    rng = np.random.default_rng(3)
    lines = []
    for i in range(N_ROWS):
        prompt = rng.integers(0, 256, int(rng.integers(2, 30))).tolist()
        if kind == "generate":
            lines.append({"id": f"r{i}", "tokens": prompt})
        else:
            lines.append({"id": i, "prompt_tokens": prompt, "completion_tokens": rng.integers(0, 256, 6).tolist()})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _serve_cmd(kind, reference, inp, out) -> list[str]:
    extra = ["--max-new-tokens", "8", "--ignore-eos"] if kind == "generate" else []
    return cli(kind, "--checkpoint", reference, "--input", inp, "--output", out, "--batch-size", "2",
               "--dtype", "float32", *extra)


@pytest.fixture(scope="module")
def serve_reference(reference, env, tmp_path_factory):
    """Uninterrupted generate and score outputs: {kind: (input, {id: row})}."""
    d = tmp_path_factory.mktemp("serve")
    refs = {}
    for kind in ("generate", "score"):
        inp, out = _ids_input(d / f"{kind}.jsonl", kind), d / f"{kind}.out.jsonl"
        run_ok(_serve_cmd(kind, reference, inp, out), env)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        refs[kind] = inp, {json.dumps(r["id"]): r for r in rows}
        assert len(refs[kind][1]) == N_ROWS
    return refs


@pytest.mark.parametrize("kind", ["generate", "score"])
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_generate_and_score_killed_at_random_moments(kind, seed, reference, serve_reference, env, tmp_path):
    rng = random.Random(seed)
    inp, expected = serve_reference[kind]
    out = tmp_path / "out.jsonl"
    cmd = _serve_cmd(kind, reference, inp, out)
    for _ in range(3):
        target = rng.randint(0, N_ROWS - 1)
        run_killed_when(cmd, env, lambda: count_lines(out) >= target, delay=rng.uniform(0, 0.1))
        complete = out.read_bytes().rpartition(b"\n")[0].splitlines() if out.exists() else []
        ids = [json.dumps(json.loads(line)["id"]) for line in complete]
        assert len(ids) == len(set(ids)), "an id was written twice"
    run_ok(cmd, env)
    data = out.read_bytes()
    assert data.endswith(b"\n")  # no torn line left behind
    rows = [json.loads(line) for line in data.splitlines()]
    assert sorted(json.dumps(r["id"]) for r in rows) == sorted(expected)  # every id exactly once
    assert {json.dumps(r["id"]): r for r in rows} == expected


# ------------------------------------------------------------------------------------------ convert


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_reference(reference, env, tmp_path_factory):
    dst = tmp_path_factory.mktemp("convert") / "hf"
    run_ok(cli("convert", "--from", "jax", "--to", "hf", "--quiet", reference, dst), env)
    return dst


def _assert_complete_or_absent(dst: Path, hf_reference: Path, fmt: str):
    if not dst.exists():
        return False
    if fmt == "hf":
        assert _files(dst) == _files(hf_reference)
    else:
        from llama3_jax.store import checkpoint
        from llama3_jax.convert.hf import HFReader
        cfg, params = checkpoint.restore_params(dst)
        for t in HFReader(hf_reference).tensors():
            got = params[t.name] if t.layer is None else params["layers"][t.name.split("/")[1]][t.layer]
            np.testing.assert_array_equal(np.asarray(got), t.array, err_msg=t.origin)
    return True


@pytest.mark.parametrize("fmt", ["hf", "jax"])
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_convert_killed_leaves_dst_complete_or_absent(fmt, seed, reference, hf_reference, env, tmp_path):
    rng = random.Random(seed)
    src = reference if fmt == "hf" else hf_reference
    dst = tmp_path / "out"
    cmd = cli("convert", "--from", "jax" if fmt == "hf" else "hf", "--to", fmt, "--quiet", src, dst)
    run_killed_at(cmd, env, f"convert.tensor:{rng.randint(1, 8)}")  # mid-stream
    assert not dst.exists()
    run_killed_at(cmd, env, "convert.finish")  # every tensor written, DST not yet in place
    assert not dst.exists()
    for _ in range(2):
        run_killed_when(cmd, env, lambda: True, delay=rng.uniform(1.0, 6.0))
        if _assert_complete_or_absent(dst, hf_reference, fmt):
            break
    else:
        run_ok(cmd, env)
        assert _assert_complete_or_absent(dst, hf_reference, fmt)
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a temp directory was left behind"
