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
    reward  a Bradley-Terry reward model (Ouyang et al. 2022, InstructGPT eq. 1), TRL's RewardTrainer:
         r = the score head at the last token of each side (model/llama.py `score`, `pair_last_positions`),
             loss = -log sigmoid(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2
         averaged over pairs; margin a per-pair column (0 without), c = center_rewards_coefficient (0 if
         None; Eisenstein et al. 2023: keeps rewards centred on 0). Logged with TRL's names: accuracy
         (r_chosen > r_rejected), margin (mean r_chosen - r_rejected, without the margin column),
         mean_reward, min_reward, max_reward (over both sides' rewards).

Min and max do not add: ``MINMAX`` names the metric sums that combine by ``jnp.minimum`` /
``jnp.maximum`` instead (over microbatches, devices and eval batches alike: ``combine_metrics``), start
from +inf / -inf (``metric_identity``) and are never divided by the count (``finish_metrics``). A batch
with no valid pair reports 0 for them, as it does for the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .optim import lm_loss

OBJECTIVES = ("lm", "sft", "dpo", "reward")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
REWARD_METRICS = ("accuracy", "margin", "mean_reward", "min_reward", "max_reward")
MINMAX = {"min_reward": jnp.minimum, "max_reward": jnp.maximum}  # metric -> how two of its values combine


def metric_identity(name: str) -> jax.Array:
    """The value a metric's combination starts from: 0 for sums, +inf for a min, -inf for a max."""
    return jnp.float32({"min_reward": jnp.inf, "max_reward": -jnp.inf}.get(name, 0.0))


def combine_metrics(a: dict, b: dict) -> dict:
    """Two metric dicts of the same keys as one: sums add, MINMAX metrics take the min / max."""
    return {k: MINMAX.get(k, jnp.add)(a[k], b[k]) for k in a}


def finish_metrics(sums: dict, count) -> dict:
    """Metric sums over `count` items -> the logged values: sums / count, min / max as they are (0 when
    nothing was counted, not +-inf)."""
    return {k: (jnp.where(count > 0, v, 0.0) if k in MINMAX else v / jnp.maximum(count, 1.0))
            for k, v in sums.items()}


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


def pair_last_positions(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each side of each packed pair ends: (chosen (B, P), rejected (B, P), valid (B, P)), the
    last position of segments 2p - 1 and 2p of a row (the packing of pair_logps), pure jnp.

    The reward of a side is the score head there: the position whose INPUT token is the side's last
    token, which is its closing <|eot_id|> (chat) or EOS (plain text) only when the side's examples are
    rendered unshifted (tokens = the whole side). DPO's examples are shifted (data/chat.py `example`:
    tokens = ids[:-1]), so there the last input is the token before the eot_id: the reward data must
    put the whole side in `tokens`. Valid: both sides have a position. Invalid slots point at 0.
    """
    seg = batch["segment_ids"]
    b, t = seg.shape
    p = t // 2 + 1
    width = 2 * p + 1
    ids = (seg + width * jnp.arange(b)[:, None]).reshape(-1)
    where = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)).reshape(-1)
    last = jax.ops.segment_max(where, ids, num_segments=b * width).reshape(b, width)  # empty: int32 min
    chosen, rejected = last[:, 1::2][:, :p], last[:, 2::2][:, :p]
    valid = (chosen >= 0) & (rejected >= 0)
    return jnp.maximum(chosen, 0), jnp.maximum(rejected, 0), valid


def reward(r_chosen: jax.Array, r_rejected: jax.Array, valid: jax.Array, margin: jax.Array | None = None,
           center_coef: float | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """Bradley-Terry loss summed over valid pairs, their count, and TRL's metrics (module docstring):
    sums, except min_reward / max_reward (MINMAX). All arguments (B, P); rewards float32."""
    h = r_chosen - r_rejected - (0.0 if margin is None else margin)
    losses = -jax.nn.log_sigmoid(h)
    if center_coef is not None:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    valid = valid.astype(bool)
    sums = {"accuracy": (r_chosen > r_rejected).astype(jnp.float32), "margin": r_chosen - r_rejected,
            "mean_reward": (r_chosen + r_rejected) / 2}  # per pair: /2 makes the count's mean a mean over both
    metrics = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in sums.items()}
    metrics["min_reward"] = jnp.min(jnp.where(valid, jnp.minimum(r_chosen, r_rejected), jnp.inf))
    metrics["max_reward"] = jnp.max(jnp.where(valid, jnp.maximum(r_chosen, r_rejected), -jnp.inf))
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid.astype(jnp.float32)), metrics


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


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    # TRL's name and meaning: weight of mean((r_chosen + r_rejected)^2), which centres rewards on 0 (None = off)
    center_rewards_coefficient: float | None = None

    def __post_init__(self):
        c = self.center_rewards_coefficient
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < float("inf")):
            raise ValueError(f"center_rewards_coefficient={c!r}: expected a finite number >= 0, or null")
