"""How often int8 weights pick float32's greedy token, on a real-vocabulary model trained a little.

    python benchmarks/int8_agreement.py            # ~2 minutes on 2 CPU cores

A random model's next-token distribution is nearly flat, so its argmax flips at the slightest change
and says little about a real model; a trained one is peaked. So: a small Llama-3-shaped model with the
real 128,256-token vocabulary (Llama 3's tokenizer) is trained for --steps Adam steps on this repo's
own docs (README.md and docs/*.md, DESIGN.md, STYLE.md where present: real English + code, tokenized), the last 10%
of the token stream held out. Then, float32 against `Generator(quantize="int8")` on the same weights:
  * teacher-forced top-1 agreement: argmax of the logits at every held-out position (same inputs);
  * max |logit error| / std of the float32 logits over those positions (the bound tests/test_quant.py
    states is on this measure);
  * greedy generation: --prompts prompts cut from the held-out text, --new-tokens tokens each; the share
    of generated tokens equal to float32's at the same position, and of whole continuations equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llama3_jax.model.config import ModelConfig
from llama3_jax.serve.engine import Generator
from llama3_jax.model.llama import Llama, abstract_model, quantize_params
from llama3_jax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    return p.parse_args(argv)


def corpus_tokens(tok) -> np.ndarray:
    # README.md was the whole manual when the figures in docs/performance.md were taken; it is now split
    # into README.md + docs/, which together hold the same text
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT.parent / "shared" / "DESIGN.md",
             ROOT.parent / "shared" / "STYLE.md"]
    text = "\n\n".join(f.read_text() for f in files if f.exists())
    return np.asarray(tok.encode(text, bos=True, eos=False), np.int32)


def train(cfg: ModelConfig, data: np.ndarray, args) -> dict:
    model = Llama(cfg, rngs=nnx.Rngs(0), scan_layers=False)
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        def loss(p):
            tok = batch[:, :-1]
            pos = jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape)
            logits, _ = nnx.merge(graphdef, p)(tok, pos, jnp.ones_like(tok))
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        val, g = jax.value_and_grad(loss)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, val

    rng = np.random.default_rng(0)
    t0 = time.time()
    for i in range(args.steps):
        starts = rng.integers(0, len(data) - args.seq_len - 1, args.batch)
        batch = jnp.asarray(np.stack([data[s:s + args.seq_len + 1] for s in starts]))
        params, state, val = step(params, state, batch)
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i}: loss {float(val):.3f} ({time.time() - t0:.0f}s)", flush=True)
    return nnx.to_pure_dict(params)


def main(argv=None) -> None:
    args = parse_args(argv)
    tok = load_tokenizer(None)
    cfg = ModelConfig(vocab_size=128256, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                      head_dim=args.dim // 4, intermediate_size=3 * args.dim, max_seq_len=512,
                      dtype="float32", param_dtype="float32")
    tokens = corpus_tokens(tok)
    cut = int(len(tokens) * 0.9)
    params = train(cfg, tokens[:cut], args)
    held = tokens[cut:]

    # teacher-forced: the same held-out windows through both models
    n = (len(held) - 1) // args.seq_len
    windows = jnp.asarray(held[:n * args.seq_len].reshape(n, args.seq_len))
    qcfg = dataclasses.replace(cfg, quantization="int8")
    logits = {}
    for name, c, p in (("float32", cfg, params), ("int8", qcfg, quantize_params(params, qcfg))):
        graphdef = nnx.graphdef(abstract_model(c))

        @jax.jit
        def fwd(p, t, graphdef=graphdef):
            pos = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
            return nnx.merge(graphdef, p)(t, pos, jnp.ones_like(t))[0]
        logits[name] = fwd(p, windows)
    ref, got = logits["float32"], logits["int8"]
    top1 = float(jnp.mean(jnp.argmax(ref, -1) == jnp.argmax(got, -1)))
    err = float(jnp.max(jnp.abs(got - ref))) / float(jnp.std(ref))

    # greedy generation through the engine (continuous batching), float32 vs --quantize int8
    starts = np.linspace(0, len(held) - 17, args.prompts).astype(int)
    prompts = [[cfg.bos_id] + held[s:s + 16].tolist() for s in starts]
    outs = {}
    for name, q in (("float32", None), ("int8", "int8")):
        gen = Generator(cfg=cfg, params=params, dtype="float32", quantize=q, tokenizer=tok)
        outs[name] = [c.tokens for c in gen.generate(prompts, args.new_tokens, ignore_eos=True, decode_text=False)]
    same_pos = np.mean([a == b for x, y in zip(outs["float32"], outs["int8"]) for a, b in zip(x, y)])
    same_all = np.mean([x == y for x, y in zip(outs["float32"], outs["int8"])])
    print(f"\nmodel: vocab {cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers ({cfg.num_params() / 1e6:.1f}M params), "
          f"trained {args.steps} steps on {cut} tokens of the repo's docs; held out {len(held)} tokens")
    print(f"teacher-forced top-1 agreement int8 vs float32: {top1:.4f} over {windows.size} positions")
    print(f"max |logit error| / std(float32 logits): {err:.4f}")
    print(f"greedy generation ({args.prompts} prompts x {args.new_tokens} new tokens): {same_pos:.4f} of tokens equal "
          f"at the same position, {same_all:.2f} of continuations identical")


if __name__ == "__main__":
    main()
