"""GRPO steps per second: llama3-jax's `objective: grpo` against TRL 1.16's GRPOTrainer, the same run.

    python benchmarks/rl.py [--steps 10 --warmup 3 --repeats 3 --json benchmarks/rl-results.json]

The run is configs/grpo.yaml's toy task on both sides:
  * the same tiny model: our random init of the config's model (byte tokenizer ids: BOS 256, EOS 257,
    <|eot_id|> 260), exported to Hugging Face by llama3_jax.convert's writer; both sides load it;
  * the same prompts (configs/data/grpo_prompts.jsonl; a text prompt is one user turn on both sides),
    the same reward function (configs/rewards/toy.py:letter_fraction, loaded by the same loader),
    --prompts prompts x --generations completions per step, up to --max-completion-length tokens at
    temperature 1, stopping at EOS / <|eot_id|>;
  * the same update: loss dapo, beta 0, one AdamW step per rollout (b2 0.95, clip 1.0, warmup 5 steps
    then cosine), float32, no gradient checkpointing, one process on the CPU.
TRL: GRPOTrainer with its plain transformers generation (no vLLM, no continuous batching), use_cpu,
bf16 off, `hf_byte_tokenizer()` below as its processing class (our ByteTokenizer's ids and a chat
template that renders prompts as ours do). Ours: `llama3-jax train --config configs/grpo.yaml
init_from=HF_DIR model=null ...` through the Python path the CLI takes (train.run_train).
tests/test_grpo_trl.py uses this file's tokenizer, records and TRL config, and proves TRL's prompt ids
equal ours and TRL's loss and gradient equal our step's for the same completions: what is timed here
is the same computation on both sides.

Each side runs in a child process of its own (no thread pools competing), alternately, `--repeats`
times; a repeat runs warmup + steps updates and times the last `steps` (the first ones compile or
warm up). Per step: wall seconds and where they go:
  rollout  sampling the completions (ours: Rollout.sample; TRL: `_generate`: tokenize, generate, decode)
  reward   the reward function and the advantages (ours: GRPO.score, which also builds the update's
           batch; TRL: `_calculate_rewards`)
  update   ours: the jitted train step (policy forward, backward, AdamW) with its batch placement;
           TRL: the step's remainder (padding, the policy forward/backward, the optimizer step)
  other    ours: the loop around them (prompts, the live params into the engine, metrics)
Rollout tokens/s = completion tokens (the stop token included, as TRL counts them) / rollout seconds.
The best repeat of each side (fewest seconds per step) goes in the table; the ratio is ours over TRL's
steps per second from the same invocation. Prints a markdown table; --json writes the same as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "grpo.yaml"
PROMPTS = ROOT / "configs" / "data" / "grpo_prompts.jsonl"
REWARD = f"{ROOT / 'configs' / 'rewards' / 'toy.py'}:letter_fraction"
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|reserved_special_token_0|>")  # ids 256..261, as llama3_jax.tokenizer.ByteTokenizer numbers them
# Llama 3's layout (chat.render_messages + the open assistant header of data/prompts.render_prompt)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def hf_byte_tokenizer():
    """A transformers tokenizer with our ByteTokenizer's ids: bytes 0-255 as themselves (byte-level BPE
    without merges), the specials at 256-261, pad = <|end_of_text|> (a stop id: nothing after it counts),
    eos = <|eot_id|>, and CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[4],
                                   pad_token=SPECIALS[1], chat_template=CHAT_TEMPLATE)


def trl_records(path: Path = PROMPTS) -> list[dict]:
    """The prompt records as TRL gets them: a text prompt as one user turn (ours renders it so too,
    data/prompts.render_prompt); the other fields stay columns for the reward function."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if isinstance(r["prompt"], str):
                r["prompt"] = [{"role": "user", "content": r["prompt"]}]
            out.append(r)
    return out


def reward_function(spec: str = REWARD):
    """The raw function our loader loads (serve/reward_fns.load), for TRL to call."""
    from llama3_jax.serve import reward_fns
    return reward_fns.load(spec).fn


def export_model(dst: Path, overrides=(), seed: int = 0) -> Path:
    """configs/grpo.yaml's model (with `overrides`), our seeded random init, with the byte tokenizer's
    BOS / EOS ids, exported to Hugging Face at DST by the converter's writer (convert/hf.py HFWriter,
    what `llama3-jax convert --from jax --to hf` writes with), float32. Returns DST."""
    import jax
    import numpy as np

    from llama3_jax.config_loader import load_yaml_config
    from llama3_jax.convert.hf import HFWriter
    from llama3_jax.convert.tensors import all_keys
    from llama3_jax.train import TrainConfig, init_params, model_config

    cfg = load_yaml_config(TrainConfig, str(CONFIG), list(overrides))
    mc = dataclasses.replace(model_config(cfg), bos_id=256, eos_ids=(257, 260))
    params = jax.device_get(jax.jit(init_params, static_argnums=(0, 1))(mc, seed))
    writer = HFWriter(Path(dst), mc, np.dtype(np.float32))
    for name, layer in all_keys(mc):
        group, _, leaf = name.partition("/")
        writer.add(name, layer, params[group][leaf][layer] if leaf else params[name])
    writer.finish()
    return Path(dst)


def trl_config(output_dir: str, **kw):
    """TRL's GRPOConfig for the toy run on the CPU (the loss and sampling settings of configs/grpo.yaml);
    `kw` overrides any field."""
    from trl import GRPOConfig

    args = dict(output_dir=output_dir, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                disable_tqdm=True, logging_steps=1, num_generations=8, max_completion_length=16,
                per_device_train_batch_size=32, gradient_accumulation_steps=1, temperature=1.0, top_p=1.0,
                top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2, learning_rate=6e-3,
                adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=5, lr_scheduler_type="cosine",
                gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
    return GRPOConfig(**{**args, **kw})


def trl_trainer(model, args, records: list[dict], **kw):
    """TRL's GRPOTrainer on the records with the reward function and the byte tokenizer."""
    from datasets import Dataset
    from trl import GRPOTrainer

    return GRPOTrainer(model=model, reward_funcs=reward_function(), args=args, train_dataset=Dataset.from_list(records),
                       processing_class=hf_byte_tokenizer(), **kw)


# ------------------------------------------------------------------------------------------ children


def time_trl(trainer, warmup: int) -> list[dict]:
    """Train with a GRPOTrainer, timing each step and its rollout (`_generate`: tokenize, generate,
    decode) and reward (`_calculate_rewards`) parts; the steps after `warmup`, as child_ours gives them.
    A step is the wall time from one step's start to the next's (its logging included, as ours is:
    the loop's time between metrics lines), so the trainer runs one step more than it reports."""
    from transformers import TrainerCallback

    phase = {"rollout": [], "reward": [], "tokens": [], "step": []}

    def timed(name, fn, count=None):
        def call(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            phase[name].append(time.perf_counter() - t)
            if count:
                phase["tokens"].append(count(out))
            return out
        return call
    # (prompt_ids, completion_ids, ...): completion ids up to and including the EOS, as TRL keeps them
    trainer._generate = timed("rollout", trainer._generate, lambda out: sum(len(c) for c in out[1]))
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)

    class StepClock(TrainerCallback):
        t = None

        def on_step_begin(self, *_, **__):
            now = time.perf_counter()
            if self.t is not None:
                phase["step"].append(now - self.t)
            self.t = now
    trainer.add_callback(StepClock())
    trainer.train()
    k = warmup
    return [dict(step=s, rollout=r, reward=w, tokens=n, update=s - r - w, other=0.0)
            for s, r, w, n in zip(phase["step"][k:], phase["rollout"][k:], phase["reward"][k:], phase["tokens"][k:])]


def child_trl(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
    args = trl_config(a.workdir, max_steps=a.warmup + a.steps + 1, num_generations=a.generations,
                      max_completion_length=a.max_completion_length,
                      per_device_train_batch_size=a.prompts * a.generations)
    return {"steps": time_trl(trl_trainer(model, args, trl_records()), a.warmup)}


def child_ours(a) -> dict:
    from llama3_jax.train import run_train

    workdir = Path(a.workdir) / "run"
    rows = a.prompts * a.generations
    overrides = [f"init_from={a.hf}", "model=null", f"workdir={workdir}", f"steps={a.warmup + a.steps}",
                 f"batch_size={a.prompts}", f"grpo.num_generations={a.generations}",
                 f"grpo.max_completion_length={a.max_completion_length}", "log_every=1",
                 f"checkpoint_every={10 ** 6}", "progress=false", "sample_tokens=0", "async_checkpoint=false",
                 *a.ours]
    run_train(str(CONFIG), overrides)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    seq_len = json.loads((workdir / "train_config.json").read_text())["seq_len"]
    steps = []
    for r in lines[a.warmup:]:
        s = rows * seq_len / r["tokens_per_second"]  # the loop's wall time since the previous line
        ro, rw, up = r["rollout_seconds"], r["reward_seconds"], r["update_seconds"]
        steps.append(dict(step=s, rollout=ro, reward=rw, update=up, other=s - ro - rw - up,
                          tokens=round(r["rollout_tokens_per_second"] * ro)))
    return {"steps": steps}


# ------------------------------------------------------------------------------------------ parent


def summarise(steps: list[dict]) -> dict:
    """Mean seconds per step and per phase over the timed steps of one repeat."""
    mean = {k: statistics.fmean(s[k] for s in steps) for k in ("step", "rollout", "reward", "update", "other")}
    tokens = sum(s["tokens"] for s in steps)
    return {**mean, "steps_per_second": 1 / mean["step"], "rollout_share": mean["rollout"] / mean["step"],
            "rollout_tokens_per_second": tokens / sum(s["rollout"] for s in steps),
            "completion_tokens_per_step": tokens / len(steps)}


def run_child(side: str, a, hf: Path, threads: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, __file__, "--child", side, "--hf", str(hf), "--workdir", work,
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--prompts", str(a.prompts),
               "--generations", str(a.generations), "--max-completion-length", str(a.max_completion_length),
               "--threads", str(threads), *[x for o in a.ours for x in ("--ours", o)]]
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"benchmarks/rl.py: the {side} child failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def table(best: dict, a, load: float) -> str:
    ours, trl = best["ours"], best["trl"]
    lines = [f"- run: configs/grpo.yaml's toy task, {a.prompts} prompts x {a.generations} generations per step, "
             f"up to {a.max_completion_length} completion tokens, float32; best of {a.repeats} repeats of "
             f"{a.warmup} + {a.steps} steps (the last {a.steps} timed); load average {load:.1f}",
             "", "| | llama3-jax | TRL 1.16 GRPOTrainer | ours / TRL |", "|---|---:|---:|---:|"]
    rows = [("seconds per step", "step", "{:.3f}"), ("steps per second", "steps_per_second", "{:.2f}"),
            ("rollout tokens/s", "rollout_tokens_per_second", "{:,.0f}"),
            ("completion tokens per step", "completion_tokens_per_step", "{:.0f}"),
            ("rollout share of a step", "rollout_share", "{:.0%}")]
    for name, key, fmt in rows:
        ratio = ours[key] / trl[key] if key in ("steps_per_second", "rollout_tokens_per_second") else None
        lines.append(f"| {name} | {fmt.format(ours[key])} | {fmt.format(trl[key])} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    for k in ("rollout", "reward", "update", "other"):
        lines.append(f"| {k} seconds per step | {ours[k]:.3f} ({ours[k] / ours['step']:.0%}) | "
                     f"{trl[k]:.3f} ({trl[k] / trl['step']:.0%}) | |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles, warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (configs/grpo.yaml's batch_size)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--trl-threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                   help="torch thread counts TRL runs with, each every repeat (its best is kept: on a busy "
                        "machine one thread can be several times faster than two)")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # a child's torch threads
    p.add_argument("--ours", action="append", default=[], help="an extra key=value for our run (repeatable)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--hf", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.child:
        out = child_trl(a) if a.child == "trl" else child_ours(a)
        print(json.dumps(out))
        return
    import torch
    import transformers
    import trl

    import jax
    with tempfile.TemporaryDirectory() as tmp:
        hf = export_model(Path(tmp) / "hf")
        runs = {"ours": [], "trl": []}
        sides = [("ours", 1)] + [("trl", t) for t in a.trl_threads]
        for r in range(a.repeats):
            for side, threads in sides if r % 2 == 0 else sides[::-1]:
                print(f"repeat {r + 1}/{a.repeats}: {side}{f' ({threads} threads)' if side == 'trl' else ''} ...",
                      file=sys.stderr)
                runs[side].append({**summarise(run_child(side, a, hf, threads)["steps"]), "threads": threads})
    best = {side: min(rs, key=lambda s: s["step"]) for side, rs in runs.items()}
    ratio = best["ours"]["steps_per_second"] / best["trl"]["steps_per_second"]
    load = os.getloadavg()[0]
    print(f"\n### GRPO: llama3-jax against TRL {trl.__version__}'s GRPOTrainer\n")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} (TRL's best of {a.trl_threads} threads: "
          f"{best['trl']['threads']}), transformers {transformers.__version__}, trl {trl.__version__}")
    print(table(best, a, load))
    each = {side: ", ".join(f"{s['step']:.3f}" + (f" ({s['threads']}t)" if side == "trl" else "") for s in rs)
            for side, rs in runs.items()}
    print(f"\nours / TRL steps per second: {ratio:.2f}x (best repeat of each; every repeat: ours {each['ours']} "
          f"s/step, TRL {each['trl']} s/step)")
    print(f"command: python benchmarks/rl.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average": load, "args": {k: v for k, v in vars(a).items() if k not in ("child", "hf", "workdir", "json")},
              "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "best": best, "repeats": runs, "ours_over_trl_steps_per_second": ratio}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
