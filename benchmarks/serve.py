"""Serving under load: `llama3-jax serve` against offline `generate` and transformers' own OpenAI server.

    python benchmarks/serve.py                                   # tiny.yaml's shape, 128K vocabulary, float32
    python benchmarks/serve.py --concurrency 8 --requests 16 --output-len 16 32 --repeats 1   # a quick run

One random Llama-3-shaped `transformers.LlamaForCausalLM` (the real 128,256-token vocabulary, so prompts
are text through Llama 3's tokenizer) is saved with an HF copy of that tokenizer and converted with
`llama3-jax convert`; the same seeded workload then runs through:
  * offline: `Generator.generate_requests` (the engine of `llama3-jax generate`) on all requests at
    once, --batch-size slots: the throughput the engine gives with no HTTP in the way;
  * llama3-jax serve (--batch-size slots) and `transformers serve --continuous-batching` (its paged
    continuous batching on CPU), each a subprocess, driven by the same load generator: requests arrive
    as a Poisson process of --rate requests/s (`inf`: all at once, i.e. saturation), at most
    --concurrency streaming clients in flight, prompt lengths (words of one token each) and output
    lengths uniform in their ranges, drawn from --seed. Every row decodes exactly its max_tokens
    (`ignore_eos` for llama3-jax; transformers' generation config has no EOS), greedy.
Throughput = generated tokens / wall time from the first request to the last token. Time to first
token (TTFT) = request sent to the first streamed text; inter-token latency (ITL) = the gaps between a
stream's successive text chunks, pooled over requests (a server that streams a burst of tokens per
chunk shows its burst period here: llama3-jax sends up to 32 per host visit); time per output token
(TPOT) of a request = (its last text's time - its first's) / (tokens - 1). p50/p99 over requests
(TTFT, TPOT) or gaps (ITL). Each server gets one warm-up
pass of the whole workload (compiles, oneDNN kernels), then --repeats timed passes; the best pass
(throughput) is reported. The three run one after the other, never at once, so none competes with
another for the CPU (the load generator itself shares the machine with the server it drives).

XLA:CPU's YNN dot fusion is turned off for the offline run and the llama3-jax server alike, as
benchmarks/decode.py does (see docs/performance.md); `--xla-defaults` keeps it.
Prints a markdown table and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his her this which or had not are but be have "
         "one all were they an their there been has when who will more no if out so said what up its about "
         "than into them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still "
         "own see men work long get here between both life being under never day same another know while last "
         "might us great old year off come since against go came right used take three").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="decode slots of llama3-jax (offline and server)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 16],
                   help="streaming clients in flight at most (each value is one measurement per server)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals, requests/s (inf: all at once)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("LO", "HI"),
                   help="prompt words (one token each), uniform")
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 64], metavar=("LO", "HI"),
                   help="max_tokens per request, uniform; each row decodes exactly that many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement after the warm-up; best kept")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--xla-defaults", action="store_true", help="keep XLA:CPU's YNN dot fusion (see the docstring)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a server may take to become ready")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ the workload


def workload(args, tokenizer) -> list[dict]:
    """Seeded requests: {prompt (text), prompt_tokens, max_tokens, at (arrival offset, s)}."""
    rng = np.random.default_rng(args.seed)
    words = [w for w in WORDS if len(tokenizer.encode(" " + w, bos=False, eos=False)) == 1]
    at, out = 0.0, []
    for _ in range(args.requests):
        n = int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))
        text = " ".join(rng.choice(words, n)).capitalize()
        m = int(rng.integers(args.output_len[0], args.output_len[1] + 1))
        out.append({"prompt": text, "prompt_tokens": len(tokenizer.encode(text, bos=True, eos=False)),
                    "max_tokens": m, "at": at})
        if math.isfinite(args.rate):
            at += float(rng.exponential(1 / args.rate))
    return out


def make_model(args, root: Path) -> tuple[Path, Path]:
    """A random HF Llama with an HF tokenizer (transformers serve reads it) and its llama3-jax conversion."""
    import torch
    import transformers
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama3_jax.convert import convert
    from llama3_jax.tokenizer import default_tokenizer_path, special_token_names
    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        rms_norm_eps=1e-5, max_position_embeddings=args.max_seq_len, rope_theta=500000.0,
        bos_token_id=128000, eos_token_id=128001)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # transformers decodes every row to its max_tokens
    model.save_pretrained(root / "hf")
    specials = special_token_names()
    tok = TikTokenConverter(vocab_file=str(default_tokenizer_path()), extra_special_tokens=specials).converted()
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single=f"{specials[0]} $A", special_tokens=[(specials[0], 128000)])])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1]
                                         ).save_pretrained(root / "hf")
    convert(root / "hf", root / "jax", src_format="hf", dst_format="jax", progress=False)
    return root / "hf", root / "jax"


# ------------------------------------------------------------------------------------------ offline


def offline(args, ckpt: Path, work: list[dict]) -> dict:
    """The engine alone on all requests at once: best of --repeats after a warm-up."""
    from llama3_jax.serve.engine import Generator
    gen = Generator(ckpt, dtype="float32")
    reqs = [gen.request(gen.tokenizer.encode(w["prompt"], bos=True, eos=False), w["max_tokens"]) for w in work]
    want = sum(w["max_tokens"] for w in work)

    def run() -> float:
        t = time.perf_counter()
        got = [c for batch in gen.generate_requests(reqs, ignore_eos=True, batch_size=args.batch_size,
                                                    decode_text=False) for _, c in batch]
        assert sum(len(c.tokens) for c in got) == want
        return time.perf_counter() - t

    print("offline generate: warm-up + runs ...", file=sys.stderr)
    run()
    best = min(run() for _ in range(args.repeats))
    return {"tokens": want, "seconds": best, "tokens_per_s": want / best}


# ------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float, env: dict) -> tuple[subprocess.Popen, float]:
    """A server subprocess, once its /health answers 200; -> (process, seconds to ready)."""
    import httpx
    log = tempfile.TemporaryFile("w+")
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, time.monotonic() - t
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(proc)
    log.seek(0)
    raise RuntimeError(f"{cmd[:3]} did not become ready:\n{log.read()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client, url: str, body: dict, w: dict, t0: float, sem: asyncio.Semaphore) -> dict:
    """One streaming request at its arrival time: timings of its text chunks and its token count."""
    await asyncio.sleep(max(0.0, t0 + w["at"] - time.perf_counter()))
    async with sem:
        sent = time.perf_counter()
        times, tokens, finish = [], None, None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        times.append(time.perf_counter())
                    finish = c.get("finish_reason") or finish
    if tokens != w["max_tokens"] or finish != "length":
        raise RuntimeError(f"a request asked {w['max_tokens']} tokens and got {tokens} ({finish})")
    return {"ttft": times[0] - sent, "tpot": (times[-1] - times[0]) / max(1, tokens - 1),
            "gaps": np.diff(times).tolist(), "tokens": tokens, "end": times[-1]}


async def drive(url: str, model: str, work: list[dict], concurrency: int, extra: dict) -> dict:
    """The load generator: every request of `work` at its arrival, at most `concurrency` in flight."""
    import httpx
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*[
            one_request(client, url, {"model": model, "prompt": w["prompt"], "max_tokens": w["max_tokens"],
                                      "temperature": 0, "stream": True, **extra}, w, t0, sem) for w in work])
    wall = max(d["end"] for d in done) - t0
    tokens = sum(d["tokens"] for d in done)
    pct = {"ttft": [d["ttft"] for d in done], "tpot": [d["tpot"] for d in done],
           "itl": [g for d in done for g in d["gaps"]] or [0.0]}
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            **{f"{k}_p{q}": float(np.percentile(v, q)) for k, v in pct.items() for q in (50, 99)}}


def measure(args, name: str, cmd: list[str], url: str, model: str, work: list[dict], extra: dict, env: dict) -> dict:
    """Start a server, warm it with the workload once, time each concurrency (best of --repeats), stop it."""
    print(f"{name}: starting ...", file=sys.stderr)
    proc, ready = start(cmd, url, args.timeout, env)
    try:
        out = {"ready_s": ready}
        for c in args.concurrency:
            print(f"{name}: concurrency {c}: warm-up + {args.repeats} runs ...", file=sys.stderr)
            asyncio.run(drive(url, model, work, c, extra))
            runs = [asyncio.run(drive(url, model, work, c, extra)) for _ in range(args.repeats)]
            out[c] = max(runs, key=lambda r: r["tokens_per_s"])
        return out
    finally:
        stop(proc)


# ---------------------------------------------------------------------------------------------- main


def report(args, work, results: dict, load: list[float]) -> None:
    import jax
    import transformers
    p = np.array([w["prompt_tokens"] for w in work])
    m = np.array([w["max_tokens"] for w in work])
    off = results["offline"]
    print(f"\n### Serving under load (float32, greedy, every row decodes its max_tokens; {args.requests} requests, "
          f"prompts {p.min()}-{p.max()} tokens (mean {p.mean():.0f}), outputs {m.min()}-{m.max()} tokens "
          f"(mean {m.mean():.0f}), arrivals {'all at once' if math.isinf(args.rate) else f'Poisson {args.rate}/s'}, "
          f"seed {args.seed})\n")
    print(f"- model: Llama-3-shaped, random weights: dim {args.dim}, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} kv heads x {args.head_dim}, mlp {args.ffn}, vocab 128256")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
          f"transformers {transformers.__version__}; llama3-jax --batch-size {args.batch_size}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {load[0]:.1f} before, {load[1]:.1f} after; "
          f"best of {args.repeats} after a warm-up")
    ready = ", ".join(f"{k} {results[k]['ready_s']:.1f} s" for k in ("llama3-jax serve", "transformers serve")
                      if k in results)
    print(f"- start to ready: {ready}; offline generate: {off['tokens_per_s']:.1f} tokens/s\n")
    print("| server | concurrency | tokens/s | / offline generate | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | "
          "ITL p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | llama3-jax / transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        ours = results["llama3-jax serve"][c]
        theirs = results.get("transformers serve", {}).get(c)
        for name, r in (("llama3-jax serve", ours), ("transformers serve", theirs)):
            if r is None:
                continue
            vs = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if theirs and r is ours else ""
            print(f"| {name} | {c} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / off['tokens_per_s']:.2f} | "
                  f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {1e3 * r['itl_p50']:.1f} | {1e3 * r['itl_p99']:.1f} | "
                  f"{1e3 * r['tpot_p50']:.1f} | {1e3 * r['tpot_p99']:.1f} | {vs} |")
    print(json.dumps({"args": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                               for k, v in vars(args).items()}, "load": load,
                      "results": {k: {str(c): r for c, r in v.items()} if k != "offline" else v
                                  for k, v in results.items()}}))


def main(argv=None) -> None:
    args = parse_args(argv)
    flag = "--xla_cpu_experimental_ynn_fusion_type="
    if not args.xla_defaults and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LLAMA3_JAX_API_KEY", None)
    load = [os.getloadavg()[0]]
    from llama3_jax.tokenizer import Tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        hf, ckpt = make_model(args, Path(tmp))
        work = workload(args, Tokenizer())
        results = {"offline": offline(args, ckpt, work)}
        port = free_port()
        results["llama3-jax serve"] = measure(
            args, "llama3-jax serve", [sys.executable, "-m", "llama3_jax.cli", "serve", "--checkpoint", str(ckpt),
                                       "--port", str(port), "--served-model-name", "bench", "--dtype", "float32",
                                       "--batch-size", str(args.batch_size), "--max-queue", str(args.requests)],
            f"http://127.0.0.1:{port}", "bench", work, {"ignore_eos": True, "stream_options": {"include_usage": True}},
            env)
        if not args.skip_transformers:
            port = free_port()
            tf = str(Path(sys.executable).parent / "transformers")
            results["transformers serve"] = measure(
                args, "transformers serve", [tf, "serve", str(hf), "--continuous-batching", "--device", "cpu",
                                             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)],
                f"http://127.0.0.1:{port}", str(hf), work, {}, env)
    load.append(os.getloadavg()[0])
    report(args, work, results, load)


if __name__ == "__main__":
    main()
