"""The optimizer (optax AdamW + global-norm clip + warmup/cosine schedule) and the FLOP count.

Llama 3 was pretrained with AdamW (b1 0.9, b2 0.95, weight decay 0.1), gradients clipped to global
norm 1.0, linear warmup then cosine decay to a floor; those are the defaults here. Weight decay pulls
weights towards zero, which is meaningless for the RMSNorm gains (they multiply, their natural value
is 1) and harmful for rarely seen embedding rows, so both are masked out by parameter name.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from .losses import lm_loss  # noqa: F401  (its home is losses.py; kept importable from here)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached after warmup
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine length incl. warmup; 0 = the run's `steps`
    min_lr_ratio: float = 0.1  # floor of the cosine, as a fraction of `lr`
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # apply weight decay to `embed` too
    clip_norm: float = 1.0  # global-norm clip; 0 = off

    def __post_init__(self):
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError(f"optim: need lr > 0, 0 <= min_lr_ratio <= 1, warmup/decay steps >= 0 "
                             f"(got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}, "
                             f"warmup_steps={self.warmup_steps}, decay_steps={self.decay_steps})")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then cosine lr -> lr * min_lr_ratio until `decay_steps`
    (default: the end of the run), flat at the floor after that."""
    decay = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=decay,
        end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params: dict, decay_embeddings: bool = False) -> dict:
    """True where weight decay applies: every matrix except norms (and `embed` unless asked)."""
    def one(path, _):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name.endswith("norm"):
            return False
        return decay_embeddings or name != "embed"
    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, updates_per_step: int = 1) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW with the schedule and the name-based decay mask. `updates_per_step` > 1
    (PPO: epochs x mini batches per rollout) holds the rate for that many updates: the schedule counts
    steps, as TRL's PPOTrainer steps its scheduler once per rollout batch."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    rate = schedule(cfg, total_steps)
    if updates_per_step > 1:
        per_step = rate
        rate = lambda count: per_step(count // updates_per_step)  # noqa: E731
    parts.append(optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=lambda p: decay_mask(p, cfg.decay_embeddings)))
    return optax.chain(*parts)


def flops_per_token(n_matmul_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward 2N + backward 4N over the matmul weights) plus
    attention's scores and weighted sum, 6 * 2 * L * H * K * T (PaLM appendix B; full, not causal,
    square so numbers compare with other reports)."""
    return 6.0 * n_matmul_params + 12.0 * n_layers * n_heads * head_dim * seq_len
