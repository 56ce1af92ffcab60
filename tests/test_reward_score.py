"""`score` with a reward checkpoint (head "score") and serve/reward.py's RewardModel: each line's reward
equals transformers' LlamaForSequenceClassification(num_labels=1) on the same token ids, the ids being
the chat format written out by hand here (not data/chat.py's renderer); padded batches, a resumed run,
bad lines and 8 fake devices change nothing; a reward checkpoint given to `generate` is refused.

One tiny random model (byte tokenizer, vocab 263) is built once per module: transformers' causal model
converted to our checkpoint for the trunk, a random `score` head shared by both sides."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_llama
from llama3_jax.store import checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
PAD = 0  # transformers' pad id: byte 0 never occurs in the test texts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers' reward model, our reward checkpoint) with the same weights."""
    from llama3_jax.convert import convert
    d = tmp_path_factory.mktemp("rm")
    causal = make_hf_llama(d / "hf", vocab=263, seed=5, init_range=0.1)
    convert(d / "hf", d / "trunk", src_format="hf", dst_format="jax", progress=False)
    cfg = copy.deepcopy(causal.config)
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    torch.manual_seed(6)
    seqcls = transformers.LlamaForSequenceClassification(cfg).eval()
    seqcls.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad():
        seqcls.score.weight.normal_(0.0, 0.5)
    ours, params = checkpoint.restore_params(d / "trunk")
    params = {k: v for k, v in params.items() if k != "lm_head"}
    params["score"] = jnp.asarray(seqcls.score.weight.detach().numpy().T)
    checkpoint.save_params(d / "rm", dataclasses.replace(ours, head="score"), params, tokenizer="bytes")
    return seqcls, d / "rm", d / "trunk"


@pytest.fixture(scope="module")
def rm(models):
    from llama3_jax.serve.reward import RewardModel
    return RewardModel(models[1], dtype="float32", batch_size=4)


def hf_reward(seqcls, ids) -> float:
    with torch.no_grad():
        return float(seqcls(torch.tensor([ids])).logits[0, 0])


def chat_ids(messages) -> list[int]:
    """Llama 3's chat layout over the byte tokenizer's ids, written out: BOS, then per message
    <|start_header_id|> role <|end_header_id|> \\n\\n content <|eot_id|>."""
    ids = [256]
    for m in messages:
        ids += [258, *m["role"].encode(), 259, 10, 10, *m["content"].encode(), 260]
    return ids


USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"}]
LINES = [  # (line, its token ids by hand)
    ({"id": "text", "prompt": "The capital of France is", "completion": " Paris."},
     [256, *b"The capital of France is Paris.", 257]),
    ({"id": "chat-text", "prompt": USER, "completion": "4"}, chat_ids(USER + [{"role": "assistant", "content": "4"}])),
    ({"id": "chat-msg", "prompt": USER, "completion": {"role": "assistant", "content": "Four, of course."}},
     chat_ids(USER + [{"role": "assistant", "content": "Four, of course."}])),
    ({"id": 7, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]},
     chat_ids([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
               {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}])),
    ({"id": "long", "prompt": USER, "completion": [{"role": "assistant", "content": "x" * 60}]},
     chat_ids(USER + [{"role": "assistant", "content": "x" * 60}])),
]
BAD = ['{"id": "broken"', json.dumps({"id": "no-completion", "prompt": "hi"}),
       json.dumps({"id": "mixed", "prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}),
       json.dumps({"id": "too-long", "prompt": "y" * 200, "completion": "z"})]


def score_args(ckpt, inp, out, **kw):
    base = dict(checkpoint=str(ckpt), input=str(inp), output=str(out), batch_size=4, read_lines=None,
                dtype="float32", tokenizer=None, mesh=None, quantize=None)
    return argparse.Namespace(**{**base, **kw})


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def write_input(path, bad=True):
    lines = [json.dumps(rec) for rec, _ in LINES]
    if bad:
        lines[2:2] = BAD
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rewards_equal_transformers_for_both_input_shapes(models, rm, tmp_path, capsys):
    """Prompt/completion (text; messages + text, + one message, + a list) and whole conversations, in
    padded batches of 4 (lengths 33 .. 86: buckets 64 and 128), bad lines reported and skipped."""
    from llama3_jax.serve.offline import run_score
    seqcls, ckpt, _ = models
    inp, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    summary = run_score(score_args(ckpt, inp, out), generator=rm)
    err = capsys.readouterr().err
    assert "in.jsonl:3: skipped: invalid JSON" in err
    assert "in.jsonl:4: skipped: missing field" in err
    assert "in.jsonl:5: skipped: with a text 'prompt', 'completion' must be text" in err
    assert "in.jsonl:6: error: sequence of 203 tokens is longer than the model's context of 128 tokens" in err
    assert "score: 5 sequences" in err and "1 too long for the context, 3 bad lines skipped" in err
    rows = {r["id"]: r for r in read_jsonl(out)}
    too_long = rows.pop("too-long")
    assert set(too_long) == {"id", "error"} and "longer than the model's context" in too_long["error"]
    assert set(rows) == {rec["id"] for rec, _ in LINES}
    for rec, ids in LINES:
        assert rm.render({k: v for k, v in rec.items() if k != "id"}) == ids
        assert set(rows[rec["id"]]) == {"id", "reward"}
        assert abs(rows[rec["id"]]["reward"] - hf_reward(seqcls, ids)) < 1e-4, rec["id"]
    assert (summary["sequences"], summary["skipped_lines"], summary["errors"]) == (5, 3, 1)
    assert summary["tokens"] == sum(len(ids) for _, ids in LINES)
    # the batched API alone: one sequence per call (a one-row batch) gives the batched values
    rewards = rm.rewards([ids for _, ids in LINES])
    np.testing.assert_allclose(rewards, [rows[rec["id"]]["reward"] for rec, _ in LINES], atol=1e-5, rtol=0)
    assert rm.rewards([LINES[0][1]]) == pytest.approx([rewards[0]], abs=1e-5)


def test_rerun_with_half_done_writes_every_id_once(models, rm, tmp_path, capsys):
    from llama3_jax.serve.offline import run_score
    _, ckpt, _ = models
    inp, ref_out, out = write_input(tmp_path / "in.jsonl", bad=False), tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    run_score(score_args(ckpt, inp, ref_out), generator=rm)
    reference = read_jsonl(ref_out)
    out.write_text("".join(json.dumps(r) + "\n" for r in reference[:2]) + '{"id": "long", "rew')  # torn by a crash
    summary = run_score(score_args(ckpt, inp, out, batch_size=2, read_lines=2), generator=rm)
    assert "torn last line" in capsys.readouterr().err
    rows = read_jsonl(out)
    assert sorted(str(r["id"]) for r in rows) == sorted(str(r["id"]) for r in reference)
    want = {r["id"]: r["reward"] for r in reference}
    for r in rows:
        assert abs(r["reward"] - want[r["id"]]) < 1e-5
    assert (summary["sequences"], summary["already_done"]) == (len(LINES) - 2, 2)


def test_refusals_are_one_line(models, rm, tmp_path, capsys):
    """generate on a reward checkpoint, RewardModel on a policy one, a bad record given to render."""
    from llama3_jax.cli import main
    from llama3_jax.serve.reward import RewardModel
    _, ckpt, trunk = models
    inp = write_input(tmp_path / "in.jsonl", bad=False)
    assert main(["generate", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "llama3-jax generate: error: a reward model has no output layer; use score"
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModel(trunk)
    with pytest.raises(ValueError, match="'messages' or 'prompt' \\+ 'completion', not both"):
        rm.render({"messages": LINES[3][0]["messages"], "prompt": "x", "completion": "y"})
    with pytest.raises(ValueError, match="sequence 1: token id 263"):
        rm.rewards([[1, 2], [263]])


def test_eight_fake_devices_give_one_devices_rewards(models, rm, tmp_path):
    """`score --mesh data=2,fsdp=2,tensor=2` (the CLI, restoring onto the mesh) in a process with 8 fake
    devices writes the rewards of one device."""
    from llama3_jax.serve.offline import run_score
    _, ckpt, _ = models
    inp = write_input(tmp_path / "in.jsonl", bad=False)
    run_score(score_args(ckpt, inp, tmp_path / "one.jsonl"), generator=rm)
    code = textwrap.dedent(f"""
        import sys
        from llama3_jax.cli import main
        sys.exit(main(["score", "--checkpoint", {str(ckpt)!r}, "--input", {str(inp)!r}, "--output",
                       {str(tmp_path / "eight.jsonl")!r}, "--dtype", "float32", "--batch-size", "4",
                       "--mesh", "data=2,fsdp=2,tensor=2"]))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "score: 5 sequences" in r.stderr
    one = {x["id"]: x["reward"] for x in read_jsonl(tmp_path / "one.jsonl")}
    eight = {x["id"]: x["reward"] for x in read_jsonl(tmp_path / "eight.jsonl")}
    assert set(eight) == set(one)
    for k in one:
        assert abs(eight[k] - one[k]) < 1e-5, k
