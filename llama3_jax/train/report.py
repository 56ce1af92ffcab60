"""The end of a run: a sample from the trained weights (drawn with the serving engine, so it is what
`generate` would give) and the closing line that summarises the run on stderr. A reward model has no
output layer to sample from: its line says the final loss and accuracy (train and eval) instead."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import TrainConfig
from .step import Setup


def draw_sample(cfg: TrainConfig, setup: Setup, params: dict, tok) -> str:
    """Continuation of `sample_prompt` with the serving engine: greedy, or drawn with the run's seed."""
    from ..serve.engine import Generator
    from ..serve.sampling import from_flags
    gen = Generator(cfg=setup.model_cfg, params=setup.model_params(params), dtype=cfg.compute_dtype, mesh=setup.mesh,
                    tokenizer=tok)
    [completion] = gen.generate([cfg.sample_prompt], max_new_tokens=cfg.sample_tokens, batch_size=1,
                                sampling=from_flags(cfg.sample_temperature, cfg.sample_top_k), seed=cfg.seed)
    return completion.text


def report(cfg: TrainConfig, s: dict, workdir: Path) -> None:
    """WORKDIR/sample.txt and the sample line (when the run drew one), then the run's summary line."""
    if s["sample"] is not None:
        text = f"{cfg.sample_prompt}{s['sample']}"
        tmp = workdir / ".sample.txt.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, workdir / "sample.txt")
        how = "greedy" if cfg.sample_temperature == 0 else (
            f"temperature {cfg.sample_temperature:g}" + (f", top-k {cfg.sample_top_k}" if cfg.sample_top_k else ""))
        print(f"sample ({how}, {cfg.sample_tokens} tokens): {text!r}", file=sys.stderr)
    how = f"preempted ({s['stopped_by'] or 'SIGTERM'}), saved" if s["preempted"] else "done"
    loss = f", loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s["first_loss"] is not None else ""
    loss += f", accuracy {s['last_accuracy']:.3f}" if s.get("last_accuracy") is not None else ""  # a reward model
    ev = f", eval loss {s['eval_loss']:.4f}" if "eval_loss" in s else ""
    ev += f", eval accuracy {s['eval_accuracy']:.3f}" if "eval_accuracy" in s else ""
    ev += f", {s['truncated']} records truncated to seq_len" if s["truncated"] else ""
    speed = f", {s['tokens_per_second']:.0f} tokens/s" if s["tokens_per_second"] else ""
    print(f"train: {how}: steps {s['start_step']} -> {s['step']} in {s['seconds']:.0f}s "
          f"(startup {s['startup_seconds'] or 0:.0f}s){loss}{ev}{speed}; checkpoint {s['workdir']} step {s['step']}",
          file=sys.stderr)
