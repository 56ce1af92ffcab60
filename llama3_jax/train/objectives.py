"""The loss family, as pure functions of (logits or token log-probs, batch). The train step picks one;
nothing else in training changes.

Each returns ``(loss_sum, count, metric_sums)``: the step adds these over microbatches and divides by
the total count once, so any microbatching or sharding gives the same update as one big batch.
``count`` is what the loss is an average over: target tokens for ``lm`` / ``sft``, preference pairs
for ``dpo``.

    lm   next-token cross-entropy where ``loss_mask`` is 1. Pretraining and SFT share it: SFT's data
         pipeline sets the mask on the assistant turns only (data/chat.py).
    dpo  Direct Preference Optimization (Rafailov et al. 2023), TRL's ``sigmoid`` loss with label
         smoothing (conservative DPO): with
             h = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
         loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h).
         Logged with TRL's names: rewards/chosen = beta (log pi - log ref)(y_w), rewards/rejected,
         rewards/accuracies (chosen > rejected), rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .optim import lm_loss

OBJECTIVES = ("lm", "sft", "dpo")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def lm(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
    """Summed cross-entropy over the ``loss_mask`` tokens, and their count."""
    loss_sum, count = lm_loss(logits, batch["targets"], batch["loss_mask"])
    return loss_sum, count, {}


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) per position, float32 (B, T)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def pair_logps(logps: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair sums of masked token log-probs: (chosen (B, P), rejected (B, P), valid (B, P)).

    The data pipeline packs pair p of a row as segments 2p - 1 (chosen) and 2p (rejected)
    (data/packing.py); a row of T tokens holds at most T // 2 pairs. Sums per segment are one
    segment_sum over row-offset segment ids. A pair is valid when both sides have trained tokens.
    """
    b, t = logps.shape
    p = t // 2 + 1
    width = 2 * p + 1
    mask = batch["loss_mask"].astype(jnp.float32)
    ids = (batch["segment_ids"] + width * jnp.arange(b)[:, None]).reshape(-1)
    sums = jax.ops.segment_sum((logps * mask).reshape(-1), ids, num_segments=b * width).reshape(b, width)
    counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=b * width).reshape(b, width)
    chosen, rejected = sums[:, 1::2][:, :p], sums[:, 2::2][:, :p]
    valid = (counts[:, 1::2][:, :p] > 0) & (counts[:, 2::2][:, :p] > 0)
    return chosen, rejected, valid


def dpo_from_pair_logps(chosen, rejected, ref_chosen, ref_rejected, valid, beta: float,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
    """DPO loss summed over valid pairs, their count, and TRL's metrics summed over them."""
    valid = valid.astype(jnp.float32)
    r_chosen, r_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    h = r_chosen - r_rejected
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    per_pair = dict(zip(DPO_METRICS, (r_chosen, r_rejected, (r_chosen > r_rejected).astype(jnp.float32),
                                      r_chosen - r_rejected, chosen, rejected)))
    metrics = {k: jnp.sum(v * valid) for k, v in per_pair.items()}
    return jnp.sum(losses * valid), jnp.sum(valid), metrics


def dpo(logps: jax.Array, ref_logps: jax.Array, batch: dict, beta: float,
        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
    """DPO from the policy's and the reference's token log-probs (B, T) of a packed pair batch."""
    chosen, rejected, valid = pair_logps(logps, batch)
    ref_chosen, ref_rejected, _ = pair_logps(ref_logps, batch)
    return dpo_from_pair_logps(chosen, rejected, ref_chosen, ref_rejected, valid, beta, label_smoothing)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # strength of the KL tie to the reference model
    label_smoothing: float = 0.0  # assumed fraction of flipped preference labels (cDPO); 0 = plain DPO
    precompute_reference: bool = False  # reference log-probs in a pass before training, not in each step

    def __post_init__(self):
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo: need beta > 0 and 0 <= label_smoothing < 0.5 "
                             f"(got beta={self.beta}, label_smoothing={self.label_smoothing})")
