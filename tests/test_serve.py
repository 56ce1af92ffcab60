"""`llama3-jax serve` against the real `openai` client over real sockets.

One server per module (a subprocess on a tiny converted model with Llama 3's 128K vocabulary, so text
and chat go through the real tokenizer) keeps compiles few. Its answers are compared with the offline
paths (`generate`, `score`: serve/offline.py on the same checkpoint and engine flags) and, for the
log-prob alternatives, with transformers' log-softmax. The SIGTERM test ends the server: it runs last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

from conftest import make_hf_llama  # noqa: E402
from serve_helpers import start_server, stop_server  # noqa: E402

KEY, NAME, BATCH, QUEUE, BODY = "sk-test", "tiny", 8, 16, 1_000_000
ENGINE = ["--dtype", "float32", "--batch-size", str(BATCH)]
PROMPTS = ["The capital of France is", "Once upon a time", "def main():", "1, 2, 3,", "Hello, my name is Ana and"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from llama3_jax.convert import convert
    d = tmp_path_factory.mktemp("serve")
    hf = make_hf_llama(d / "hf", vocab=128256, dim=16, layers=1, heads=2, kv_heads=1, head_dim=8, ffn=32,
                       max_pos=256, init_range=0.5)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return d / "jax", hf


@pytest.fixture(scope="module")
def server(model):
    """The server subprocess; `seen`: the /health statuses it answered while starting."""
    proc, url, seen = start_server(model[0], "--served-model-name", NAME, "--max-queue", str(QUEUE),
                                   "--max-body-bytes", str(BODY), *ENGINE, key=KEY)
    yield argparse.Namespace(proc=proc, url=url, seen=seen)
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def gen(model):
    from llama3_jax.serve.engine import Generator
    return Generator(model[0], dtype="float32")


def offline(gen, tmp_path, lines, command="generate", **flags) -> dict:
    """The offline job on these lines -> {id: record} ({id: [records by sample]} for n > 1)."""
    from llama3_jax.serve.offline import run_generate, run_score
    inp, out = tmp_path / f"{command}_in.jsonl", tmp_path / f"{command}_out.jsonl"
    out.unlink(missing_ok=True)
    filler = {"prompt": "fill", "max_new_tokens": 1} if command == "generate" else {"prompt": "a", "completion": "b"}
    fill = [{"id": f"_fill{i}", **filler} for i in range(BATCH - len(lines))]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines + fill))  # BATCH rows at least: the same shapes
    args = {**dict(checkpoint=None, input=str(inp), output=str(out), batch_size=BATCH, dtype="float32", tokenizer=None,
                   max_new_tokens=None, temperature=0.0, top_k=0, top_p=1.0, seed=0, ignore_eos=False), **flags}
    (run_generate if command == "generate" else run_score)(argparse.Namespace(**args), generator=gen)
    rows: dict = {}
    for r in map(json.loads, out.read_text().splitlines()):
        if "sample" in r:
            rows.setdefault(r["id"], {})[r["sample"]] = r
        else:
            rows[r["id"]] = r
    return rows


def metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_health_is_503_until_ready_and_models_lists_the_served_name(server, client, gen):
    assert 503 in server.seen and server.seen.index(503) < server.seen.index(200)
    [m] = client.models.list().data
    assert m.id == NAME and m.model_extra["max_model_len"] == gen.cfg.max_seq_len == 256


def test_greedy_completions_equal_generate_and_streams_add_up(server, client, gen, tmp_path):
    want = offline(gen, tmp_path, [{"id": i, "prompt": p, "max_new_tokens": 12 + i} for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        r = client.completions.create(model=NAME, prompt=p, max_tokens=12 + i, temperature=0)
        [c] = r.choices
        assert (c.text, c.finish_reason) == (want[i]["text"], want[i]["finish_reason"]), i
        assert r.usage.prompt_tokens == len(gen.tokenizer.encode(p)) and r.usage.completion_tokens >= 1
        chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=12 + i, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == c.text
        assert [ch.choices[0].finish_reason for ch in chunks][-1] == c.finish_reason
    # a list of prompts, and token ids as the prompt: the same answers, choices in prompt order
    r = client.completions.create(model=NAME, prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [want[0]["text"], want[1]["text"][:len(r.choices[1].text)],
                                           want[2]["text"][:len(r.choices[2].text)]]
    ids = gen.tokenizer.encode(PROMPTS[0])
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0).choices[0].text == want[0]["text"]


def test_chat_equals_generate_on_messages_and_its_stream_reports_usage(server, client, gen, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    want = offline(gen, tmp_path, [{"id": "m", "messages": messages, "max_new_tokens": 20}])["m"]
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=20, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want["text"], want["finish_reason"])
    assert r.usage.prompt_tokens == len(gen.tokenizer.encode_dialog(messages))
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want["text"]
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n_and_seed_give_generates_samples_and_repeat(server, client, gen, tmp_path):
    knobs = dict(temperature=0.9, top_p=0.95, seed=5)
    want = offline(gen, tmp_path, [{"id": "s", "prompt": PROMPTS[1], "n": 3, "max_new_tokens": 10, **knobs}])["s"]
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], n=3, max_tokens=10, **knobs)
    texts = [c.text for c in r.choices]
    assert texts == [want[k]["text"] for k in range(3)] and len(set(texts)) == 3
    again = client.completions.create(model=NAME, prompt=PROMPTS[1], n=3, max_tokens=10, stream=True, **knobs)
    got = ["", "", ""]
    for ch in again:
        got[ch.choices[0].index] += ch.choices[0].text
    assert got == texts
    other = client.completions.create(model=NAME, prompt=PROMPTS[1], n=3, max_tokens=10, **{**knobs, "seed": 6})
    assert [c.text for c in other.choices] != texts


def test_stop_strings_cut_as_generate_does_streaming_or_not(server, client, gen, tmp_path):
    full = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = offline(gen, tmp_path, [{"id": "x", "prompt": PROMPTS[0], "max_new_tokens": 30, "stop": [stop]}],
                   ignore_eos=True)["x"]
    assert want["finish_reason"] == "stop" and len(want["text"]) < len(full)
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop,
                                      stream=stream, extra_body={"ignore_eos": True})
        chunks = list(r) if stream else r.choices
        text = "".join(ch.choices[0].text for ch in chunks) if stream else chunks[0].text
        reason = chunks[-1].choices[0].finish_reason if stream else chunks[0].finish_reason
        assert (text, reason) == (want["text"], "stop"), stream


def test_a_stop_string_across_a_host_visit_is_never_streamed(server, client, gen, tmp_path):
    """Tokens stream once per host visit (DECODE_STEPS decode steps); a stop string whose first
    character came in one visit and the rest in the next must not have been sent: the stream still
    adds up to the cut text."""
    from llama3_jax.serve.scheduler import DECODE_STEPS
    lines = [{"id": i, "prompt": p, "max_new_tokens": DECODE_STEPS + 8} for i, p in enumerate(PROMPTS)]
    full = offline(gen, tmp_path, lines, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        toks, decode = full[i]["tokens"], gen.tokenizer.decode
        a, b = decode(toks[:DECODE_STEPS]), decode(toks[:DECODE_STEPS + 1])
        if a and b.startswith(a) and len(b) > len(a) and "\ufffd" not in b:
            stop = a[-1] + b[len(a)]
            if b.find(stop) == len(a) - 1:
                break
    else:
        pytest.fail("no prompt with a stop string across the first visit's end")
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=DECODE_STEPS + 8, temperature=0,
                                            stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) >= 2 and "".join(ch.choices[0].text for ch in chunks) == a[:-1]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_logprobs_equal_score_and_alternatives_equal_transformers(server, client, gen, model, tmp_path):
    text = "The quick brown fox jumps over the lazy dog"
    ids = gen.tokenizer.encode(text)
    r = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=5)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    want = offline(gen, tmp_path, [{"id": 0, "prompt_tokens": ids[:1], "completion_tokens": ids[1:]}], "score")[0]
    np.testing.assert_allclose(lp.token_logprobs[1:], want["logprobs"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = torch.log_softmax(model[1](torch.tensor([ids])).logits[0].double(), -1).numpy()
    for t in range(1, len(ids)):
        assert lp.tokens[t] == gen.tokenizer.decode([ids[t]])
        np.testing.assert_allclose(sorted(lp.top_logprobs[t].values(), reverse=True),
                                   np.sort(ref[t - 1])[::-1][:5], rtol=1e-4, atol=1e-4)
    # generated tokens: greedy takes the likeliest, so its log-prob is the top alternative, and score agrees
    g = client.completions.create(model=NAME, prompt=text, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True}).choices[0]
    toks = gen.tokenizer.encode(g.text, bos=False)
    assert [max(d.values()) for d in g.logprobs.top_logprobs] == pytest.approx(g.logprobs.token_logprobs, abs=1e-6)
    if gen.tokenizer.encode(text + g.text) == ids + toks:  # the text re-encodes to the same tokens
        s = offline(gen, tmp_path, [{"id": 1, "prompt_tokens": ids, "completion_tokens": toks}], "score")[1]
        np.testing.assert_allclose(g.logprobs.token_logprobs, s["logprobs"], rtol=1e-5, atol=1e-5)
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3).choices[0]
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6) and len(e.top_logprobs) == 3
               for e in c.logprobs.content)


def test_sixteen_concurrent_clients_each_get_their_solo_result(server, client, gen, tmp_path):
    lines = [{"id": i, "prompt": PROMPTS[i % 5] + " x" * (i % 4), "max_new_tokens": 8 + 3 * i,
              **({"temperature": 0.8, "seed": i} if i % 2 else {})} for i in range(16)]
    want = offline(gen, tmp_path, lines)
    got: dict = {}

    def ask(line):
        kw = dict(model=NAME, prompt=line["prompt"], max_tokens=line["max_new_tokens"],
                  temperature=line.get("temperature", 0), seed=line.get("seed"))
        if line["id"] % 3:
            got[line["id"]] = client.completions.create(**kw).choices[0].text
        else:
            got[line["id"]] = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True))

    threads = [threading.Thread(target=ask, args=(x,)) for x in lines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {i: want[i]["text"] for i in range(16)}


def test_bad_requests_get_openais_error_shapes_and_the_server_goes_on(server, client, gen):
    def error(status, fn, *args, **kw):
        with pytest.raises(openai.APIStatusError) as e:
            fn(*args, **kw)
        assert e.value.status_code == status
        body = e.value.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"} and "Traceback" not in e.value.response.text
        assert client.completions.create(model=NAME, prompt="ok", max_tokens=2).choices[0].text  # goes on
        return body["error"]

    for key in ("wrong", None):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        headers = {"Authorization": f"Bearer {key}"} if key else {"Authorization": ""}
        assert error(401, c.with_options(default_headers=headers).completions.create, model=NAME, prompt="x")["code"] \
            == "invalid_api_key"
    assert error(404, client.completions.create, model="llama-9", prompt="x")["code"] == "model_not_found"
    assert error(404, client.get, "/nowhere", cast_to=object)["code"] == "unknown_url"
    n = len(gen.tokenizer.encode("word " * 200))
    e = error(400, client.completions.create, model=NAME, prompt="word " * 200, max_tokens=100)
    assert e["param"] == "max_tokens" and f"has {n} tokens and max_tokens is 100: {n + 100 - 256} tokens too many" \
        in e["message"]
    e = error(400, client.chat.completions.create, model=NAME, messages=[{"role": "user", "content": "a " * 300}])
    assert "too many" in e["message"]
    assert error(400, client.completions.create, model=NAME, prompt="x", temperature=-1)["param"] == "temperature"
    assert error(400, client.completions.create, model=NAME, prompt=[10**7])["param"] == "prompt"
    assert error(400, client.chat.completions.create, model=NAME, messages=[{"role": "robot", "content": "x"}])
    assert error(400, client.completions.create, model=NAME, prompt="x", n=BATCH + QUEUE + 1)["param"] == "n"
    assert error(413, client.completions.create, model=NAME, prompt="y" * BODY)["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_full_queue_answers_429_and_a_client_gone_frees_its_rows(server, client):
    before = metrics(server)
    budget = 200
    stream = client.completions.create(model=NAME, prompt="Go", max_tokens=budget, temperature=0, n=BATCH + QUEUE,
                                       stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=NAME, prompt="one more", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
    stream.close()  # the client goes away: its rows leave their slots and the queue at the next host visit
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["llama3_jax_requests_running"] == m["llama3_jax_requests_waiting"] == 0:
            break
        time.sleep(0.05)
    made = m["llama3_jax_generation_tokens_total"] - before["llama3_jax_generation_tokens_total"]
    assert m["llama3_jax_requests_running"] == m["llama3_jax_requests_waiting"] == 0
    assert made < (BATCH + QUEUE) * budget / 2, made
    assert client.completions.create(model=NAME, prompt="after", max_tokens=3).choices[0].text


def test_metrics_count_tokens_requests_and_latencies(server, client):
    before = metrics(server)
    r = client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})
    m = metrics(server)
    d = {k: m[k] - before.get(k, 0) for k in m}
    assert d["llama3_jax_prompt_tokens_total"] == r.usage.prompt_tokens
    assert d["llama3_jax_generation_tokens_total"] == r.usage.completion_tokens == 40
    assert d['llama3_jax_requests_total{route="/v1/completions",status="200"}'] == 1
    assert d["llama3_jax_time_to_first_token_seconds_count"] == 1
    assert d["llama3_jax_inter_token_latency_seconds_count"] >= 1  # 40 tokens: more than one host visit
    for name in ("llama3_jax_requests_running", "llama3_jax_requests_waiting", "llama3_jax_kv_pages_in_use",
                 'llama3_jax_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert name in m


def test_binding_another_address_without_a_key_warns(tmp_path):
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "llama3_jax.cli", "serve", "--checkpoint", str(tmp_path / "none"), *extra],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "LLAMA3_JAX_API_KEY"})
    warned = run("--host", "0.0.0.0")
    assert warned.returncode == 2 and "warning: binding 0.0.0.0 without an API key" in warned.stderr
    assert "--checkpoint not found" in warned.stderr
    for extra in (["--host", "0.0.0.0", "--api-key", "k"], []):
        assert "warning" not in run(*extra).stderr


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(server, client, gen, tmp_path):
    """Runs last: it ends the module's server."""
    want = offline(gen, tmp_path, [{"id": 0, "prompt": PROMPTS[2], "max_new_tokens": 120}], ignore_eos=True)[0]
    stream = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=120, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    text = next(it).choices[0].text
    server.proc.send_signal(signal.SIGTERM)
    rest = list(it)
    assert text + "".join(ch.choices[0].text for ch in rest) == want["text"]
    assert rest[-1].choices[0].finish_reason == "length"
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health")
