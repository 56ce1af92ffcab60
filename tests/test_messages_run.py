"""What a run says about itself (issue 19, messages 9, 10, 13, 15): the metrics lines of a resumed run,
the error for a workdir that holds another run's model, the summary and exit status of a generate rerun
with nothing new to run, and the token count of rows that end on a stop string.

A tiny in-process training run (test-small, byte tokenizer) and test_generate's converted checkpoint
and shared Generator: few compiles.
"""

from __future__ import annotations

import json

import pytest

from llama3_jax import cli
from llama3_jax.serve.request import cut_at_stop

from test_generate import EOS, N_NEW, ckpt, gen, gen_args, hf_model, ragged_prompts, read_jsonl  # noqa: F401
from train_helpers import base_overrides, read_metrics, write_corpus


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """4 steps (log_every 2, checkpoint_every 2), then the same command resumed to 6 steps."""
    d = tmp_path_factory.mktemp("resumed")
    corpus = write_corpus(d / "docs.jsonl", n_docs=40)
    argv = ["train", *base_overrides(d / "run", corpus, steps=4, log_every=2, checkpoint_every=2,
                                     batch_size=4, eval_every=0)]
    assert cli.main(argv) == 0
    assert cli.main([a if not a.startswith("steps=") else "steps=6" for a in argv]) == 0
    return d / "run", argv


def test_a_resumed_run_logs_the_steps_an_uninterrupted_one_does(resumed_run):
    """log_every=2: steps 1 (a new run's first), 2, 4, then after the resume at 4 only 6, not 5."""
    wd, _ = resumed_run
    lines = [r for r in read_metrics(wd) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 4, 6]
    first, after = lines[0], lines[3]
    assert first["tokens_per_second"] is None and first["startup_seconds"] > 0
    # the first line after the resume: its startup, and the throughput since the resumed run's first step
    assert after["startup_seconds"] > 0 and after["tokens_per_second"] > 0 and "data_skipped_lines" in after


def test_a_workdir_holding_another_runs_model_says_so(resumed_run, capsys):
    """The same workdir with Llama 3's tokenizer (128256 ids) instead of the bytes the model there was
    trained with (vocab_size 262): one line naming the workdir's model and its tokenizer."""
    wd, argv = resumed_run
    capsys.readouterr()
    assert cli.main([a for a in argv if a != "tokenizer=bytes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"workdir {wd} holds another run's model (" in err and "vocab_size 262" in err
    assert "model {'preset': 'test-small', 'vocab_size': 262}" in err and "trained with tokenizer bytes" in err
    assert "this run's tokenizer (Llama 3's) has 128256 ids" in err


def test_a_rerun_with_nothing_new_to_run_is_not_every_line_failed(gen, ckpt, tmp_path, capsys):
    """Two prompts run, two too long for the context; the rerun runs nothing new: it says so, counts the
    two still too long and the two already done, and exits 0 like the first run (status 1 is for
    inputs where no line has a result)."""
    from llama3_jax.serve.offline import run_generate
    short, long_ = ragged_prompts([4, 6]), [1] * 120  # 120 + 16 > 128
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "tokens": p}) + "\n" for i, p in enumerate(short + [long_, long_])))
    first = run_generate(gen_args(ckpt, inp, out, batch_size=2), generator=gen)
    assert (first["prompts"], first["errors"], first["all_failed"]) == (2, 2, False)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
            "--dtype", "float32", "--max-new-tokens", str(N_NEW)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "every line failed" not in err, err
    assert "generate: nothing new to run: 0 prompts" in err
    assert f"2 too long for the context, 0 bad lines skipped, 2 already in {out}" in err
    assert sorted((r["id"], "error" in r) for r in read_jsonl(out)) == [(0, False), (1, False), (2, True), (3, True)]


def test_generated_token_count_adds_the_stop_token_not_a_stop_string(gen, ckpt, tmp_path):
    """Row 0 ends on the stop token (EOS, generated, not kept: +1), row 1 on a stop string (the token
    that completed it is kept: +0), rows 2 and 3 at their budget: the summary's token count is what
    the rows generated."""
    from llama3_jax.serve.offline import run_generate
    prompts = ragged_prompts([5, 9, 12, 14], seed=0)
    full = gen.generate(prompts, N_NEW, ignore_eos=True, batch_size=4, decode_text=False)
    assert EOS in full[0].tokens and not any(EOS in c.tokens for c in full[1:])
    decode = gen.tokenizer.decode
    text = decode(full[1].tokens)
    stop = next(decode([t]) for t in full[1].tokens[3:] if decode([t]).strip() and decode([t]) in text[1:])
    kept, _ = cut_at_stop(full[1].tokens, [stop], decode)
    lines = [{"id": i, "tokens": p, **({"stop": [stop]} if i == 1 else {})} for i, p in enumerate(prompts)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = run_generate(gen_args(ckpt, inp, out, batch_size=4), generator=gen)
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert (rows[0]["finish_reason"], len(rows[0]["tokens"])) == ("stop", full[0].tokens.index(EOS))
    assert (rows[1]["finish_reason"], len(rows[1]["tokens"])) == ("stop", kept)
    assert [rows[i]["finish_reason"] for i in (2, 3)] == ["length", "length"]
    generated = full[0].tokens.index(EOS) + 1 + kept + 2 * N_NEW
    assert summary["tokens"] == generated
