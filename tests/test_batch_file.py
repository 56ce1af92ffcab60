"""OpenAI batch files through `generate` give the live server's bodies for the same requests.

One `serve` subprocess per module (a tiny converted model with Llama 3's 128K vocabulary, as
test_serve.py) answers each request over a real socket; `generate` (serve/offline.py, in this process,
on the same checkpoint and engine flags) answers the same requests from a batch file. Their bodies
must be equal but for `id` and `created` (log-probs to float32 rounding: the server scores a growing
row per delta, the file once per finished row). Then a resume from a partial output (a torn last line
included) must give what the uninterrupted run gave, without running the lines already written again.
"""

from __future__ import annotations

import argparse
import json

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")

from conftest import make_hf_llama  # noqa: E402
from serve_helpers import start_server, stop_server  # noqa: E402

NAME, BATCH = "tiny", 8
ENGINE = ["--dtype", "float32", "--batch-size", str(BATCH)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]


def requests(stop: str) -> list[tuple[str, str, dict]]:
    """(custom_id, url, body): chat and completions, n > 1, stop, log-probs, echo, and a bad body."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    return [
        ("greedy", c, {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
        ("sampled-n", c, {"prompt": "Once upon a time", "n": 3, "max_tokens": 10, "temperature": 0.9, "seed": 7}),
        ("stop", c, {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "stop": [stop]}),
        ("logprobs", c, {"prompt": ["def main():", "1, 2, 3,"], "max_tokens": 5, "temperature": 0, "logprobs": 3,
                         "echo": True}),
        ("score-only", c, {"prompt": "Hello, my name is Ana", "max_tokens": 0, "echo": True, "logprobs": 2}),
        ("chat", ch, {"messages": CHAT, "max_completion_tokens": 20, "temperature": 0, "logprobs": True,
                      "top_logprobs": 2}),
        ("chat-n", ch, {"messages": CHAT, "max_tokens": 8, "n": 2, "temperature": 1.0, "top_p": 0.9, "seed": 3,
                        "stop": "\n"}),
        ("bad-temperature", c, {"prompt": "x", "temperature": 5}),
        ("bad-too-long", c, {"prompt": "word " * 300, "max_tokens": 4}),
        ("bad-route", "/v1/embeddings", {"input": "x"}),
    ]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from llama3_jax.convert import convert
    d = tmp_path_factory.mktemp("batch")
    make_hf_llama(d / "hf", vocab=128256, dim=16, layers=1, heads=2, kv_heads=1, head_dim=8, ffn=32, max_pos=256,
                  init_range=0.5)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return d / "jax"


@pytest.fixture(scope="module")
def server(model):
    proc, url, _ = start_server(model, "--served-model-name", NAME, *ENGINE)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def gen(model):
    from llama3_jax.serve.engine import Generator
    return Generator(model, dtype="float32")


def same(a, b, where="body"):
    """Equal JSON but for id/created, floats to float32 rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - {"id", "created"}
        assert keys == set(b) - {"id", "created"}, where
        for k in keys:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), where
    else:
        assert a == b, where


def write_batch(path, reqs) -> None:
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"model": NAME, **body}})
             for cid, url, body in reqs]
    # a line that is not JSON and one without a custom_id: reported and skipped, as generate's bad lines
    lines[2:2] = ['{"custom_id": "torn", "method": ', json.dumps({"method": "POST", "url": "/v1/completions"})]
    path.write_text("\n".join(lines) + "\n")


def run_file(gen, model, inp, out) -> dict:
    from llama3_jax.serve.offline import run_generate
    args = argparse.Namespace(checkpoint=str(model), input=str(inp), output=str(out), batch_size=BATCH,
                              dtype="float32", tokenizer=None, max_new_tokens=None, temperature=0.0, top_k=0,
                              top_p=1.0, seed=0, ignore_eos=False)
    return run_generate(args, generator=gen)


def by_custom_id(path) -> dict:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    out = {r["custom_id"]: r for r in lines}
    assert len(out) == len(lines), "a custom_id answered twice"
    return out


def test_a_batch_file_gives_the_servers_bodies_and_resumes(server, gen, model, tmp_path, capfd):
    greedy = httpx.post(server + "/v1/completions", json={"model": NAME, "prompt": "The capital of France is",
                                                         "max_tokens": 12, "temperature": 0}, timeout=60).json()
    text = greedy["choices"][0]["text"]
    assert len(text) >= 6
    reqs = requests(stop=text[3:6])
    want = {}
    for cid, url, body in reqs:
        r = httpx.post(server + url, json={"model": NAME, **body}, timeout=60)
        want[cid] = (r.status_code, r.json())
    assert want["stop"][1]["choices"][0]["finish_reason"] == "stop"
    assert [want[c][0] for c in ("bad-temperature", "bad-too-long", "bad-route")] == [400, 400, 404]

    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    write_batch(inp, reqs)
    summary = run_file(gen, model, inp, out)
    err = capfd.readouterr().err
    assert f"{inp}:3: skipped: invalid JSON" in err and f"{inp}:4: skipped: missing 'custom_id'" in err
    assert (summary["requests"], summary["errors"], summary["skipped_lines"]) == (7, 3, 2)
    got = by_custom_id(out)
    assert set(got) == set(want)
    for cid, (status, body) in want.items():
        line = got[cid]
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"], cid
        assert line["response"]["status_code"] == status, cid
        same(line["response"]["body"], body, cid)
        assert line["error"] == (body["error"] if status != 200 else None), cid

    # a partial output: three lines (one of them an error line, tried again), then a torn fourth
    order = out.read_text().splitlines(keepends=True)
    errs = [x for x in order if json.loads(x)["error"] is not None]
    oks = [x for x in order if json.loads(x)["error"] is None]
    partial = tmp_path / "partial.jsonl"
    partial.write_text(oks[0] + errs[0] + oks[1] + oks[2][:len(oks[2]) // 2])
    summary = run_file(gen, model, inp, partial)
    assert summary["already_done"] == 2 and summary["requests"] == 5
    resumed = by_custom_id(partial)
    assert set(resumed) == set(got)
    for cid, line in resumed.items():
        assert line["response"]["status_code"] == got[cid]["response"]["status_code"], cid
        same(line["response"]["body"], got[cid]["response"]["body"], cid)
    kept = {json.loads(x)["custom_id"]: json.loads(x)["id"] for x in (oks[0], oks[1])}
    assert {cid: resumed[cid]["id"] for cid in kept} == kept  # not run again
