"""The device side of `objective: ppo` (train/ppo.py is the host side): the state it trains (a policy
and a value model under one optimizer) and one pure jitted step that turns a scored rollout batch into
TRL's num_ppo_epochs x num_mini_batches updates (TRL v0.19 PPOTrainer.train, one "update").

    batch    N = batch_size rows, one completion per prompt (TRL's PPO draws one response per query):
             tokens = prompt + completion ids (the stop token included), targets the next ids,
             `index` (N, W) the positions whose outputs belong to completion positions t = 0 .. W-1
             (W = ppo.max_completion_length + 1; position len(prompt) - 1 + t: its logits give token t,
             its value is V_t, and t = length is the state after the last token), `lengths`,
             `has_eos`, `scores` (the reward at the end), `perms` (E, N): each epoch's row order.
    targets  the sampling policy's log-probs, the reference's and the value model's values at the W
             positions (`completion_view`), without gradient, in microbatch chunks; then
             ppo_loss.ppo_rollout_targets (KL-penalised rewards, GAE, whitened advantages) over the
             whole batch, as TRL computes them over its per-process batch.
    updates  for epoch e and mini batch m: rows perms[e, m*mb:(m+1)*mb] in grad_accum microbatches of
             contiguous rows (TRL's per-device microbatches, its local batch), each loss
             ppo_loss.ppo_loss, gradients added and divided by their count (TRL's accumulate), one
             optimizer update of {"policy", "value"} together: TRL's PolicyAndValueWrapper under one
             optimizer (one global-norm clip, one AdamW). The rate is held for the step's updates.
    metrics  objective/* of the rollout; policy/, loss/, val/ the means over every microbatch of every
             update (TRL's stats arrays of shape (epochs, mini batches, microbatches), averaged);
             `loss` the mean total loss, `grad_norm` the mean over updates.

The state: `params` the policy (full weights, or LoRA adapters: what generate and init_from read),
`value` the value model (a Llama trunk with the `score` head; with LoRA its adapters and head over a
frozen trunk), `opt_state` over {"policy": params, "value": value}, `step`. Frozen, in the compute
dtype: `ref` (full fine-tuning: the policy's start, the reference); with LoRA `base` (the policy's
base: the reference is it with the adapters off, no copy) and `value_base` when the value trunk is
another model's (a reward or value checkpoint); a value model from the policy's trunk reads `base`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..convert.load import model_config_of
from ..model import attention, lora
from ..model.config import ModelConfig
from ..model.llama import Adapters, abstract_model
from ..parallel.sharding import constrain, logical_spec, replicated
from ..store import checkpoint
from .config import TrainConfig
from .numerics import is_finite_step, keep_finite
from .objectives import token_logps
from .optim import make_optimizer, schedule
from .ppo_loss import PPO_METRICS, PPOConfig, ppo_loss, ppo_rollout_targets
from .step import Objective, Setup, forward, split_microbatches

TRUNK = ("embed", "layers", "norm")  # a score model's params besides its head
UPDATE_METRICS = PPO_METRICS[5:]  # ppo_loss's: policy/approxkl_avg ... val/ratio
ROWS = {"tokens": ("batch", "seq"), "positions": ("batch", "seq"), "segment_ids": ("batch", "seq"),
        "targets": ("batch", "seq"), "index": ("batch", "seq"), "lengths": ("batch",), "has_eos": ("batch",),
        "scores": ("batch",)}
LOGGED = ("logps", "ref_logps", "values", "advantages", "returns")  # per-token arrays the step hands back


def reward_checkpoint(spec: str) -> str | None:
    """The reward checkpoint ppo.reward_model names (`model:DIR`, or a DIR without a `:NAME`), None
    for a reward function (MODULE:NAME, path/to/file.py:NAME)."""
    if spec.startswith("model:"):
        return spec[len("model:"):]
    return spec if ":" not in spec or Path(spec).is_dir() else None


def value_source(cfg: TrainConfig) -> str | None:
    """The checkpoint the value model starts from: ppo.value_model, else the reward model; None (a
    reward function and no ppo.value_model): the policy's trunk."""
    return cfg.ppo.value_model or reward_checkpoint(cfg.ppo.reward_model)


def value_config(cfg: TrainConfig, mc: ModelConfig) -> ModelConfig:
    """The value model's shape: its source checkpoint's (or the policy's) with the `score` head, float32
    weights, the run's compute dtype; refused in one line when it cannot read the policy's rows."""
    src = value_source(cfg)
    key = "ppo.value_model" if cfg.ppo.value_model else "ppo.reward_model"
    try:
        vc = mc if src is None else model_config_of(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"{key} {src}: {e}") from None
    where = f"{key} {src}: the value model" if src else "the value model"
    if vc.vocab_size != mc.vocab_size:
        raise ValueError(f"{where} has vocab_size {vc.vocab_size}, the policy {mc.vocab_size}: it must read the "
                         f"policy's token ids (a model of the same tokenizer)")
    if vc.max_seq_len < cfg.seq_len or vc.quantization is not None:
        raise ValueError(f"{where}: max_seq_len {vc.max_seq_len}, quantization {vc.quantization}: it needs "
                         f"float weights and seq_len {cfg.seq_len} positions")
    return dataclasses.replace(vc, head="score", dtype=cfg.compute_dtype, param_dtype="float32")


class Spec(NamedTuple):
    """What the jitted step closes over (static)."""
    graphdef: Any
    value_graphdef: Any
    tx: optax.GradientTransformation
    lr_schedule: Any
    ppo: PPOConfig
    lora_rank: int
    lora_scale: float
    grad_accum: int
    nan_skip: bool


@dataclasses.dataclass
class PPOSetup(Setup):
    """step.Setup plus the value model: its config, graph and source checkpoint (None: the policy's trunk)."""
    value_cfg: ModelConfig | None = None
    value_graphdef: Any = None
    value_source: str | None = None


def completion_view(x: jax.Array, index: jax.Array) -> jax.Array:
    """(B, T) per-position values -> (B, W) at the completion positions `index` (module docstring)."""
    return jnp.take_along_axis(x, index, axis=1)


def _models(spec: Spec, trainable: dict, frozen: dict):
    """(policy params, policy adapters, value params, value adapters); LoRA: over the frozen trunks."""
    if not spec.lora_rank:
        return trainable["policy"], None, trainable["value"], None
    trunk = frozen["value_base"] if "value_base" in frozen else {k: frozen["base"][k] for k in TRUNK}
    return (frozen["base"], Adapters(trainable["policy"]["layers"], spec.lora_scale),
            {**trunk, "score": trainable["value"]["score"]}, Adapters(trainable["value"]["layers"], spec.lora_scale))


def _logps(spec: Spec, params: dict, mb: dict, adapters=None) -> jax.Array:
    """(B, W) log-probs of the completion tokens of logits / (temperature + 1e-7), as TRL's PPOTrainer."""
    logits = forward(spec.graphdef, params, mb, adapters).astype(jnp.float32) / (spec.ppo.temperature + 1e-7)
    return completion_view(token_logps(logits, mb["targets"]), mb["index"])


def policy_and_value(spec: Spec, trainable: dict, frozen: dict, mb: dict) -> tuple[jax.Array, jax.Array]:
    """The policy's log-probs and the value model's values (B, W) of a microbatch."""
    policy, p_ad, value, v_ad = _models(spec, trainable, frozen)
    values, _ = nnx.merge(spec.value_graphdef, value)(mb["tokens"], mb["positions"], mb["segment_ids"], lora=v_ad)
    return _logps(spec, policy, mb, p_ad), completion_view(values[..., 0], mb["index"])


def rollout_targets(spec: Spec, trainable: dict, frozen: dict, batch: dict, chunks: int) -> tuple[dict, dict]:
    """Sampling and reference log-probs, values (forwards in `chunks` microbatches, no gradient), then
    ppo_rollout_targets over the batch: (per-row arrays (N, W), objective/* metrics)."""
    rows = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "targets", "index")}
    ref_params = frozen["base"] if spec.lora_rank else frozen["ref"]

    def one(mb):
        logps, values = policy_and_value(spec, trainable, frozen, mb)
        return logps, _logps(spec, ref_params, mb), values

    def unsplit(y):  # split_microbatches' (n, N/n, W), row i*n + j at [j, i], back to (N, W)
        return constrain(y.swapaxes(0, 1).reshape(-1, y.shape[-1]), ("batch", "seq"))
    logps, ref, values = (jax.lax.stop_gradient(unsplit(y))
                          for y in jax.lax.map(one, split_microbatches(rows, chunks)))
    p = spec.ppo
    t = ppo_rollout_targets(batch["scores"], logps, ref, values, batch["lengths"], batch["has_eos"],
                            kl_coef=p.kl_coef, kl_estimator=p.kl_estimator, gamma=p.gamma, lam=p.lam,
                            whiten_rewards=p.whiten_rewards, missing_eos_penalty=p.missing_eos_penalty)
    out = {**rows, "old_logps": logps, "ref_logps": ref, **{k: t[k] for k in ("advantages", "returns", "values",
                                                                              "mask", "mask_1")}}
    return out, t["metrics"]


def microbatch_loss(spec: Spec, trainable: dict, frozen: dict, mb: dict) -> tuple[jax.Array, tuple]:
    """ppo_loss on one microbatch (TRL's local batch): (loss_sum, (count, metric sums))."""
    logps, vpred = policy_and_value(spec, trainable, frozen, mb)
    p = spec.ppo
    loss_sum, count, metrics = ppo_loss(logps, vpred, mb, mb["old_logps"], cliprange=p.cliprange,
                                        cliprange_value=p.cliprange_value, vf_coef=p.vf_coef)
    return loss_sum, (count, metrics)


def _update(spec: Spec, frozen: dict, data: dict, carry: tuple, ids: jax.Array) -> tuple[tuple, None]:
    """One optimizer update on the mini batch `ids` (rows of `data`), in grad_accum microbatches."""
    trainable, opt_state, sums = carry
    grad_fn = jax.value_and_grad(functools.partial(microbatch_loss, spec), has_aux=True)

    def micro(acc, rows):
        mb = {k: constrain(v[rows], ("batch", "seq")) for k, v in data.items()}
        (l, (n, m)), g = grad_fn(trainable, frozen, mb)
        return jax.tree.map(jnp.add, acc, (g, l, n, m)), None
    zero = (jax.tree.map(jnp.zeros_like, trainable), jnp.float32(0), jnp.float32(0),
            {k: jnp.float32(0) for k in UPDATE_METRICS})
    (grads, loss_sum, count, msum), _ = jax.lax.scan(micro, zero, ids.reshape(spec.grad_accum, -1))
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    updates, new_opt = spec.tx.update(grads, opt_state, trainable)
    new, grad_norm = optax.apply_updates(trainable, updates), optax.global_norm(grads)
    if spec.nan_skip:
        new, new_opt = keep_finite(is_finite_step(loss_sum, grad_norm), (new, new_opt), (trainable, opt_state))
    return (new, new_opt, jax.tree.map(jnp.add, sums, (loss_sum, count, msum, grad_norm))), None


def ppo_step(spec: Spec, state: dict, batch: dict, frozen: dict) -> tuple[dict, dict, dict]:
    """One PPO step (module docstring): (new state, metrics, the rollout's per-token arrays LOGGED)."""
    p = spec.ppo
    trainable = {"policy": state["params"], "value": state["value"]}
    chunks = p.num_mini_batches * spec.grad_accum
    data, rollout_metrics = rollout_targets(spec, trainable, frozen, batch, chunks)
    ids = batch["perms"].reshape(p.num_ppo_epochs * p.num_mini_batches, -1)
    zero = (jnp.float32(0), jnp.float32(0), {k: jnp.float32(0) for k in UPDATE_METRICS}, jnp.float32(0))
    train = {k: v for k, v in data.items() if k != "ref_logps"}
    (trainable, opt_state, (loss_sum, count, msum, norms)), _ = jax.lax.scan(
        functools.partial(_update, spec, frozen, train), (trainable, state["opt_state"], zero), ids)
    new_state = {"params": trainable["policy"], "value": trainable["value"], "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics = {"loss": loss_sum / count, "grad_norm": norms / ids.shape[0], "learning_rate": spec.lr_schedule(state["step"]),
               "tokens": jnp.sum(batch["lengths"]).astype(jnp.float32), **rollout_metrics,
               **{k: v / count for k, v in msum.items()}}
    logged = {"logps": data["old_logps"], "ref_logps": data["ref_logps"], "values": data["values"],
              "advantages": data["advantages"], "returns": data["returns"]}
    return new_state, metrics, logged


def _abstract(cfg: TrainConfig, mc: ModelConfig, vc: ModelConfig, obj: Objective, src: str | None, mesh):
    """(params, value, frozen) ShapeDtypeStructs with shardings (module docstring)."""
    def compute(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(cfg.compute_dtype), sharding=a.sharding),
                            tree)
    base, vbase = checkpoint.abstract_params(mc, mesh), checkpoint.abstract_params(vc, mesh)
    if not obj.lora.rank:
        return base, vbase, {"ref": compute(base)}
    frozen = {"base": compute(base)}
    if src is not None:  # the value trunk is another model's: a frozen copy of it
        frozen["value_base"] = compute({k: vbase[k] for k in TRUNK})
    return lora.abstract(mc, obj.lora, mesh), {**lora.abstract(vc, obj.lora, mesh), "score": vbase["score"]}, frozen


def build(cfg: TrainConfig, mc: ModelConfig, mesh) -> PPOSetup:
    """step.build for `objective: ppo`: the abstract sharded state (module docstring), the optimizer
    over policy and value, and the jitted step with explicit shardings, the state donated."""
    p = cfg.ppo
    tx = make_optimizer(cfg.optim, cfg.steps, p.num_ppo_epochs * p.num_mini_batches)
    backend = attention.resolve(cfg.attention, mesh.devices.flat[0].platform, cfg.seq_len)
    obj, vc, src = Objective.of(cfg), value_config(cfg, mc), value_source(cfg)

    def graph(c):
        return nnx.split(abstract_model(c, scan_layers=cfg.scan_layers, remat=cfg.remat, attention=backend))[0]
    params, value, frozen = _abstract(cfg, mc, vc, obj, src, mesh)
    trainable = {"policy": params, "value": value}
    opt = jax.eval_shape(tx.init, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, jax.tree.map(lambda a: a.sharding, trainable),
                                   transform_non_params=lambda _: replicated(mesh))
    abstract = {"params": params, "value": value,
                "opt_state": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt, opt_sh),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))}
    spec = Spec(graph(mc), graph(vc), tx, schedule(cfg.optim, cfg.steps), p, obj.lora.rank,
                obj.lora.scale if obj.lora.rank else 1.0, cfg.grad_accum, cfg.nan_policy == "skip")
    sh = jax.tree.map(lambda a: a.sharding, {"state": abstract, "frozen": frozen})
    batch_sh = {k: jax.sharding.NamedSharding(mesh, logical_spec(names, None, mesh)) for k, names in ROWS.items()}
    batch_sh["perms"] = replicated(mesh)
    step_jit = jax.jit(functools.partial(ppo_step, spec), in_shardings=(sh["state"], batch_sh, sh["frozen"]),
                       out_shardings=(sh["state"], replicated(mesh), replicated(mesh)), donate_argnums=0)
    return PPOSetup(mc, mesh, spec.graphdef, tx, abstract, step_jit, None, obj, frozen,
                    value_cfg=vc, value_graphdef=spec.value_graphdef, value_source=src)
