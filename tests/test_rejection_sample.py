"""`rejection-sample`: every kept record's reward is transformers' LlamaForSequenceClassification score
of that record (its token ids written out by hand here, not by data/chat.py) and the maximum among its
prompt's samples; the samples are `generate --num-samples N`'s; --keep / --min-reward select as an
independent sort of the samples file says; reward functions get TRL's arguments and their weighted sum
(None skipped, all-None never kept); failing functions are one line; a SIGKILL between a prompt's
records and its done line, then a rerun, gives the uninterrupted run's files: nothing lost or doubled.

One tiny random policy (byte tokenizer, vocab 263) and a reward model on its trunk with a random score
head are built once per module; the in-process runs share one Generator and one RewardModel (few
compiles); the kill test runs the CLI in subprocesses."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import pytest

from conftest import make_hf_llama
from faults_helpers import cli, cli_env, run_killed_at, run_ok
from llama3_jax.cli import build_parser, main
from llama3_jax.store import checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N = 4
USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"}]
LINES = [{"id": "t1", "prompt": "The capital of France is", "answer": "Paris"},
         {"prompt": USER, "answer": "4"},  # no id: its line number, 2
         '{"id": "broken"',
         {"id": 4, "prompt": [{"role": "user", "content": "Say hi"}]},
         {"id": "t2", "prompt": "Once upon a time"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers' reward model, policy checkpoint, reward checkpoint): the reward model is the
    policy's trunk with a random score head."""
    from llama3_jax.convert import convert
    d = tmp_path_factory.mktemp("rs")
    causal = make_hf_llama(d / "hf", vocab=263, seed=5, init_range=0.1)
    convert(d / "hf", d / "policy", src_format="hf", dst_format="jax", progress=False)
    cfg = copy.deepcopy(causal.config)
    cfg.num_labels, cfg.pad_token_id = 1, 0
    torch.manual_seed(6)
    seqcls = transformers.LlamaForSequenceClassification(cfg).eval()
    seqcls.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad():
        seqcls.score.weight.normal_(0.0, 0.5)
    ours, params = checkpoint.restore_params(d / "policy")
    params = {k: v for k, v in params.items() if k != "lm_head"}
    params["score"] = jnp.asarray(seqcls.score.weight.detach().numpy().T)
    checkpoint.save_params(d / "rm", dataclasses.replace(ours, head="score"), params, tokenizer="bytes")
    return seqcls, d / "policy", d / "rm"


@pytest.fixture(scope="module")
def engines(models):
    from llama3_jax.serve.engine import Generator
    from llama3_jax.serve.reward import RewardModel
    return Generator(models[1], dtype="float32", tokenizer="bytes"), RewardModel(models[2], dtype="float32",
                                                                                 batch_size=4)


def hf_reward(seqcls, ids) -> float:
    with torch.no_grad():
        return float(seqcls(torch.tensor([ids])).logits[0, 0])


def chat_ids(messages, open_assistant=False) -> list[int]:
    """Llama 3's chat layout over the byte tokenizer's ids, written out."""
    ids = [256]
    for m in messages:
        ids += [258, *m["role"].encode(), 259, 10, 10, *m["content"].encode(), 260]
    return ids + ([258, *b"assistant", 259, 10, 10] if open_assistant else [])


def as_messages(prompt) -> list[dict]:
    """A text prompt is the user's turn (the byte tokenizer has Llama 3's chat format)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def record_ids(rec) -> list[int]:
    if "messages" in rec:
        return chat_ids(rec["messages"])
    return [256, *rec["prompt"].encode(), *rec["completion"].encode(), 257]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def parse(models, inp, out, *extra):
    return build_parser().parse_args(["rejection-sample", "--policy", str(models[1]), "--input", str(inp),
                                      "--output", str(out), "--num-samples", str(N), "--max-new-tokens", "6",
                                      "--seed", "1", "--dtype", "float32", "--tokenizer", "bytes",
                                      "--batch-size", "4", *map(str, extra)])


def run(models, engines, inp, out, *extra) -> dict:
    from llama3_jax.serve.rejection import run_rejection_sample
    args = parse(models, inp, out, *extra)
    return run_rejection_sample(args, generator=engines[0],
                                reward_model=engines[1] if args.reward_model else None)


@pytest.fixture(scope="module")
def first(models, engines, tmp_path_factory):
    """One run with the reward model: (input, output, samples file, summary)."""
    d = tmp_path_factory.mktemp("first")
    inp = write_lines(d / "in.jsonl", LINES)
    summary = run(models, engines, inp, d / "best.jsonl", "--reward-model", models[2], "--samples-output",
                  d / "samples.jsonl")
    return inp, d / "best.jsonl", d / "samples.jsonl", summary


def by_id(rows) -> dict:
    out = {}
    for r in rows:
        out.setdefault(json.dumps(r["id"]), []).append(r)
    return out


def test_kept_record_is_the_best_sample_and_its_reward_is_the_reward_models(models, first):
    seqcls = models[0]
    inp, out, samples_path, summary = first
    assert (summary["prompts"], summary["samples"], summary["skipped_lines"]) == (4, 4 * N, 1)
    records, samples = by_id(read_jsonl(out)), by_id(read_jsonl(samples_path))
    prompts = {json.dumps(x.get("id", i + 1)): x for i, x in enumerate(LINES) if isinstance(x, dict)}
    assert set(records) == set(samples) == set(prompts)
    assert sorted(json.dumps(d["id"]) for d in read_jsonl(f"{out}.done")) == sorted(prompts)
    from llama3_jax.data.chat import sft_problem
    for key, [rec] in records.items():
        assert sft_problem(rec) is None  # an SFT record as configs/sft.yaml reads it
        prompt = as_messages(prompts[key]["prompt"])
        assert set(rec) == {"id", "messages", "reward"} and rec["messages"][:-1] == prompt
        assert rec["messages"][-1]["role"] == "assistant"
        assert abs(rec["reward"] - hf_reward(seqcls, record_ids(rec))) < 1e-4, key
        # every sample scored by transformers too: the kept one is their maximum
        assert sorted(s["sample"] for s in samples[key]) == list(range(N))
        hf = []
        for s in samples[key]:
            sample_rec = {"messages": [*prompt, {"role": "assistant", "content": s["text"]}]}
            hf.append(hf_reward(seqcls, record_ids(sample_rec)))
            assert abs(s["reward"] - hf[-1]) < 1e-4
        best = max(range(N), key=lambda k: hf[k])
        text = rec["messages"][-1]["content"]
        assert text == samples[key][best]["text"] and abs(rec["reward"] - max(hf)) < 1e-4
    assert len({s["text"] for s in samples['"t1"']}) > 1  # it sampled
    assert summary["mean_best_reward"] == pytest.approx(sum(r[0]["reward"] for r in records.values()) / 4)


def test_samples_are_generates(models, engines, first, tmp_path):
    """`generate --num-samples N` on the same prompts (chat ones as token ids written by hand) draws the
    same texts: one engine, one seeding, and the prompts encoded as generate / the chat layout do."""
    from llama3_jax.serve.offline import run_generate
    inp, _, samples_path, _ = first
    gen_in = [{"id": key, "tokens": chat_ids(as_messages(LINES[i]["prompt"]), True)}
              for key, i in (("t1", 0), (2, 1), (4, 3), ("t2", 4))]
    args = build_parser().parse_args(["generate", "--checkpoint", "x", "--input", str(write_lines(
        tmp_path / "g.jsonl", gen_in)), "--output", str(tmp_path / "g.out.jsonl"), "--num-samples", str(N),
        "--max-new-tokens", "6", "--seed", "1", "--temperature", "1.0", "--batch-size", "4"])
    run_generate(args, generator=engines[0])
    want = {(json.dumps(r["id"]), r["sample"]): r["text"] for r in read_jsonl(tmp_path / "g.out.jsonl")}
    got = {(json.dumps(r["id"]), r["sample"]): r["text"] for r in read_jsonl(samples_path)}
    assert got == want


def test_keep_and_min_reward_select_as_the_samples_say_and_a_rerun_adds_nothing(models, engines, first, tmp_path,
                                                                                 capsys):
    _, _, samples_path, _ = first
    samples = by_id(read_jsonl(samples_path))
    floor = min(max(s["reward"] for s in rows) for rows in samples.values()) + 1e-6  # one prompt keeps none
    out = tmp_path / "best.jsonl"
    extra = ("--reward-model", models[2], "--keep", 2, "--min-reward", floor, "--samples-output", tmp_path / "s.jsonl")
    summary = run(models, engines, first[0], out, *extra)
    assert read_jsonl(tmp_path / "s.jsonl") == read_jsonl(samples_path)
    records = by_id(read_jsonl(out))
    kept = {}
    for key, rows in samples.items():
        ok = sorted((s for s in rows if s["reward"] >= floor), key=lambda s: -s["reward"])[:2]
        kept[key] = [s["reward"] for s in ok]
        assert [r["reward"] for r in records.get(key, [])] == kept[key], key
    assert sorted(len(v) for v in kept.values())[0] == 0 and max(len(v) for v in kept.values()) == 2
    done = {json.dumps(d["id"]): d["kept"] for d in read_jsonl(f"{out}.done")}
    assert done == {k: len(v) for k, v in kept.items()}  # a prompt that kept none is done too
    assert (summary["kept"], summary["prompts_none_kept"]) == (sum(map(len, kept.values())),
                                                                sum(not v for v in kept.values()))
    before = [p.read_bytes() for p in (out, tmp_path / "s.jsonl", Path(f"{out}.done"))]
    capsys.readouterr()
    again = run(models, engines, first[0], out, *extra)
    assert (again["prompts"], again["already_done"]) == (0, 4)
    assert "nothing new to run" in capsys.readouterr().err
    assert [p.read_bytes() for p in (out, tmp_path / "s.jsonl", Path(f"{out}.done"))] == before


FNS = '''
import math
CALLS = []

def by_length(prompts, completions, **kw):
    CALLS.append(dict(prompts=prompts, completions=completions, **kw))
    return [float(len(c)) if isinstance(c, str) else None for c in completions]
'''


def bonus(prompts, completions, bonus=None, **kw):
    return [None] * len(completions) if bonus is None else bonus


def test_reward_functions_get_trls_arguments_and_are_weighted(models, engines, first, tmp_path, monkeypatch,
                                                             capsys):
    """Two functions (a file's, a module's), weights 2 and -0.5: text prompts get 2*len - 0.5*bonus; a
    chat prompt gets -0.5*bonus, all tied (the first sample kept); one no function judges keeps none."""
    (tmp_path / "myrewards.py").write_text(FNS)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    lines = [{"id": "t1", "prompt": LINES[0]["prompt"], "bonus": 3},
             {"id": "c", "prompt": USER, "bonus": 1.5},
             {"id": "none", "prompt": USER},
             {"id": "long", "prompt": "x" * 130}]
    inp, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "best.jsonl"
    summary = run(models, engines, inp, out, "--reward-fn", f"{tmp_path / 'myrewards.py'}:by_length", "--reward-fn",
                  "test_rejection_sample:bonus", "--reward-weights", 2, -0.5, "--keep", 2,
                  "--samples-output", tmp_path / "s.jsonl")
    # the user's turn in the chat layout: len(chat_ids([{"role": "user", "content": "x" * 130}], True))
    assert "in.jsonl:4: error: prompt of 153 tokens" in capsys.readouterr().err
    assert (summary["prompts"], summary["errors"], summary["prompts_none_kept"]) == (3, 1, 1)
    samples, records = by_id(read_jsonl(tmp_path / "s.jsonl")), by_id(read_jsonl(out))
    want = {'"t1"': [2 * len(s["text"]) - 1.5 for s in samples['"t1"']], '"c"': [-0.75] * N, '"none"': [None] * N}
    assert {k: [s["reward"] for s in v] for k, v in samples.items()} == want
    order = sorted(range(N), key=lambda k: (-want['"t1"'][k], k))[:2]
    assert [r["messages"][-1]["content"] for r in records['"t1"']] == [samples['"t1"'][k]["text"] for k in order]
    assert [r["messages"][-1]["content"] for r in records['"c"']] == [samples['"c"'][k]["text"] for k in (0, 1)]
    assert '"none"' not in records and '"long"' not in records
    import sys
    calls = next(m for n, m in sys.modules.items() if n.startswith("llama3_jax_reward_myrewards")).CALLS
    assert len(calls) == 3  # one call per prompt, in the order the prompts finish
    calls = {c["id"][0]: c for c in calls}
    assert {k: c["prompts"] for k, c in calls.items()} == {"t1": [lines[0]["prompt"]] * N, "c": [USER] * N,
                                                           "none": [USER] * N}
    assert calls["t1"]["completions"] == [s["text"] for s in samples['"t1"']]
    assert calls["c"]["completions"] == [[{"role": "assistant", "content": s["text"]}] for s in samples['"c"']]
    assert calls["t1"]["bonus"] == [3] * N and "bonus" not in calls["none"]
    for ids, s in zip(calls["t1"]["completion_ids"], samples['"t1"']):  # the bytes ids of the text (+ specials)
        assert bytes(t for t in ids if t < 256).decode("utf-8", "replace") == s["text"] and len(ids) <= 6


def test_a_failing_reward_function_is_one_line_naming_it_and_the_line(models, engines, tmp_path, capsys):
    (tmp_path / "bad.py").write_text(
        "def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def word(prompts, completions, **kw):\n    return ['good'] * len(completions)\n"
        "def inf(prompts, completions, **kw):\n    return [float('inf')] * len(completions)\n"
        "x = 3\n")
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hello"}])
    why = {"boom": "raised KeyError: 'answer'", "short": "returned 1 rewards for 4 completions",
           "word": "returned 'good' for completion 0, not a number or None", "inf": "returned inf for completion 0"}
    for name, msg in why.items():
        with pytest.raises(ValueError) as e:
            run(models, engines, inp, tmp_path / f"{name}.jsonl", "--reward-fn", f"{tmp_path}/bad.py:{name}")
        assert str(e.value).startswith(f"{inp}:1: reward function {tmp_path}/bad.py:{name} {msg}"), str(e.value)
        assert "\n" not in str(e.value)
    capsys.readouterr()
    for spec, msg in ((f"{tmp_path}/bad.py:x", "x is a int, not a function"),
                      (f"{tmp_path}/nope.py:f", "no such file"), ("no_such_module_xyz:f", "No module named"),
                      (f"{tmp_path}/bad.py:nothing", "has no attribute 'nothing'")):
        assert main(["rejection-sample", "--policy", str(tmp_path / "absent"), "--input", str(inp), "--output",
                     str(tmp_path / "o.jsonl"), "--reward-fn", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"llama3-jax rejection-sample: error: --reward-fn {spec}: ") and msg in err, err
    assert main(["rejection-sample", "--policy", "x", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                 "--reward-fn", f"{tmp_path}/bad.py:boom", "--reward-weights", "1", "2"]) == 2
    assert "--reward-weights has 2 values for 1 reward sources" in capsys.readouterr().err
    # each model refused in one line before either is restored
    for policy, rm, msg in ((models[2], models[2],
                             f"--policy {models[2]}: a reward model has no output layer; use score"),
                            (models[1], models[1], f"{models[1]}: not a reward model (its head is 'lm'); score gives "
                                                   f"a policy's log-probs")):
        assert main(["rejection-sample", "--policy", str(policy), "--reward-model", str(rm), "--input", str(inp),
                     "--output", str(tmp_path / "o.jsonl")]) == 2
        assert capsys.readouterr().err.strip() == f"llama3-jax rejection-sample: error: {msg}"
    assert not (tmp_path / "o.jsonl").exists()


def test_killed_between_records_and_done_lines_then_rerun_loses_and_doubles_nothing(models, engines, tmp_path):
    lines = [{"id": i, "prompt": f"prompt number {i}:"} for i in range(6)]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    extra = ["--reward-model", models[2], "--keep", 2]
    ref = tmp_path / "ref.jsonl"
    run(models, engines, inp, ref, *extra, "--samples-output", tmp_path / "ref.s.jsonl")
    out = tmp_path / "best.jsonl"
    cmd = cli("rejection-sample", "--policy", models[1], "--input", inp, "--output", out, "--num-samples", N,
        "--max-new-tokens", 6, "--seed", 1, "--dtype", "float32", "--tokenizer", "bytes", "--batch-size", 4,
        *extra, "--samples-output", tmp_path / "s.jsonl")
    env = cli_env()
    run_killed_at(cmd, env, "rejection.write:2")
    done = {d["id"] for d in read_jsonl(f"{out}.done")}
    assert done and {r["id"] for r in read_jsonl(out)} - done  # records of unfinished prompts were left
    run_ok(cmd, env)
    for got, want in ((out, ref), (tmp_path / "s.jsonl", tmp_path / "ref.s.jsonl")):
        # the reward model's batches group other rows after the resume: rewards equal to float32 rounding
        key = lambda r: json.dumps({k: v for k, v in r.items() if k != "reward"}, sort_keys=True)  # noqa: E731
        got_rows, want_rows = sorted(read_jsonl(got), key=key), sorted(read_jsonl(want), key=key)
        assert [key(r) for r in got_rows] == [key(r) for r in want_rows]
        assert [r["reward"] for r in got_rows] == pytest.approx([r["reward"] for r in want_rows], abs=1e-5)
    assert sorted(d["id"] for d in read_jsonl(f"{out}.done")) == list(range(6))
    assert all(math.isfinite(r["reward"]) for r in read_jsonl(out))
