"""Evaluation on the held-out split: when to evaluate, and the mean loss over `eval_batches` batches.

The held-out split is decided by a hash of each document's identity (data/sources.py), so the eval set
is the same on every run and every resume, and a run whose data holds no eval documents says so once
before the first step rather than failing at the first eval.
"""

from __future__ import annotations

import math
import sys

import jax
import numpy as np

from ..data import BATCH_KEYS, make_iterator, split_sizes
from ..failpoints import kill_point
from .config import TrainConfig
from .step import Setup

DATA_KIND = {"lm": "text", "sft": "sft", "dpo": "dpo"}  # objective -> data/ pipeline


def evaluate(cfg: TrainConfig, setup: Setup, params: dict, tok, reference: dict | None = None,
             documents: list | None = None) -> dict:
    """Mean loss over the first `eval_batches` batches of the held-out split (the same every time):
    lm/sft: `eval_loss` per target token and `eval_perplexity`; dpo: `eval_loss` per pair and TRL's
    `eval_rewards/...`, `eval_logps/...` (a perplexity of a DPO loss means nothing).

    Every process runs exactly `eval_batches` steps (each is a collective): a process whose share of
    the held-out data ends early feeds all-padding batches, which count no tokens."""
    total, count, sums = 0.0, 0.0, {}
    with make_iterator(cfg.data, tokenizer=tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                       split="eval", process_index=jax.process_index(),
                       process_count=jax.process_count(), kind=DATA_KIND[cfg.objective],
                       reference=reference, documents=documents) as it:
        padding = None
        for _ in range(cfg.eval_batches):
            batch = next(it, None)
            if batch is None:
                rows = cfg.batch_size // jax.process_count()
                padding = padding or {k: np.zeros((rows, cfg.seq_len), np.float32 if k == "ref_logps" else np.int32)
                                      for k in BATCH_KEYS + (("ref_logps",) if reference else ())}
                batch = padding
            s, n, m = jax.device_get(setup.eval_fn(params, setup.put_batch(batch)))
            kill_point("train.eval")
            total, count = total + float(s), count + float(n)
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
    loss = total / max(count, 1.0)
    if cfg.objective == "dpo":
        return {"eval_loss": loss, **{f"eval_{k}": v / max(count, 1.0) for k, v in sums.items()},
                "eval_pairs": int(count)}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": int(count)}


def eval_every(cfg: TrainConfig, is_main: bool, documents: list | None) -> int:
    """`eval_every`, or 0 when the data holds no eval documents (a single text file, a one-line JSONL,
    data.eval_fraction=0): decided here, before any step, rather than failing at the first eval."""
    if not cfg.eval_every:
        return 0
    sizes = split_sizes(cfg.data, documents)
    if sizes["eval"]:
        return cfg.eval_every
    if is_main:
        n = sizes["train"]
        print(f"train: warning: no eval documents in data.path {cfg.data.path} ({n} document"
              f"{'s' * (n != 1)}, data.eval_fraction={cfg.data.eval_fraction}): eval_every="
              f"{cfg.eval_every} ignored, no eval", file=sys.stderr)
    return 0
