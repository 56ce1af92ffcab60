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
from .objectives import combine_metrics, finish_metrics
from .step import Setup, zero_metrics

# objective -> data/ pipeline (grpo: prompt records, data/prompts.py)
DATA_KIND = {"lm": "text", "sft": "sft", "dpo": "dpo", "reward": "reward", "grpo": "prompt", "ppo": "prompt"}
FLOAT_KEYS = ("ref_logps", "margin")  # batch keys that are float32 (the rest are int32 token data)


def _extra_keys(cfg: TrainConfig, reference: dict | None) -> tuple[str, ...]:
    """The batch keys beside BATCH_KEYS that the objective's batches carry: DPO's precomputed
    reference log-probs, a reward pair's margin."""
    return (("ref_logps",) if reference else ()) + (("margin",) if cfg.objective == "reward" else ())


def evaluate(cfg: TrainConfig, setup: Setup, params: dict, tok, reference: dict | None = None,
             documents: list | None = None) -> dict:
    """Mean loss over the first `eval_batches` batches of the held-out split (the same every time):
    lm/sft: `eval_loss` per target token and `eval_perplexity`; dpo: `eval_loss` per pair and TRL's
    `eval_rewards/...`, `eval_logps/...` (a perplexity of a DPO loss means nothing); reward: `eval_loss`
    per pair and TRL's `eval_accuracy`, `eval_margin`, `eval_mean_reward`, `eval_min_reward`,
    `eval_max_reward` (min / max over every eval batch, not summed: objectives.combine_metrics).

    Every process runs exactly `eval_batches` steps (each is a collective): a process whose share of
    the held-out data ends early feeds all-padding batches, which count no tokens."""
    total, count, sums = 0.0, 0.0, zero_metrics(setup.objective)  # each metric's identity (metric_identity)
    with make_iterator(cfg.data, tokenizer=tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                       split="eval", process_index=jax.process_index(),
                       process_count=jax.process_count(), kind=DATA_KIND[cfg.objective],
                       reference=reference, documents=documents) as it:
        padding = None
        for _ in range(cfg.eval_batches):
            batch = next(it, None)
            if batch is None:
                rows = cfg.batch_size // jax.process_count()
                padding = padding or {k: np.zeros((rows, cfg.seq_len), np.float32 if k in FLOAT_KEYS else np.int32)
                                      for k in BATCH_KEYS + _extra_keys(cfg, reference)}
                batch = padding
            s, n, m = jax.device_get(setup.eval_fn(params, setup.put_batch(batch)))
            kill_point("train.eval")
            total, count = total + float(s), count + float(n)
            sums = combine_metrics(sums, m)  # sums add, min / max combine
    loss = total / max(count, 1.0)
    if cfg.objective in ("dpo", "reward"):
        metrics = {k: float(v) for k, v in finish_metrics(sums, np.float32(count)).items()}
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}, "eval_pairs": int(count)}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": int(count)}


def eval_every(cfg: TrainConfig, is_main: bool, documents: list | None) -> int:
    """`eval_every`, or 0 when the data holds no eval documents (a single text file, a one-line JSONL,
    data.eval_fraction=0): decided here, before any step, rather than failing at the first eval."""
    if not cfg.eval_every:
        return 0
    if cfg.objective in ("grpo", "ppo"):  # no held-out loss: a rollout's loss says nothing without its rewards
        if is_main:
            print(f"train: warning: objective {cfg.objective} has no eval (its metrics are the rollouts' rewards): "
                  f"eval_every={cfg.eval_every} ignored", file=sys.stderr)
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
