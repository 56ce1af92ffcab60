"""Train-step throughput: llama3_jax's jitted step vs transformers + torch, same shape, same machine.

    python benchmarks/train.py [--dim 256 --layers 4 --vocab 16384 --batch 8 --seq 256 --steps 5]

Both sides run one full optimizer step per iteration in float32: forward, next-token loss, backward,
global-norm clip 1.0, AdamW (b1 0.9, b2 0.95, weight decay 0.1). Random weights and random tokens
(the data pipeline is not timed). MFU uses the same FLOP count for both (optim.flops_per_token:
6 N + attention) against train.peak_flops (CPU: a nominal 96 GFLOP/s per core). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np


def bench_jax(args, tokens: np.ndarray) -> float:
    from llama3_jax import train
    from llama3_jax.config_loader import load_yaml_config
    from llama3_jax.parallel.sharding import make_mesh

    cfg = load_yaml_config(train.TrainConfig, None, [
        f"model={{preset: tiny, vocab_size: {args.vocab}, dim: {args.dim}, n_layers: {args.layers}, "
        f"n_heads: {args.heads}, n_kv_heads: {args.kv_heads}, head_dim: {args.dim // args.heads}, "
        f"intermediate_size: {args.ffn}, max_seq_len: {args.seq}}}",
        f"batch_size={args.batch}", f"seq_len={args.seq}", f"compute_dtype={args.dtype}",
        "optim.warmup_steps=0", f"steps={args.steps + 2}"])
    mc = train.model_config(cfg)
    mesh = make_mesh(1, -1, 1)
    setup = train.build(cfg, mc, mesh)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy(),
             "segment_ids": np.ones((args.batch, args.seq), np.int32),
             "loss_mask": np.ones((args.batch, args.seq), np.int32)}
    with jax.set_mesh(mesh):
        state = setup.init_state(0)
        gb = setup.put_batch(batch)
        for _ in range(2):  # compile + one warm step
            state, m = setup.step_fn(state, gb)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = setup.step_fn(state, gb)
        jax.block_until_ready(m)
    return (time.perf_counter() - t) / args.steps


def hf_config(args):
    """The transformers config of the benchmark shape (also used by benchmarks/finetune.py)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.dim // args.heads,
                       max_position_embeddings=args.seq, rms_norm_eps=1e-5, tie_word_embeddings=False)


def bench_torch(args, tokens: np.ndarray) -> float:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM(hf_config(args)).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return torch_step_seconds(model, params, opt, tokens, args.steps)


def torch_step_seconds(model, params, opt, tokens: np.ndarray, steps: int) -> float:
    """Seconds per torch train step (forward, next-token loss, backward, clip 1.0 on `params`, `opt`
    update) on `tokens` (B, T + 1), after two warm-up steps (also used by benchmarks/finetune.py)."""
    import torch

    ids = torch.tensor(tokens[:, :-1].astype(np.int64))
    labels = torch.tensor(tokens[:, 1:].astype(np.int64))

    def step():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="jax compute dtype")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()

    from llama3_jax import train
    from llama3_jax.model.config import ModelConfig

    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    mc = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                     n_kv_heads=args.kv_heads, head_dim=args.dim // args.heads, intermediate_size=args.ffn)
    flops_step = train.model_flops_per_token(mc, args.seq) * args.batch * args.seq
    devices = jax.devices()
    peak = train.peak_flops(0.0, devices)
    rows = [("llama3_jax (jax.jit step, %s)" % args.dtype, bench_jax(args, tokens))]
    if not args.skip_torch:
        import torch
        import transformers
        rows.append((f"transformers {transformers.__version__} + torch {torch.__version__} (float32, eager)",
                     bench_torch(args, tokens)))

    n_tok = args.batch * args.seq
    print(f"\nshape: {mc.num_params():,} params (dim {args.dim}, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} kv, ffn {args.ffn}, vocab {args.vocab}, untied); batch {args.batch} x seq {args.seq} "
          f"= {n_tok} tokens/step; {flops_step / 1e9:.1f} GFLOP/step")
    print(f"machine: {devices[0].device_kind} x{len(devices)} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); peak for MFU {peak / 1e9:.0f} GFLOP/s\n")
    print("| implementation | step (s) | tokens/s | MFU |")
    print("|---|---:|---:|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} | {n_tok / sec:,.0f} | {flops_step / sec / peak:.1%} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
