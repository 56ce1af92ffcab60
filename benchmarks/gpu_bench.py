"""The measurements behind benchmarks/gpu.sh: training and decoding at real shapes on one accelerator,
with the same run's own matmul and copy speeds as the yardsticks, and transformers + torch side by side.

    python benchmarks/gpu_bench.py --mode full     # one NVIDIA GPU: 8B dims, 4 layers, T = 8192, bf16
    python benchmarks/gpu_bench.py --mode smoke    # any machine (CPU): tiny shapes, the same code path

(a) train: AdamW steps of an 8B-shaped layer stack (Llama 3.1 8B's dims, fewer layers; real 128,256
    vocabulary; bf16 compute, float32 params and moments; attention=auto, the chunked loss, remat=full)
    -> tokens/s, MFU against the chip's dense bf16 peak (hardware.py) and against a bf16 matmul timed
    here. (b) decode: greedy steps at batch 1/16/64 after a short prompt -> tokens/s and the bytes each
    step must read (weights + the filled cache) per second, as a fraction of the bandwidth of a device
    copy timed here. (c) the same shapes in transformers + torch where torch is installed (on the GPU
    when torch sees one). (d) GRPO steps (`objective: grpo`: a rollout from the live params on our
    engine, configs/rewards/toy.py's reward, one update; Llama 3.2 1B's shape, random init, 4 prompts x
    8 completions of up to 256 tokens) through train/rl.py's GRPO.step and the jitted step, and the
    same run through TRL's GRPOTrainer where trl is installed (benchmarks/rl.py's setup; skipped, and
    said so in the JSON, where it is not; so is ours without orbax). --no-grpo skips (d).
Imports only jax, flax, optax and numpy from outside (not grain, orbax or llama-models, which a GPU
image may lack): so it builds its step from model/llama.py, train/losses.py and train/optim.py rather
than train/loop.py, which imports the data pipeline (tests/test_architecture.py checks these imports);
(d) imports train/step.py and train/rl.py (no grain; orbax through the checkpoint module) when it runs.
Prints a markdown table; the last line is the same as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama3_jax.model import attention  # noqa: E402
from llama3_jax.model.config import load_model_config  # noqa: E402
from llama3_jax.parallel.hardware import PEAK_FLOPS, lookup  # noqa: E402
from llama3_jax.model.kv_cache import KVCache  # noqa: E402
from llama3_jax.train.losses import chunked_lm_loss, resolve_chunk  # noqa: E402
from llama3_jax.model.llama import Llama, abstract_model  # noqa: E402
from llama3_jax.train.optim import OptimConfig, flops_per_token, make_optimizer  # noqa: E402

MODES = {  # layers, seq_len, decode batches, prompt, new tokens, train steps, matmul n, model overrides
    "full": dict(layers=4, seq=8192, batches=(1, 16, 64), prompt=128, new=128, steps=5, n=8192, dims={}),
    "smoke": dict(layers=2, seq=256, batches=(1, 2, 4), prompt=16, new=8, steps=2, n=512,
                  dims=dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=512)),
}
# (d) GRPO: the policy, prompts x generations per step, prompt and completion tokens, warm-up + timed steps
GRPO = {
    "full": dict(name="Llama 3.2 1B", model="{preset: llama3.2-1b}", prompts=4, generations=8, prompt=128, completion=256, warmup=2,
                 steps=3),
    "smoke": dict(name="tiny", model="{preset: tiny, vocab_size: 512, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
                        "head_dim: 16, intermediate_size: 128, tie_embeddings: true, max_seq_len: 256}",
                  prompts=2, generations=4, prompt=32, completion=8, warmup=2, steps=2),
}


def timed(fn, *args, repeat: int = 3) -> float:
    """Best wall time of `fn(*args)` (compiled and warmed up first), results fetched to the host."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(n: int, dtype) -> float:
    a = jnp.ones((n, n), dtype)
    return 2 * n**3 / timed(jax.jit(lambda a: a @ a), a)


def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second moved by a device copy (read + write)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return 2 * x.nbytes / timed(jax.jit(lambda x: x + 1.0), x)


def train_jax(mc, seq: int, steps: int) -> float:
    """Seconds per AdamW step on one sequence of `seq` tokens."""
    backend = attention.resolve("auto", jax.devices()[0].platform, seq)
    graphdef = abstract_model(mc, remat="full", attention=backend)
    from flax import nnx
    graphdef, _ = nnx.split(graphdef)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(mc, rngs=nnx.Rngs(0)), nnx.Param)))()
    tx = make_optimizer(OptimConfig(warmup_steps=0), 1000)
    chunk = resolve_chunk(-1, 1, seq, mc.vocab_size)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, mc.vocab_size, (1, seq + 1)), jnp.int32)
    pos, ones = jnp.arange(seq, dtype=jnp.int32)[None], jnp.ones((1, seq), jnp.int32)

    def loss(p):
        model = nnx.merge(graphdef, p)
        hidden, _ = model(tokens[:, :-1], pos, ones, hidden_only=True)
        s, n = chunked_lm_loss(hidden, model.output_weight(), tokens[:, 1:], ones, chunk)
        return s / n

    @jax.jit
    def step(params, opt):
        g = jax.grad(loss)(params)
        updates, opt = tx.update(g, opt, params)
        return jax.tree.map(jnp.add, params, updates), opt

    state = (params, tx.init(params))
    jax.block_until_ready(step(*state))
    t = time.perf_counter()
    for _ in range(steps):
        state = step(*state)
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / steps


def decode_jax(mc, batch: int, prompt: int, new: int) -> float:
    """Seconds per greedy decode step (all rows), prompt prefilled first; the loop runs on device."""
    from flax import nnx
    graphdef, params = nnx.split(Llama(mc, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.to_pure_dict(params))
    tokens = jnp.ones((batch, prompt), jnp.int32)

    @jax.jit
    def run(params, n):
        model = nnx.merge(graphdef, params)
        cache = KVCache.init(mc, batch, prompt + new)
        pos = jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32), (batch, prompt))
        logits, cache = model(tokens, pos, jnp.ones_like(tokens), cache, last_only=True)

        def body(i, carry):
            tok, cache = carry
            logits, cache = model(tok, jnp.full((batch, 1), prompt, jnp.int32) + i, jnp.ones_like(tok), cache)
            return jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), cache
        tok, _ = jax.lax.fori_loop(0, n, body, (jnp.argmax(logits, -1).astype(jnp.int32), cache))
        return tok

    full, none = timed(run, params, new), timed(run, params, 0)
    return (full - none) / new


def grpo_prompts(g: dict, seed: int = 0) -> list[dict]:
    """Prompt records of g["prompt"] tokens (random lowercase text as one user turn, the byte
    tokenizer's chat rendering: data/prompts.render_prompt's layout, without its grain import)."""
    from llama3_jax.data.chat import render_messages
    from llama3_jax.tokenizer import ByteTokenizer

    tok, rng = ByteTokenizer(), np.random.default_rng(seed)
    out = []
    for i in range(64):
        text = "".join(rng.choice(list("abcdefgh "), size=max(1, g["prompt"] - 23)))
        msgs = [{"role": "user", "content": text}]
        ids = render_messages(tok, msgs)[0] + tok.encode_header("assistant")
        out.append({"prompt": text, "columns": {"letter": "a"}, "ids": ids, "where": f"gpu_bench:{i + 1}",
                    "index": i, "messages": msgs})
    return out


def grpo_jax(g: dict, workdir: Path, dtype: str) -> dict:
    """Seconds per GRPO step (rollout from the live params, rewards, one update) through train/rl.py's
    GRPO.step and the jitted step, as `llama3-jax train` runs them (without train/loop.py: grain), and
    the mean rollout / reward / update seconds and rollout tokens/s of the timed steps."""
    from llama3_jax.config_loader import load_yaml_config
    from llama3_jax.parallel.sharding import make_mesh
    from llama3_jax.tokenizer import ByteTokenizer
    from llama3_jax.train import TrainConfig, build, model_config
    from llama3_jax.train.rl import GRPO

    B, G, C = g["prompts"], g["generations"], g["completion"]
    cfg = load_yaml_config(TrainConfig, None, [
        "objective=grpo", f"model={g['model']}", "tokenizer=bytes", f"batch_size={B}",
        f"seq_len={g['prompt'] + C}", f"grpo.num_generations={G}", f"grpo.max_completion_length={C}",
        f"grpo.reward_funcs=[{Path(__file__).resolve().parent.parent / 'configs/rewards/toy.py'}:letter_fraction]",
        f"compute_dtype={dtype}", f"workdir={workdir}", "optim.warmup_steps=0", f"steps={g['warmup'] + g['steps']}"])
    mesh = make_mesh(1, -1, 1)
    setup = build(cfg, model_config(cfg), mesh)
    prompts = grpo_prompts(g)
    batches = iter([prompts[i * B % len(prompts):][:B] for i in range(10 ** 6)])
    rl = GRPO(cfg, setup, ByteTokenizer(), workdir, 0)
    times, ms = [], []
    with jax.set_mesh(mesh):
        state = setup.init_state(cfg.seed)
        for step in range(g["warmup"] + g["steps"]):
            t = time.perf_counter()
            state, m = rl.step(state, batches, step, None)
            times.append(time.perf_counter() - t)
            ms.append({k: float(v) for k, v in jax.device_get(m).items()})
    rl.close()
    timed, k = times[g["warmup"]:], g["warmup"]
    mean = lambda key: float(np.mean([x[key] for x in ms[k:]]))  # noqa: E731
    return {"grpo_step_s": float(np.mean(timed)), "grpo_rollout_s": mean("rollout_seconds"),
            "grpo_reward_s": mean("reward_seconds"), "grpo_update_s": mean("update_seconds"),
            "grpo_rollout_tokens_per_s": mean("rollout_tokens_per_second"), "grpo_packed": setup.grpo_packed,
            "grpo_completion_tokens": mean("completions/mean_length") * B * G}


def grpo_trl(g: dict, workdir: Path) -> dict:
    """The same run through TRL's GRPOTrainer (benchmarks/rl.py's config, tokenizer and timing), on the
    GPU when torch sees one (bf16 autocast over float32 weights, as ours), from our init exported to HF."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("benchmarks_rl", Path(__file__).with_name("rl.py"))
    rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl)
    hf = rl.export_model(workdir / "hf", [f"model={g['model']}"])
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    args = rl.trl_config(str(workdir / "trl"), use_cpu=not gpu, bf16=gpu, max_steps=g["warmup"] + g["steps"] + 1,
                         num_generations=g["generations"], max_completion_length=g["completion"],
                         per_device_train_batch_size=g["prompts"] * g["generations"])
    records = [{"prompt": p["messages"], "letter": "a"} for p in grpo_prompts(g)]
    steps = rl.time_trl(rl.trl_trainer(model, args, records), g["warmup"])
    s = rl.summarise(steps)
    return {"trl_grpo_step_s": s["step"], "trl_grpo_rollout_s": s["rollout"], "trl_grpo_update_s": s["update"],
            "trl_grpo_rollout_tokens_per_s": s["rollout_tokens_per_second"], "trl_device": "cuda" if gpu else "cpu"}


def grpo_side(mode: str, dtype: str, no_torch: bool) -> dict:
    """(d): ours, then TRL when it is installed; a missing package (orbax for our step, trl for
    theirs) is reported in the JSON, not raised: the other rows stand."""
    import tempfile

    g, out = GRPO[mode], {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out.update(grpo_jax(g, Path(tmp) / "ours", dtype))
        except ImportError as e:
            out["grpo"] = f"not run ({e.name} missing)"
        if no_torch:
            return out
        try:
            out.update(grpo_trl(g, Path(tmp)))
        except ImportError as e:
            out["trl_grpo"] = f"not run ({e.name} missing)"
    return out


def torch_side(mc, seq: int, batches, prompt: int, new: int, steps: int) -> dict:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return {"torch": f"not run ({e.name} missing)"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.dim, intermediate_size=mc.intermediate_size,
                      num_hidden_layers=mc.n_layers, num_attention_heads=mc.n_heads,
                      num_key_value_heads=mc.n_kv_heads, head_dim=mc.head_dim, max_position_embeddings=seq + new,
                      rope_parameters={"rope_type": "default", "rope_theta": mc.rope_theta},
                      tie_word_embeddings=mc.tie_embeddings, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dev)
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, mc.vocab_size, (1, seq), device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def train_step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    out = {"torch_train_step_s": (time.perf_counter() - t) / steps, "torch_device": dev}
    model = model.to(torch.bfloat16).eval()
    for b in batches:
        prompt_ids = torch.ones((b, prompt), dtype=torch.long, device=dev)
        with torch.no_grad():
            times = []
            for n in (1, new + 1):
                model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)
                sync()
                t = time.perf_counter()
                model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)
                sync()
                times.append(time.perf_counter() - t)
        out[f"torch_decode_b{b}_tokens_per_s"] = b * new / max(times[1] - times[0], 1e-9)
    return out


def print_grpo(res: dict, mode: str) -> None:
    """The GRPO rows of the table: ours, and TRL's GRPOTrainer where it ran."""
    if "grpo_step_s" not in res:
        return
    g = GRPO[mode]
    theirs = lambda key, fmt: fmt.format(res[key]) if key in res else ""  # noqa: E731
    what = (f"{g['name']}, {g['prompts']} x {g['generations']} completions of <= {g['completion']} tokens"
            f"{', packed' if res['grpo_packed'] else ''}")
    trl_sps = f"{1 / res['trl_grpo_step_s']:.2f} (TRL GRPOTrainer)" if "trl_grpo_step_s" in res else ""
    print(f"| GRPO steps/s ({what}) | {1 / res['grpo_step_s']:.2f} | {trl_sps} |")
    print(f"| GRPO rollout tokens/s | {res['grpo_rollout_tokens_per_s']:,.0f} | "
          f"{theirs('trl_grpo_rollout_tokens_per_s', '{:,.0f}')} |")
    print(f"| GRPO rollout share of a step | {res['grpo_rollout_s'] / res['grpo_step_s']:.0%} | "
          + (f"{res['trl_grpo_rollout_s'] / res['trl_grpo_step_s']:.0%}" if "trl_grpo_step_s" in res else "") + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=sorted(MODES), default="full")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-grpo", action="store_true", help="skip (d), the GRPO steps")
    args = p.parse_args()
    m = MODES[args.mode]
    base = load_model_config("llama3.1-8b")
    mc = dataclasses.replace(base, n_layers=m["layers"], dtype="bfloat16", param_dtype="float32", **m["dims"])
    dev = jax.devices()[0]
    res = {"mode": args.mode, "device": dev.device_kind, "jax": jax.__version__, "layers": mc.n_layers,
           "seq_len": m["seq"], "date": time.strftime("%Y-%m-%d")}
    res["matmul_bf16_flops"] = matmul_flops(m["n"], jnp.bfloat16)
    res["copy_bytes_per_s"] = copy_bandwidth(2**30 if args.mode == "full" else 2**24)
    peak = lookup(PEAK_FLOPS, dev.device_kind)
    n_matmul = mc.num_params() - mc.vocab_size * mc.dim - mc.n_layers * 2 * mc.dim - mc.dim
    fpt = flops_per_token(n_matmul, mc.n_layers, mc.n_heads, mc.head_dim, m["seq"])
    step_s = train_jax(mc, m["seq"], m["steps"])
    res["train_tokens_per_s"] = m["seq"] / step_s
    res["train_mfu_vs_peak"] = fpt * res["train_tokens_per_s"] / peak if peak else None
    res["train_mfu_vs_matmul"] = fpt * res["train_tokens_per_s"] / res["matmul_bf16_flops"]
    # each decode step reads every bf16 weight except the embedding table (a gather of B rows)
    weight_bytes = 2 * (mc.num_params() - (0 if mc.tie_embeddings else mc.vocab_size * mc.dim))
    for b in m["batches"]:
        s = decode_jax(mc, b, m["prompt"], m["new"])
        cache_bytes = 2 * 2 * mc.n_layers * b * (m["prompt"] + m["new"]) * mc.n_kv_heads * mc.head_dim
        res[f"decode_b{b}_tokens_per_s"] = b / s
        res[f"decode_b{b}_bandwidth_fraction"] = (weight_bytes + cache_bytes) / s / res["copy_bytes_per_s"]
    if not args.no_torch:
        res.update(torch_side(mc, m["seq"], m["batches"], m["prompt"], m["new"], m["steps"]))
    if not args.no_grpo:
        res.update(grpo_side(args.mode, "bfloat16" if dev.platform == "gpu" else "float32", args.no_torch))
    print(f"\n{res['date']}, {res['device']}, jax {res['jax']}: Llama 3.1 8B dims, {mc.n_layers} layers, "
          f"T = {m['seq']}, bf16 ({args.mode} mode)\n")
    print("| measurement | llama3-jax | transformers + torch |\n|---|---:|---:|")
    print(f"| train tokens/s | {res['train_tokens_per_s']:,.0f} | "
          f"{m['seq'] / res['torch_train_step_s'] if 'torch_train_step_s' in res else float('nan'):,.0f} |")
    mfu = res["train_mfu_vs_peak"]
    print(f"| train MFU vs dense bf16 peak | {'n/a' if mfu is None else f'{mfu:.1%}'} | |")
    print(f"| train MFU vs measured matmul ({res['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s) | "
          f"{res['train_mfu_vs_matmul']:.1%} | |")
    for b in m["batches"]:
        print(f"| decode batch {b} tokens/s | {res[f'decode_b{b}_tokens_per_s']:,.1f} | "
              f"{res.get(f'torch_decode_b{b}_tokens_per_s', float('nan')):,.1f} |")
        print(f"| decode batch {b} fraction of copy bandwidth ({res['copy_bytes_per_s'] / 1e9:.0f} GB/s) | "
              f"{res[f'decode_b{b}_bandwidth_fraction']:.1%} | |")
    print_grpo(res, args.mode)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
