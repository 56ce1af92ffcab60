"""Fine-tuning cost: full fine-tuning vs LoRA in llama3_jax, and transformers + PEFT LoRA, same shape.

    python benchmarks/finetune.py [--dim 512 --layers 4 --vocab 32000 --batch 4 --seq 256 --rank 16 --steps 3]

Each variant runs in its own process (so its peak RSS is its own): one optimizer step per iteration
in float32 (forward, next-token loss, backward, clip, AdamW), random weights and tokens. llama3_jax
runs its real `train.build` step (objective lm, `lora.rank` 0 or R; LoRA on all seven projections,
base frozen); jax's compiled memory analysis gives the bytes the step needs (arguments + outputs +
temporaries, aliased donations counted once). transformers + PEFT: `get_peft_model` with the same
rank/alpha/targets, torch AdamW on the adapters. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_jax(args, rank: int) -> dict:
    import jax

    from llama3_jax.store import checkpoint
    from llama3_jax import train
    from llama3_jax.config_loader import load_yaml_config
    from llama3_jax.parallel.sharding import make_mesh

    model = (f"{{preset: tiny, vocab_size: {args.vocab}, dim: {args.dim}, n_layers: {args.layers}, "
             f"n_heads: {args.heads}, n_kv_heads: {args.kv_heads}, head_dim: {args.dim // args.heads}, "
             f"intermediate_size: {args.ffn}, max_seq_len: {args.seq}}}")
    over = [f"model={model}", f"batch_size={args.batch}", f"seq_len={args.seq}", "compute_dtype=float32",
            "optim.warmup_steps=0", f"steps={args.steps + 2}", "optim.weight_decay=0.0"]
    mesh = make_mesh(1, -1, 1)
    if rank:  # LoRA needs a base checkpoint: a random one, saved once per shape
        base = os.path.join(args.tmp, "base")
        mc0 = train.model_config(load_yaml_config(train.TrainConfig, None, over))
        # the cache's config.json records its shape: another --dim/--layers/... rebuilds it
        if checkpoint.is_checkpoint(base) and checkpoint.load_config(base) != mc0:
            shutil.rmtree(base)
        if not checkpoint.is_checkpoint(base):
            checkpoint.save_params(base, mc0, train.init_params(mc0, 0))
        over += [f"init_from={base}", f"lora.rank={rank}", f"lora.alpha={2 * rank}"]
    cfg = load_yaml_config(train.TrainConfig, None, over)
    mc = train.model_config(cfg, None)
    setup = train.build(cfg, mc, mesh)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy(),
             "segment_ids": np.ones((args.batch, args.seq), np.int32),
             "loss_mask": np.ones((args.batch, args.seq), np.int32)}
    from llama3_jax.train.loop import _frozen
    with jax.set_mesh(mesh):
        setup.frozen = _frozen(cfg, setup)
        state = setup.init_state(0)
        gb = setup.put_batch(batch)
        ma = setup.step_jit.lower(state, gb, setup.frozen).compile().memory_analysis()
        for _ in range(2):
            state, m = setup.step_fn(state, gb)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = setup.step_fn(state, gb)
        jax.block_until_ready(m)
    sec = (time.perf_counter() - t) / args.steps
    trainable = sum(a.size for a in jax.tree.leaves(state["params"]))
    step_bytes = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    return {"step_s": sec, "trainable": int(trainable), "compiled_mb": step_bytes / 2**20, "rss_mb": _rss_mb()}


def run_peft(args, rank: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from train import hf_config, torch_step_seconds  # benchmarks/train.py: the same shape and step

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM(hf_config(args)).train()
    if rank:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS_HF))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1))
    step_s = torch_step_seconds(model, params, opt, tokens, args.steps)
    return {"step_s": step_s, "trainable": sum(p.numel() for p in params),
            "compiled_mb": None, "rss_mb": _rss_mb()}


VARIANTS = {"jax-full": (run_jax, 0), "jax-lora": (run_jax, None), "torch-full": (run_peft, 0),
            "torch-peft-lora": (run_peft, None)}
NAMES = {"jax-full": "llama3_jax full fine-tuning", "jax-lora": "llama3_jax LoRA (base frozen, no optimizer state)",
         "torch-full": "transformers + torch full fine-tuning", "torch-peft-lora": "transformers + PEFT LoRA"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("dim", 512), ("layers", 4), ("heads", 8), ("kv-heads", 2), ("ffn", 1536),
                          ("vocab", 32000), ("batch", 4), ("seq", 256), ("rank", 16), ("steps", 3)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/llama3_jax_bench_finetune", help="where the LoRA base checkpoint goes")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    args = p.parse_args()
    if args.variant:
        fn, rank = VARIANTS[args.variant]
        print(json.dumps(fn(args, args.rank if rank is None else rank)))
        return
    rows = []
    for v in args.only:
        cmd = [sys.executable, __file__, "--variant", v, *_passthrough(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if out.returncode:
            sys.exit(f"{v} failed:\n{out.stderr[-3000:]}")
        rows.append((v, json.loads(out.stdout.strip().splitlines()[-1])))
    n_tok = args.batch * args.seq
    print(f"\nshape: dim {args.dim}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, ffn {args.ffn}, "
          f"vocab {args.vocab}, untied; batch {args.batch} x seq {args.seq} = {n_tok} tokens/step; LoRA rank "
          f"{args.rank}, alpha {2 * args.rank}, all 7 projections; float32; {os.cpu_count()} CPU cores\n")
    print("| variant | trained params | step (s) | tokens/s | step memory, compiled (MiB) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for v, r in rows:
        mem = f"{r['compiled_mb']:.0f}" if r["compiled_mb"] is not None else "n/a"
        print(f"| {NAMES[v]} | {r['trainable']:,} | {r['step_s']:.3f} | {n_tok / r['step_s']:,.0f} | {mem} | "
              f"{r['rss_mb']:.0f} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")


def _passthrough(args) -> list[str]:
    keys = ("dim", "layers", "heads", "kv_heads", "ffn", "vocab", "batch", "seq", "rank", "steps")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))] + ["--tmp", args.tmp]


if __name__ == "__main__":
    main()
