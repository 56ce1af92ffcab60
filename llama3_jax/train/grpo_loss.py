"""GRPO's loss as TRL 1.16's GRPOTrainer defines it (Shao et al. 2024, DeepSeekMath), pure jnp.

Shapes: G completions of each prompt (``num_generations``), N = prompts * G completion rows, T the
completion positions (padded), all log-probs float32 (N, T) of the completion tokens under the
sampling temperature (logits / temperature, as TRL scores them).

    advantages   A_i = (r_i - mean_group(r)) / (std(r) + 1e-4); std the group's (scale_rewards
                 "group"), the whole generation batch's ("batch"), or no division ("none"); std with
                 Bessel's correction, NaN rewards (every reward function returned None) left out of
                 mean and std and given advantage 0 (trl/trainer/grpo_trainer.py,
                 _generate_and_score_completions, "sum_then_normalize").
    ratio        rho_t = exp(logp_t - old_logp_t): old = the sampling policy's log-probs, which equal the
                 current ones (no gradient) on the first of ``num_iterations`` updates of a rollout batch.
    token loss   l_t = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta * k3_t,
                 k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (Schulman's k3 KL estimator).
    loss_type    how the masked token losses become one number (TRL ``_compute_loss``):
                 grpo     mean over a sequence's tokens, then mean over sequences
                 dr_grpo  sum / (sequences * max_completion_length)
                 dapo     sum / tokens of the whole generation batch (TRL's num_items_in_batch)
                 bnpo     sum / tokens of one local batch (TRL: per_device_train_batch_size rows),
                          averaged over local batches.

How microbatching stays exact. ``grpo_token_loss`` returns ``(loss_sum, count, metric_sums)``, the house
convention (objectives.py): the step adds them over the microbatches of a generation batch and divides
once. Each loss type picks its numerator and count so that this is TRL's value for the whole batch:

    grpo     loss_sum = sum_i mean_t l_it      count = sequences
    dr_grpo  loss_sum = sum_it l_it / max_len  count = sequences
    dapo     loss_sum = sum_it l_it            count = tokens
    bnpo     loss_sum = sum_k mean_k           count = local batches (``local_batch`` rows each; None:
                                               the arrays given are one local batch)

(TRL with gradient accumulation over the generation batch, one process, steps_per_generation equal to
the accumulation steps: tests/test_rl_losses.py runs TRL's ``_compute_loss`` on microbatches and checks
that their accumulated loss and gradient are ours.) What can go wrong: a mean of microbatch means for
``dapo`` would weigh short completions by where they landed; a per-microbatch token count would make
the update depend on the microbatch size. Both are caught by that test.

Metrics with TRL's names. ``kl`` (beta > 0), ``entropy`` and ``clip_ratio/{low,high,region}_mean`` are
token means: their sums come back with a ``tokens`` sum and ``finish_grpo_metrics`` divides once, the
token mean over every microbatch (TRL logs the mean of per-microbatch token means; the same number for
one microbatch). ``reward_metrics`` and ``completion_metrics`` are computed where rewards are gathered
(the host, the whole generation batch, as TRL gathers them across processes).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
GRPO_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The ``grpo`` section: TRL 1.16 GRPOConfig's names and defaults."""
    reward_funcs: tuple[str, ...] = ()  # MODULE:NAME, path/to/file.py:NAME or model:DIR
    reward_weights: tuple[float, ...] | None = None  # one per reward function; None = all 1.0
    num_generations: int = 8  # completions per prompt (a group)
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    beta: float = 0.0  # KL weight to the reference; 0 = no reference model held
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: ratio <= 1 + epsilon_high; None = epsilon (DAPO: 0.28)
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # TRL also reads true = group, false = none
    num_iterations: int = 1  # updates per rollout batch (mu)
    mask_truncated_completions: bool = False  # completions that hit max_completion_length leave the loss

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):  # TRL's boolean spelling
            object.__setattr__(self, "scale_rewards", "group" if self.scale_rewards else "none")
        checks = (
            (self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}"),
            (self.scale_rewards in SCALE_REWARDS,
             f"scale_rewards={self.scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}"),
            (self.num_generations >= 2, f"num_generations={self.num_generations}: a group needs at least 2"),
            (self.max_completion_length >= 1, f"max_completion_length={self.max_completion_length}: expected >= 1"),
            (self.temperature > 0, f"temperature={self.temperature}: expected > 0"),
            (0 < self.top_p <= 1, f"top_p={self.top_p}: expected 0 < top_p <= 1"),
            (self.top_k >= 0, f"top_k={self.top_k}: expected >= 0 (0 = off)"),
            (self.beta >= 0, f"beta={self.beta}: expected >= 0 (0 = no reference model)"),
            (0 < self.epsilon < 1, f"epsilon={self.epsilon}: expected 0 < epsilon < 1"),
            (self.epsilon_high is None or self.epsilon_high > 0, f"epsilon_high={self.epsilon_high}: expected > 0"),
            (self.num_iterations >= 1, f"num_iterations={self.num_iterations}: expected >= 1"),
            (self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs),
             f"reward_weights has {len(self.reward_weights or ())} values for {len(self.reward_funcs)} reward_funcs"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"grpo.{message}")  # the dotted key first: grpo.loss_type=...

    @property
    def clip_range(self) -> tuple[float, float]:
        """(epsilon_low, epsilon_high) as the loss takes them: TRL's epsilon_high None = epsilon."""
        return self.epsilon, self.epsilon if self.epsilon_high is None else self.epsilon_high


def combine_rewards(rewards_per_func, weights=None) -> np.ndarray:
    """(N, F) rewards, NaN where a function returned None -> (N,) weighted sum over the functions that
    answered; NaN where none did (TRL: nansum, then the unscorable rows set back to NaN)."""
    per_func = np.asarray(rewards_per_func, np.float32)
    w = np.ones(per_func.shape[1], np.float32) if weights is None else np.asarray(weights, np.float32)
    total = np.nansum(per_func * w[None, :], axis=1).astype(np.float32)
    return np.where(np.isnan(per_func).all(axis=1), np.float32(np.nan), total)


def _nanstd(x, axis=None, keepdims=False):
    """TRL's nanstd: Bessel-corrected std over the non-NaN values; NaN with fewer than 2. numpy, float32:
    rewards live on the host, and a dozen eager jnp ops per step cost more than the rest of scoring."""
    x = np.asarray(x, np.float32)
    n = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    with warnings.catch_warnings():  # an all-NaN group: NaN, as TRL's
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=axis, keepdims=True)
        var = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True) * np.where(n > 1, n / np.maximum(n - 1, 1), np.nan)
    std = np.sqrt(var).astype(np.float32)
    return std if keepdims else np.squeeze(std, axis=axis)


def _nanmean(x, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(x, np.float32), axis=axis).astype(np.float32)


def _group_std(rewards, num_generations: int, scale_rewards: str):
    """(group means, the std advantages divide by) per completion, (N,) each."""
    r = np.asarray(rewards, np.float32)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    if r.shape[0] % num_generations:
        raise ValueError(f"{r.shape[0]} rewards are not whole groups of num_generations={num_generations}")
    groups = r.reshape(-1, num_generations)
    mean = np.repeat(_nanmean(groups, axis=1), num_generations)
    if scale_rewards == "batch":
        std = np.broadcast_to(_nanstd(r) if r.size > 1 else np.float32(0), r.shape)
    elif num_generations > 1:
        std = np.repeat(_nanstd(groups, axis=1), num_generations)
    else:
        std = np.zeros_like(r)
    return mean, std


def group_advantages(rewards, num_generations: int, scale_rewards: str = "group") -> np.ndarray:
    """(N,) rewards of N / G groups of G consecutive completions -> (N,) float32 advantages, TRL's
    formula (module docstring); a NaN reward gets advantage 0."""
    r = np.asarray(rewards, np.float32)
    mean, std = _group_std(r, num_generations, scale_rewards)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + np.float32(STD_EPS))
    return np.nan_to_num(adv, nan=0.0).astype(np.float32)


def reward_metrics(rewards_per_func, names, num_generations: int, scale_rewards: str = "group",
                   weights=None) -> dict:
    """TRL's reward metrics of one generation batch: rewards/<name>/mean, rewards/<name>/std (over the
    rows where that function answered), reward, reward_std (of the weighted sum), frac_reward_zero_std
    (share of completions whose group's -- batch's for scale_rewards batch -- std is 0)."""
    per_func = np.asarray(rewards_per_func, np.float32)
    if per_func.shape[1] != len(names):
        raise ValueError(f"{per_func.shape[1]} reward columns for {len(names)} reward function names")
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = float(_nanmean(per_func[:, i]))
        out[f"rewards/{name}/std"] = float(_nanstd(per_func[:, i]))
    rewards = combine_rewards(per_func, weights)
    _, std = _group_std(rewards, num_generations, scale_rewards)
    out["reward"] = float(_nanmean(rewards))
    out["reward_std"] = float(_nanstd(rewards))
    out["frac_reward_zero_std"] = float(np.mean(np.abs(std) <= 1e-8))  # torch.isclose(std, 0)
    return out


def completion_metrics(lengths, truncated) -> dict:
    """completions/mean_length, completions/max_length (tokens, the closing EOS counted),
    completions/clipped_ratio (share that ended without EOS, at max_completion_length)."""
    lengths, truncated = np.asarray(lengths, np.float32), np.asarray(truncated, bool)
    return {"completions/mean_length": float(lengths.mean()), "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.mean())}


def loss_mask(mask: jax.Array, truncated: jax.Array, mask_truncated_completions: bool) -> jax.Array:
    """The completion mask (N, T) with truncated rows (N,) zeroed when mask_truncated_completions."""
    if not mask_truncated_completions:
        return mask
    return mask * (1 - jnp.asarray(truncated).astype(mask.dtype))[:, None]


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Shannon entropy (nats) over the last axis, float32: logsumexp(z) - sum softmax(z) z."""
    z = logits.astype(jnp.float32)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)


def local_means(x: jax.Array, mask: jax.Array, local_batch: int | None) -> tuple[jax.Array, jax.Array]:
    """Sum over local batches of `local_batch` rows of the masked mean of x, and how many there are."""
    n = x.shape[0]
    k = 1 if local_batch is None else n // local_batch
    if local_batch is not None and n % local_batch:
        raise ValueError(f"{n} rows are not whole local batches of {local_batch}")
    sums = jnp.sum((x * mask).reshape(k, -1), axis=1)
    counts = jnp.sum(mask.reshape(k, -1), axis=1)
    return jnp.sum(sums / jnp.maximum(counts, 1.0)), jnp.float32(k)


def grpo_token_loss(logps, old_logps, ref_logps, advantages, mask, *, beta: float, epsilon_low: float,
                    epsilon_high: float, loss_type: str, max_completion_length: int | None = None,
                    local_batch: int | None = None, entropies=None) -> tuple[jax.Array, jax.Array, dict]:
    """GRPO's loss over one (micro)batch: (loss_sum, count, metric_sums), module docstring.

    logps (N, T) the policy's log-probs (differentiated), old_logps the sampling policy's (None: logps
    without gradient, TRL's num_iterations == 1), ref_logps the reference's (used when beta > 0),
    advantages (N,), mask (N, T) 1 on the completion tokens that train, entropies (N, T) or None."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    mask = mask.astype(jnp.float32)
    old = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    ratio = jnp.exp(logps - old)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if beta != 0.0:
        kl = jnp.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    rows = jnp.float32(logps.shape[0])
    if loss_type == "grpo":
        loss_sum = jnp.sum(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
        count = rows
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss_sum, count = jnp.sum(per_token * mask) / max_completion_length, rows
    elif loss_type == "dapo":
        loss_sum, count = jnp.sum(per_token * mask), jnp.sum(mask)
    else:
        loss_sum, count = local_means(per_token, mask, local_batch)
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).astype(jnp.float32)
    per_metric = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
                  "clip_ratio/region_mean": jnp.maximum(low, high)}
    if beta != 0.0:
        per_metric["kl"] = kl
    if entropies is not None:
        per_metric["entropy"] = entropies.astype(jnp.float32)
    metrics = {k: jax.lax.stop_gradient(jnp.sum(v * mask)) for k, v in per_metric.items()}
    metrics["tokens"] = jnp.sum(mask)
    return loss_sum, count, metrics


def finish_grpo_metrics(sums: dict) -> dict:
    """Token sums of grpo_token_loss (added over microbatches and devices) -> token means, TRL's names."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    return {k: v / tokens for k, v in sums.items() if k != "tokens"}
