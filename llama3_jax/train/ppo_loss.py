"""PPO as TRL's PPOTrainer computed it (Ouyang et al. 2022; the InstructGPT and Llama 3 recipe), pure jnp.

TRL 1.16 no longer ships PPOTrainer; its math is transcribed from TRL v0.19.0
(trl/trainer/ppo_trainer.py, commit 5b3ea9dd43b526f188ef8f63ca16bbe977ec8603, lines 492-535 for the
rollout targets, 555-605 for the losses; trl/core.py masked_whiten), which tests/test_rl_losses.py
checks against a line-by-line torch transcription. Shapes: N completions, T completion positions,
``lengths`` (N,) the tokens of each completion (its closing EOS counted), log-probs / values float32.

    masks        mask   = t < length          the completion tokens (policy terms)
                 mask_1 = t <= length         one more: the state after the last token, whose value
                                              regresses onto the score (TRL's padding_mask_p1)
    rewards      r_t = -kl_coef * kl_t on the tokens, kl_t = logp - ref (k1) or
                 exp(ref - logp) - 1 - (ref - logp) (k3); the reward model's score is added at
                 t = length (t = length - 1 when the completion fills all T positions); scores less
                 ``missing_eos_penalty`` for completions without EOS. ``whiten_rewards``: r whitened
                 over mask_1 without shifting the mean.
    GAE          delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1} (Schulman et al.
                 2016), V and r 0 outside mask_1; returns = A + V; A then whitened over mask (mean 0,
                 std 1, Bessel) and 0 outside it.
    policy       ratio = exp(logp - old_logp), l = max(-A ratio, -A clip(ratio, 1 -+ cliprange)),
                 the masked mean over mask.
    value        l = 0.5 max((V' - R)^2, (clip(V', V -+ cliprange_value) - R)^2), masked mean over
                 mask_1; total loss = policy + vf_coef * value.

Microbatching. TRL averages each loss over the tokens of one per-device microbatch
(per_device_train_batch_size rows) and the gradient over the microbatches of a mini batch. The losses
here return ``(loss_sum, count, metric_sums)`` as every objective does (objectives.py): loss_sum = the
sum over local batches of ``local_batch`` rows of their masked means (None: the arrays given are one
local batch), count = how many local batches; the step adds both over microbatches and divides once,
which is TRL's value whatever the microbatch size, as long as it is a multiple of ``local_batch``.
The metrics (policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg, loss/value_avg,
val/clipfrac_avg, val/ratio) are TRL's per-local-batch values summed the same way: divide by count.
TRL's approxkl and ratio are means over every position of a local batch, padding included (where the
ratio is 1 and the difference 0): kept. One deviation: TRL's objective/entropy sums -logp over padding
too, where its log-probs are filled with 1 (INVALID_LOGPROB), lowering it by one per padding
position; here it is the sum over the completion tokens. Whitening is over the arrays given, TRL's
per-process rollout batch: the whole generation batch here (TRL's value with one process).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .grpo_loss import local_means

PPO_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
               "loss/value_avg", "val/clipfrac_avg", "val/ratio")
KL_ESTIMATORS = ("k1", "k3")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The ``ppo`` section: TRL PPOConfig's names and defaults (v0.19)."""
    reward_model: str | None = None  # a reward checkpoint (head score): the score at each completion's end
    value_model: str | None = None  # the value model's start; None = the reward model
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion without EOS
    max_completion_length: int = 53  # TRL's response_length
    temperature: float = 0.7

    def __post_init__(self):
        checks = (
            (self.kl_coef >= 0, f"kl_coef={self.kl_coef}: expected >= 0"),
            (self.kl_estimator in KL_ESTIMATORS, f"kl_estimator={self.kl_estimator!r}: expected k1 or k3"),
            (self.cliprange > 0, f"cliprange={self.cliprange}: expected > 0"),
            (self.cliprange_value > 0, f"cliprange_value={self.cliprange_value}: expected > 0"),
            (self.vf_coef >= 0, f"vf_coef={self.vf_coef}: expected >= 0"),
            (0 <= self.gamma <= 1, f"gamma={self.gamma}: expected 0 <= gamma <= 1"),
            (0 <= self.lam <= 1, f"lam={self.lam}: expected 0 <= lam <= 1"),
            (self.num_ppo_epochs >= 1, f"num_ppo_epochs={self.num_ppo_epochs}: expected >= 1"),
            (self.num_mini_batches >= 1, f"num_mini_batches={self.num_mini_batches}: expected >= 1"),
            (self.missing_eos_penalty is None or abs(self.missing_eos_penalty) < float("inf"),
             f"missing_eos_penalty={self.missing_eos_penalty}: expected a finite number or null"),
            (self.max_completion_length >= 1, f"max_completion_length={self.max_completion_length}: expected >= 1"),
            (self.temperature > 0, f"temperature={self.temperature}: expected > 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ppo.{message}")


def response_masks(lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """(mask, mask_1), float32 (N, width): t < length and t <= length (module docstring)."""
    t = jnp.arange(width)[None, :]
    n = jnp.asarray(lengths)[:, None]
    return (t < n).astype(jnp.float32), (t <= n).astype(jnp.float32)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """TRL's masked_whiten: (x - mean) / sqrt(var + 1e-8) over the mask, var with Bessel's correction;
    the mean added back when not shift_mean."""
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(n, 1.0)
    var = jnp.sum((x - mean) ** 2 * mask) / jnp.maximum(n, 1.0) * n / jnp.maximum(n - 1, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation over (N, T), rewards and values 0 outside the mask, V_T = 0:
    (advantages, returns = advantages + values), not whitened."""
    r, v = rewards * mask, values * mask
    v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)

    def back(carry, x):
        r_t, v_t, v_n = x
        carry = r_t + gamma * v_n - v_t + gamma * lam * carry
        return carry, carry

    _, adv = jax.lax.scan(back, jnp.zeros_like(r[:, 0]), (r.T, v.T, v_next.T), reverse=True)
    return adv.T, adv.T + v


def ppo_rollout_targets(scores, logps, ref_logps, values, lengths, has_eos, *, kl_coef: float,
                        kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                        whiten_rewards: bool = False, missing_eos_penalty: float | None = None) -> dict:
    """What the PPO epochs train towards, from one rollout batch: scores (N,) the reward model's,
    logps / ref_logps (N, T) the sampling policy's and the reference's, values (N, T) the value
    model's, lengths (N,), has_eos (N,). Returns advantages, returns, values (masked), mask, mask_1 and
    the objective/* metrics (means over completions)."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r}: expected k1 or k3")
    n, width = logps.shape
    mask, mask_1 = response_masks(lengths, width)
    scores = jnp.asarray(scores, jnp.float32)
    if missing_eos_penalty is not None:
        scores = jnp.where(jnp.asarray(has_eos, bool), scores, scores - missing_eos_penalty)
    logr = (ref_logps - logps) * mask
    kl = -logr if kl_estimator == "k1" else jnp.expm1(logr) - logr
    non_score = -kl_coef * kl
    end = jnp.where(lengths < width, lengths, lengths - 1)
    rewards = non_score + jax.nn.one_hot(end, width, dtype=jnp.float32) * scores[:, None]
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask_1, shift_mean=False) * mask_1
    values = values * mask_1
    adv, returns = gae(rewards, values, mask_1, gamma, lam)
    adv = masked_whiten(adv, mask) * mask
    mean_non_score = jnp.mean(jnp.sum(non_score, axis=1))
    metrics = {"objective/kl": jnp.mean(jnp.sum(kl, axis=1)),
               "objective/entropy": jnp.mean(jnp.sum(-logps * mask, axis=1)),
               "objective/non_score_reward": mean_non_score,
               "objective/rlhf_reward": mean_non_score + jnp.mean(scores),
               "objective/scores": jnp.mean(scores)}
    return {"advantages": adv, "returns": returns, "values": values, "mask": mask, "mask_1": mask_1,
            "metrics": metrics}


def ppo_policy_loss(logps, old_logps, advantages, mask, cliprange: float,
                    local_batch: int | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """The clipped surrogate: (sum of local-batch masked means, local batches, metric sums)."""
    diff = (logps - old_logps) * mask  # TRL: both filled with the same INVALID_LOGPROB off the mask
    ratio = jnp.exp(diff)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss_sum, count = local_means(jnp.maximum(loss1, loss2), mask, local_batch)
    every = jnp.ones_like(mask)
    sg = jax.lax.stop_gradient
    metrics = {"policy/clipfrac_avg": local_means((loss2 > loss1).astype(jnp.float32), mask, local_batch)[0],
               "policy/approxkl_avg": local_means(0.5 * sg(diff) ** 2, every, local_batch)[0],
               "val/ratio": local_means(sg(ratio), every, local_batch)[0],
               "loss/policy_avg": sg(loss_sum)}
    return loss_sum, count, metrics


def ppo_value_loss(vpred, old_values, returns, mask_1, cliprange_value: float,
                   local_batch: int | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """The clipped value loss, 0.5 max(...) (module docstring): (sum of local-batch means, local
    batches, metric sums)."""
    vpred = vpred * mask_1
    clipped = jnp.clip(vpred, old_values - cliprange_value, old_values + cliprange_value)
    loss1, loss2 = (vpred - returns) ** 2, (clipped - returns) ** 2
    loss_sum, count = local_means(jnp.maximum(loss1, loss2), mask_1, local_batch)
    loss_sum = 0.5 * loss_sum
    metrics = {"val/clipfrac_avg": local_means((loss2 > loss1).astype(jnp.float32), mask_1, local_batch)[0],
               "loss/value_avg": jax.lax.stop_gradient(loss_sum)}
    return loss_sum, count, metrics


def ppo_loss(logps, vpred, targets: dict, old_logps, *, cliprange: float, cliprange_value: float,
             vf_coef: float, local_batch: int | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """policy + vf_coef * value over one microbatch of a rollout's targets (ppo_rollout_targets rows)."""
    pg, count, metrics = ppo_policy_loss(logps, old_logps, targets["advantages"], targets["mask"], cliprange,
                                         local_batch)
    vf, _, value_metrics = ppo_value_loss(vpred, targets["values"], targets["returns"], targets["mask_1"],
                                          cliprange_value, local_batch)
    return pg + vf_coef * vf, count, {**metrics, **value_metrics}
