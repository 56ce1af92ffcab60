"""The pure, jitted parts of training: the train step (with gradient accumulation), the eval step,
sharded init, and `build`, which derives every shape and sharding of the state without allocating."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .. import checkpoint
from ..config import ModelConfig
from .. import attention
from ..losses import chunked_lm_loss, resolve_chunk
from ..model import Llama, abstract_model
from ..optim import make_optimizer, schedule
from ..sharding import constrain, global_batch, logical_spec, replicated
from .config import TrainConfig


def split_microbatches(batch: dict, n: int) -> dict:
    """(B, T) -> (n, B/n, T), microbatch j = rows j, n + j, 2n + j, ...: each device's contiguous rows
    spread evenly over the microbatches, so splitting moves no data between devices."""
    def one(x):
        return constrain(x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), (None, "batch", "seq"))
    return jax.tree.map(one, batch)


def loss_and_count(graphdef, params: dict, batch: dict, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss and counted tokens of a batch (losses.chunked_lm_loss: the output
    projection applied `loss_chunk` positions at a time; 0 = at once)."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], hidden_only=True)
    return chunked_lm_loss(hidden, model.output_weight(), batch["targets"], batch["loss_mask"], loss_chunk)


def train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, grad_accum: int,
               state: dict, batch: dict, loss_chunk: int = 0) -> tuple[dict, dict]:
    """One update. state = {params, opt_state, step}; batch = dict of (B, T) int32 (data.BATCH_KEYS).

    Gradients of the SUMMED loss are added over `grad_accum` microbatches (lax.scan) and divided once
    by the batch's token count, so any microbatching gives the same update as one big batch.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_and_count, graphdef, loss_chunk=loss_chunk), has_aux=True)
    params = state["params"]
    if grad_accum == 1:
        (loss_sum, count), grads = grad_fn(params, batch)
    else:
        def micro(carry, mb):
            (l, n), g = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (g, l, n)), None
        zero = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
        (grads, loss_sum, count), _ = jax.lax.scan(micro, zero, split_microbatches(batch, grad_accum))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads),
               "learning_rate": lr_schedule(state["step"]), "tokens": count}
    return new_state, metrics


def eval_step(graphdef, params: dict, batch: dict, grad_accum: int = 1, loss_chunk: int = 0):
    """(loss sum, token count) of a batch, in the train step's `grad_accum` microbatches (a run that
    needs microbatches to fit a train step needs them for eval too)."""
    if grad_accum == 1:
        return loss_and_count(graphdef, params, batch, loss_chunk)

    def micro(carry, mb):
        return jax.tree.map(jnp.add, carry, loss_and_count(graphdef, params, mb, loss_chunk)), None
    total, _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), split_microbatches(batch, grad_accum))
    return total


def init_params(cfg: ModelConfig, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


# --------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """What the loop needs, built once per run: shapes/shardings of the state and the jitted steps."""

    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract: dict  # {params, opt_state, step}: ShapeDtypeStruct with shardings
    step_fn: Callable  # (state, batch) -> (state, metrics); donates state
    eval_fn: Callable  # (params, batch) -> (loss sum, token count)

    @property
    def shardings(self) -> dict:
        return jax.tree.map(lambda a: a.sharding, self.abstract)

    def put_batch(self, local: dict) -> dict:
        return {k: global_batch(self.mesh, v) for k, v in local.items()}

    def init_state(self, seed: int, params: dict | None = None) -> dict:
        """Fresh sharded state: given params (already placed) or a jitted init straight into shardings."""
        sh = self.shardings
        if params is None:
            def fresh():
                p = init_params(self.model_cfg, seed)
                return {"params": p, "opt_state": self.tx.init(p), "step": jnp.int32(0)}
            return jax.jit(fresh, out_shardings=sh)()
        opt_state = jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params)
        return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(0), sh["step"])}


def build(cfg: TrainConfig, model_cfg: ModelConfig, mesh) -> Setup:
    """Abstract sharded state (optimizer shardings mirror the params' via optax.tree_map_params) and
    the jitted step/eval with explicit in/out shardings. Nothing is allocated here."""
    tx = make_optimizer(cfg.optim, cfg.steps)
    backend = attention.resolve(cfg.attention, mesh.devices.flat[0].platform, cfg.seq_len)
    loss_chunk = resolve_chunk(cfg.loss_chunk, cfg.batch_size // cfg.grad_accum, cfg.seq_len, model_cfg.vocab_size)
    graphdef, _ = nnx.split(abstract_model(model_cfg, scan_layers=cfg.scan_layers, remat=cfg.remat, attention=backend))
    params = checkpoint.abstract_params(model_cfg, mesh)
    param_sh = jax.tree.map(lambda a: a.sharding, params)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, param_sh, transform_non_params=lambda _: replicated(mesh))
    abstract = {
        "params": params,
        "opt_state": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt, opt_sh),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
    }
    state_sh = jax.tree.map(lambda a: a.sharding, abstract)
    batch_sh = jax.sharding.NamedSharding(mesh, logical_spec(("batch", "seq"), None, mesh))
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx, schedule(cfg.optim, cfg.steps), cfg.grad_accum,
                                        loss_chunk=loss_chunk),
                      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(mesh)),
                      donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef, grad_accum=cfg.grad_accum, loss_chunk=loss_chunk),
                      in_shardings=(param_sh, batch_sh),
                      out_shardings=replicated(mesh))
    return Setup(model_cfg, mesh, graphdef, tx, abstract, step_fn, eval_fn)
