"""Decode throughput: llama3-jax (continuous and static batching) vs transformers `generate` on the same
weights, on a uniform and a ragged workload, and the bandwidth roofline.

    python benchmarks/decode.py                      # ~126M-param Llama-3-shaped model, float32
    python benchmarks/decode.py --dim 256 --layers 4 --new-tokens 32   # a quick smoke run

Workloads: `uniform` is --batch-size rows of --prompt-len tokens, each generating --new-tokens; `ragged`
is --ragged-rows rows (default 2 x batch) with prompt lengths uniform in --ragged-prompt-len and
max_new_tokens uniform in --ragged-new-tokens (per row). tokens/s counts the tokens each row asked for
(transformers, which has one max_new_tokens per call, decodes each batch of rows to its longest budget;
its extra tokens are not counted). llama3-jax runs both its continuous batching (the default engine:
--batch-size slots refilled as rows finish) and its static batching (whole batches sorted by length).

A random `transformers.LlamaForCausalLM` (GQA, SwiGLU, llama3 rope scaling) is converted with
`llama3-jax convert`; both sides then greedily generate --new-tokens tokens (never stopping: --ignore-eos
semantics) after a --prompt-len-token prompt, at each batch size. tokens/s = batch * new tokens / wall
time of one whole generate call (prefill included; prompts are short), the best of --repeats calls
after a warm-up call (the JAX side compiles there; torch builds its kernels). transformers runs first,
before jax is imported, so the two runtimes' thread pools never compete.

int8 (`--int8`, default on): the uniform workload again through `Generator(quantize="int8")` (int8
weights, per-output-channel scales; `llama3-jax generate --quantize int8`), continuous batching, in a
child process with XLA's default CPU flags: its int8 x int8 dots run in XLA:CPU's YNNPACK fusion,
which the flag this script sets for float32 turns off (quant.py says why). The child also times
float32 under those same defaults, so the table shows int8 against both float32 figures.

Two bounds, each measured on this machine in the same run, and the lower of them is the roofline:
  * bandwidth: each step reads every weight but the embedding table (only B rows of it are gathered)
    plus the KV cache, so tokens/s <= batch * bandwidth / bytes per step, with the bandwidth measured
    by a numpy copy of a large array (read + write bytes / time);
  * compute: every token (the prompt's too) costs 2 FLOPs per weight it meets (all but the embedding)
    plus attention (2 x 2 x heads x head_dim per cached position, at the mean context), so tokens/s <=
    peak / FLOPs per generated token, with the peak measured by a large jitted float matmul
    (MATMUL_SHAPE) under the same XLA flags: what XLA:CPU's dot reaches at best.
Batch 1 is bandwidth-bound; at 8-32 rows a CPU meets the compute bound first. "matmuls alone" times
a jitted chain of exactly the decode step's weight matmuls at that batch (B x dim through every
projection and the output layer, no attention, sampling or cache): the floor of a step made of these
skinny dots, which run below the square matmul's peak.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of both sides")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per point after the warm-up; best is kept")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                   help="torch intra-op threads (1 is faster on a small, shared VM where OpenMP threads wait "
                        "on each other)")
    p.add_argument("--xla-defaults", action="store_true",
                   help="keep XLA:CPU's default dot fusion (by default this script turns off its YNN fusion, "
                        "which made f32 decode ~1.6x slower on the 2-core x86 VM this was written on)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--decode-attention", choices=["auto", "reference", "window", "ragged"], default="auto",
                   help="how llama3-jax decode steps read the cache (engine.Generator; default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="llama3-jax: prefill prompts longer than N a chunk per host visit (engine.Generator)")
    p.add_argument("--kv-pages", type=int, default=None, metavar="N",
                   help="also time continuous batching with a paged KV cache of N pages (a 'paged' column)")
    p.add_argument("--page-size", type=int, default=64, metavar="P", help="slots per page with --kv-pages")
    p.add_argument("--workloads", nargs="+", choices=["uniform", "ragged"], default=["uniform", "ragged"])
    p.add_argument("--ragged-rows", type=int, default=None, help="rows of the ragged workload (default: 2 x batch)")
    p.add_argument("--ragged-prompt-len", type=int, nargs=2, default=[16, 1024])
    p.add_argument("--ragged-new-tokens", type=int, nargs=2, default=[8, 256])
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="also time --quantize int8 on the uniform workload (child process, XLA's default flags)")
    p.add_argument("--int8-child", nargs=2, default=None, help=argparse.SUPPRESS)  # CHECKPOINT WORK_JSON
    return p.parse_args(argv)


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s moved by np.copyto of a large array (each byte is read once and written once)."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


MATMUL_SHAPE = (1024, 2048, 2048)  # (M, K, N) of the peak-FLOP/s reference matmul


def measure_matmul_peak(dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a jitted (M, K) x (K, N) matmul: the most XLA's dot reaches here (the compute bound)."""
    import jax
    import jax.numpy as jnp
    m, k, n = MATMUL_SHAPE
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    return 2 * m * k * n / min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))


def matmul_step_seconds(cfg, b: int, dtype: str, repeats: int = 5) -> float:
    """One decode step's weight matmuls alone at batch b: (b, dim) through q, k, v, o, gate, up, down of
    every layer and the output layer, jitted, no attention or sampling (separate arrays per layer, as the
    engine keeps them on CPU)."""
    import jax
    import jax.numpy as jnp
    d, h = cfg.dim, cfg.n_heads * cfg.head_dim
    kv, f, v = cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    key = jax.random.key(0)
    layers = [[jax.random.normal(jax.random.fold_in(key, 7 * i + j), shape, dtype) * 0.02
               for j, shape in enumerate([(d, h), (d, kv), (d, kv), (h, d), (d, f), (d, f), (f, d)])]
              for i in range(cfg.n_layers)]
    out = jax.random.normal(jax.random.fold_in(key, 7 * cfg.n_layers), (d, v), dtype) * 0.02

    @jax.jit
    def step(x, layers, out):
        for wq, wk, wv, wo, wg, wu, wd in layers:
            x = x + (x @ wq) @ wo + jnp.sum(x @ wk) + jnp.sum(x @ wv)
            x = x + (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
        return x @ out

    x = jnp.ones((b, d), dtype)
    step(x, layers, out).block_until_ready()
    return min(_timed(lambda: step(x, layers, out).block_until_ready()) for _ in range(repeats))


def decode_flops(cfg, weight_params: int, context: float) -> float:
    """FLOPs of one token through the model: 2 per weight it meets (not the embedding table) plus the
    attention scores and values over `context` cached positions."""
    return 2 * weight_params + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def int8_child(args) -> None:
    """Time the uniform rows (a JSON file: batch -> rows) with float32 and int8 weights; print JSON."""
    import json

    from llama3_jax.serve.engine import Generator
    ckpt, work_file = args.int8_child
    work = {int(b): rows for b, rows in json.loads(Path(work_file).read_text()).items()}
    out = {}
    for quantize in (None, "int8"):
        gen = Generator(ckpt, dtype=args.dtype, quantize=quantize)
        for b, rows in work.items():
            print(f"uniform batch {b}: llama3-jax {quantize or args.dtype} (XLA defaults) warm-up + run ...",
                  file=sys.stderr)
            reqs = [gen.request(p, m) for p, m in rows]

            def run():
                got = [c for batch in gen.generate_requests(reqs, ignore_eos=True, batch_size=b, decode_text=False)
                       for _, c in batch]
                assert sorted(len(c.tokens) for c in got) == sorted(m for _, m in rows)

            run()
            out[f"{quantize or 'float'} {b}"] = min(_timed(run) for _ in range(args.repeats))
    print(json.dumps(out))


def run_int8_child(args, ckpt: Path, work: dict) -> dict:
    """(batch -> seconds) for float (XLA defaults) and int8, from `int8_child` in a fresh process."""
    import json
    import subprocess
    work_file = ckpt.parent / "int8_work.json"
    work_file.write_text(json.dumps({b: rows for (w, b), rows in work.items() if w == "uniform"}))
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f)
    cmd = [sys.executable, __file__, "--int8-child", str(ckpt), str(work_file), "--dtype", args.dtype,
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return {tuple(k.split()): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.int8_child:
        return int8_child(args)
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.generation_config.eos_token_id = None
    hf = hf.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    n = args.new_tokens
    rng = np.random.default_rng(0)
    work = {}  # (workload, batch) -> [(prompt ids, max new tokens)]
    for b in args.batch_sizes:
        if "uniform" in args.workloads:
            work["uniform", b] = [(p, n) for p in rng.integers(3, args.vocab, (b, args.prompt_len)).tolist()]
        if "ragged" in args.workloads:
            rows = args.ragged_rows or 2 * b
            lo, hi = args.ragged_prompt_len
            nlo, nhi = args.ragged_new_tokens
            work["ragged", b] = [(rng.integers(3, args.vocab, int(rng.integers(lo, hi + 1))).tolist(),
                                  int(rng.integers(nlo, nhi + 1))) for _ in range(rows)]

    # transformers first, before jax is imported: XLA's CPU thread pool would compete with torch's threads
    t_hf = {}
    for (w, b), rows in ([] if args.skip_transformers else work.items()):
        print(f"{w} batch {b}: transformers warm-up + run ...", file=sys.stderr)

        def hf_run():
            for i in range(0, len(rows), b):
                chunk = rows[i:i + b]
                width = max(len(p) for p, _ in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, (p, _) in enumerate(chunk):  # left-padded, as generate wants for decoder-only models
                    ids[r, width - len(p):] = torch.tensor(p)
                    mask[r, width - len(p):] = 1
                new = max(m for _, m in chunk)
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=0)
                assert out.shape == (len(chunk), width + new)

        hf_run()  # every cache length once: oneDNN builds kernels per shape
        t_hf[w, b] = min(_timed(hf_run) for _ in range(args.repeats))

    flag = "--xla_cpu_experimental_ynn_fusion_type="
    if not args.xla_defaults and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    tmp = tempfile.TemporaryDirectory()
    hf.save_pretrained(Path(tmp.name) / "hf")
    del hf
    import jax

    from llama3_jax.convert import convert
    from llama3_jax.serve.engine import Generator
    convert(Path(tmp.name) / "hf", Path(tmp.name) / "jax", src_format="hf", dst_format="jax", progress=False)
    gen = Generator(Path(tmp.name) / "jax", dtype=args.dtype, decode_attention=args.decode_attention,
                    prefill_chunk=args.prefill_chunk)
    paged = None
    if args.kv_pages:  # the same restored weights, a paged cache (a copy: its own scheduler and pool)
        paged = copy.copy(gen)
        paged.kv_pages, paged.page_size, paged._scheduler, paged._cache = args.kv_pages, args.page_size, None, None

    t_jax = {}  # (workload, batch, mode) -> seconds
    peak = {}   # (workload, batch) -> most pages held at once (paged)
    for (w, b), rows in work.items():
        reqs = [gen.request(p, m) for p, m in rows]
        for mode in ("continuous", "static") + (("paged",) if paged else ()):
            print(f"{w} batch {b}: llama3-jax {mode} warm-up + run ...", file=sys.stderr)
            g = paged if mode == "paged" else gen

            def run():
                got = {i: c for batch in g.generate_requests(reqs, ignore_eos=True, batch_size=b, decode_text=False,
                                                              continuous=mode != "static") for i, c in batch}
                assert [len(got[i].tokens) for i in range(len(rows))] == [m for _, m in rows]

            run()  # compiles
            t_jax[w, b, mode] = min(_timed(run) for _ in range(args.repeats))
            if mode == "paged":
                peak[w, b] = paged._scheduler.peak_pages

    t_int8 = {}
    decode_attention = gen.decode_attention
    if args.int8 and any(w == "uniform" for w, _ in work):
        del gen  # the child needs the memory; the config is all that is used below
        t_int8 = run_int8_child(args, Path(tmp.name) / "jax", work)
        from llama3_jax.store.checkpoint import load_config
        cfg = load_config(Path(tmp.name) / "jax")
    else:
        cfg = gen.cfg
    tmp.cleanup()
    itemsize = np.dtype(jax.numpy.dtype(args.dtype)).itemsize
    n_params = cfg.num_params()
    weight_bytes = (n_params - cfg.vocab_size * cfg.dim * (0 if cfg.tie_embeddings else 1)) * itemsize
    print("measuring memory bandwidth, matmul peak, matmuls alone ...", file=sys.stderr)
    bandwidth = measure_bandwidth()
    flops_peak = measure_matmul_peak(args.dtype)
    table = []
    for (w, b), rows in work.items():
        useful = sum(m for _, m in rows)
        roof = None
        if w == "uniform":  # KV cache read per step, at the mean decode length
            kv_bytes = 2 * cfg.n_layers * b * (args.prompt_len + n / 2) * cfg.n_kv_heads * cfg.head_dim * itemsize
            # FLOPs per generated token: its own, and its share of the prompt's (prefill: P tokens per n)
            flops = decode_flops(cfg, weight_bytes // itemsize, args.prompt_len + n / 2) * (1 + args.prompt_len / n)
            roof = {"bandwidth": b * bandwidth / (weight_bytes + kv_bytes), "compute": flops_peak / flops,
                    "matmuls": b / matmul_step_seconds(cfg, b, args.dtype)}
        tp = useful / t_jax[w, b, "paged"] if paged else None
        table.append((w, b, len(rows), useful / t_jax[w, b, "continuous"], useful / t_jax[w, b, "static"],
                      useful / t_hf[w, b] if (w, b) in t_hf else None, roof, tp))

    dev = jax.devices()[0]
    print(f"\n### Decode throughput ({args.dtype}, greedy, ignore-eos; uniform: prompt {args.prompt_len} tokens, "
          f"{n} new tokens, one batch of rows; ragged: prompts {args.ragged_prompt_len[0]}-{args.ragged_prompt_len[1]} "
          f"tokens, {args.ragged_new_tokens[0]}-{args.ragged_new_tokens[1]} new tokens per row)\n")
    print(f"- model: Llama-3-shaped, {n_params / 1e6:.1f}M params (dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv heads x {cfg.head_dim}, mlp {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}); random weights converted from transformers")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), torch {torch.__version__} "
          f"({args.torch_threads} threads), "
          f"transformers {transformers.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"decode attention {decode_attention}; prefill chunk {args.prefill_chunk}; "
          f"load average {os.getloadavg()[0]:.1f}" + (f"; paged: {args.kv_pages} pages of {args.page_size} slots"
                                                     if paged else ""))
    print(f"- measured memory bandwidth (numpy copy of 1 GiB): {bandwidth / 1e9:.1f} GB/s; weights read per "
          f"decode step: {weight_bytes / 1e6:.0f} MB (+ KV cache); matmul peak ({args.dtype} "
          f"{'x'.join(map(str, MATMUL_SHAPE))}, jitted): {flops_peak / 1e9:.1f} GFLOP/s; "
          f"{decode_flops(cfg, weight_bytes // itemsize, 0) / 1e6:.1f} MFLOP per token (+ attention)\n")
    print("| workload | batch | rows | continuous tokens/s | static tokens/s | continuous / static | "
          "transformers tokens/s | continuous / transformers | bandwidth roofline tokens/s | compute bound "
          "tokens/s | continuous / lower bound | matmuls alone tokens/s |" + (" paged tokens/s |" if paged else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if paged else ""))
    for w, b, n_rows, tc, ts, th, roof, tp in table:
        hf_s, ratio = ("-", "-") if th is None else (f"{th:.1f}", f"{tc / th:.2f}x")
        bounds = "- | - | - | -" if roof is None else (
            f"{roof['bandwidth']:.1f} | {roof['compute']:.1f} | {tc / min(roof['bandwidth'], roof['compute']):.0%} "
            f"({'bandwidth' if roof['bandwidth'] <= roof['compute'] else 'compute'}) | {roof['matmuls']:.1f}")
        print(f"| {w} | {b} | {n_rows} | {tc:.1f} | {ts:.1f} | {tc / ts:.2f}x | {hf_s} | {ratio} | {bounds} |"
              + (f" {tp:.1f} |" if paged else ""))
    for (w, b), n_pages in peak.items():
        print(f"- paged {w} batch {b}: at most {n_pages} of {args.kv_pages} pages held at once "
              f"({n_pages * args.page_size} cache slots)")
    if t_int8:
        print("\n#### int8 weights (uniform workload, continuous batching; child process with XLA's default flags)\n")
        print(f"| batch | {args.dtype} tokens/s (this script's flags) | {args.dtype} tokens/s (XLA defaults) | "
              f"int8 tokens/s | int8 / {args.dtype} (best of the two) |")
        print("|---:|---:|---:|---:|---:|")
        for (w, b), rows in work.items():
            if w != "uniform":
                continue
            useful = sum(m for _, m in rows)
            tf, td, ti = useful / t_jax[w, b, "continuous"], useful / t_int8["float", str(b)], useful / t_int8["int8", str(b)]
            print(f"| {b} | {tf:.1f} | {td:.1f} | {ti:.1f} | {ti / max(tf, td):.2f}x |")


if __name__ == "__main__":
    main()
