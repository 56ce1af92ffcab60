"""Bad generation and training input: every bad line is reported as `FILE:LINE: skipped: why`, the
other rows are still produced, nothing crashes.

generate/score (beyond test_generate.py's invalid JSON, missing id, OOV id, duplicate id, context):
wrong types, empty prompts, non-UTF-8 bytes, negative ids, unknown roles, non-string content, a JSON
array instead of an object, both prompt kinds at once; --max-new-tokens negative (refused) or huge
(every row gets an error row, nothing is allocated for it). Training data: bad lines reported once
with file and line, skipped, counted in the metrics (`data_skipped_lines`).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from llama3_jax import cli
from llama3_jax.serve.offline import run_generate, run_score

from faults_helpers import cli as cli_cmd
from faults_helpers import cli_env, run_ok
from test_generate import big_vocab, gen_args, read_jsonl  # noqa: F401  (the shared 128K-vocab model)
from train_helpers import base_overrides, read_metrics, write_corpus

GOOD_MESSAGES = [{"role": "user", "content": "Hi"}]


def test_every_kind_of_bad_generate_line_is_reported_and_the_rest_produced(big_vocab, tmp_path, capsys):
    d, g = big_vocab
    lines = [
        json.dumps({"id": "ok1", "prompt": "Hello"}),                                  # 1
        json.dumps({"id": "t1", "prompt": 5}),                                         # 2 wrong type
        json.dumps({"id": "t2", "tokens": "1 2 3"}),                                   # 3 wrong type
        json.dumps({"id": "t3", "messages": "hi"}),                                    # 4 wrong type
        json.dumps({"id": [1], "prompt": "x"}),                                        # 5 id type
        json.dumps({"id": "e1", "prompt": ""}),                                        # 6 empty
        json.dumps({"id": "e2", "tokens": []}),                                        # 7 empty
        json.dumps({"id": "e3", "messages": []}),                                      # 8 empty
        '{"id": "u1", "prompt": "caf\xff"}',                                           # 9 non-UTF-8 (below)
        json.dumps({"id": "r1", "messages": [{"role": "wizard", "content": "x"}]}),    # 10 unknown role
        json.dumps({"id": "c1", "messages": [{"role": "user", "content": 7}]}),        # 11 content type
        json.dumps({"id": "n1", "tokens": [1, -1]}),                                   # 12 negative id
        json.dumps(["id", "prompt"]),                                                  # 13 not an object
        json.dumps({"id": "b1", "prompt": "x", "tokens": [1]}),                        # 14 two kinds
        json.dumps({"id": "ok2", "messages": GOOD_MESSAGES}),                          # 15
        json.dumps({"id": "ok1", "prompt": "again"}),                                  # 16 duplicate
        json.dumps({"id": "ok3", "tokens": [128000, 9906]}),                           # 17
    ]
    raw = "\n".join(lines).encode("utf-8").replace("caf\xff".encode("utf-8"), b"caf\xff") + b"\n"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(raw)
    summary = run_generate(gen_args(d, inp, out, batch_size=4, max_new_tokens=4, ignore_eos=True), generator=g)
    err = capsys.readouterr().err
    expect = {2: "'prompt' must be a non-empty string", 3: "'tokens' must be a list", 4: "messages must be",
              5: "'id' must be", 6: "non-empty", 7: "empty", 8: "'messages' is empty", 9: "utf-8",
              10: "role", 11: "content", 12: "outside the model's vocabulary", 13: "expected a JSON object",
              14: "exactly one of", 16: "duplicate id"}
    for lineno, why in expect.items():
        assert re.search(rf"in\.jsonl:{lineno}: skipped: .*{re.escape(why)}", err, re.IGNORECASE), (lineno, err)
    assert len(re.findall(r"in\.jsonl:\d+: skipped:", err)) == len(expect)  # each once, nothing else
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"ok1", "ok2", "ok3"} and all(len(r["tokens"]) == 4 for r in rows.values())
    assert summary["skipped_lines"] == len(expect)


def test_max_new_tokens_negative_is_refused_and_huge_gives_error_rows(big_vocab, tmp_path, capsys):
    d, g = big_vocab
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "Hello"}) + "\n" for i in range(3)))
    assert cli.main(["generate", "--checkpoint", str(d), "--input", str(inp), "--output", str(out),
                     "--max-new-tokens", "-5"]) == 2
    assert "--max-new-tokens must be >= 1, got -5" in capsys.readouterr().err and not out.exists()
    summary = run_generate(gen_args(d, inp, out, max_new_tokens=10**12), generator=g)
    err = capsys.readouterr().err
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == [0, 1, 2] and all("max_new_tokens" in r["error"] for r in rows)
    assert all(re.search(rf"in\.jsonl:{i + 1}: error: .*context", err) for i in range(3))
    assert summary["errors"] == 3 and summary["prompts"] == 0


def test_bad_score_lines_are_reported_and_the_rest_scored(big_vocab, tmp_path, capsys):
    d, g = big_vocab
    lines = [
        json.dumps({"id": 1, "prompt": "Hello", "completion": " world"}),
        json.dumps({"id": 2, "prompt": "Hello", "completion": 5}),                     # wrong type
        json.dumps({"id": 3, "prompt_tokens": [1], "completion_tokens": [10**7]}),     # out of vocab
        json.dumps({"id": 4, "prompt_tokens": [1, 2]}),                                # missing field
        json.dumps({"id": 5, "prompt_tokens": [], "completion_tokens": [1]}),          # empty prompt
        '{"id": 6, "prompt": "\xff", "completion": "x"}',
        json.dumps({"id": 7, "prompt_tokens": [1, 2], "completion_tokens": [3]}),
    ]
    raw = "\n".join(lines).encode("utf-8").replace("\xff".encode("utf-8"), b"\xff") + b"\n"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(raw)
    run_score(gen_args(d, inp, out, batch_size=2), generator=g)
    err = capsys.readouterr().err
    for lineno, why in {2: "'completion' must be a string", 3: "outside the model's vocabulary",
                        4: "completion_tokens", 5: "empty", 6: "utf-8"}.items():
        assert re.search(rf"in\.jsonl:{lineno}: skipped: .*{re.escape(why)}", err, re.IGNORECASE), (lineno, err)
    assert sorted(r["id"] for r in read_jsonl(out)) == [1, 7]


def test_bad_training_data_lines_are_reported_once_skipped_and_counted(tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl")
    lines = corpus.read_bytes().split(b"\n")
    lines[3] = b'{"text": "unterminated'
    lines[10] = b'{"body": "no text field"}'
    lines[20] = b'{"text": "caf\xff"}'
    lines[30] = b'["a", "list"]'
    corpus.write_bytes(b"\n".join(lines))
    wd = tmp_path / "wd"
    done = run_ok(cli_cmd("train", *base_overrides(wd, corpus, steps=2, eval_every=2, eval_batches=1)), cli_env())
    for lineno in (4, 11, 21, 31):
        assert len(re.findall(rf"docs\.jsonl:{lineno}: skipped: ", done.stderr)) == 1, done.stderr[-3000:]
    first = next(r for r in read_metrics(wd) if "loss" in r)
    assert first["data_skipped_lines"] == 4
