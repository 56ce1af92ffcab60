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

from ..store import checkpoint
from ..model import lora
from . import grpo_batch
from . import grpo_loss as grpo_lib
from . import objectives
from ..model.config import ModelConfig
from ..model import attention
from ..model.lora import LoraConfig
from .losses import chunked_lm_loss, resolve_chunk
from ..model.llama import Adapters, Llama, abstract_model, output_logits, rewards_at
from .objectives import DPOConfig, RewardConfig
from .optim import make_optimizer, schedule
from ..parallel.sharding import constrain, global_batch, local_shape, logical_spec, replicated
from .config import GRPOConfig, TrainConfig
from .numerics import is_finite_step, keep_finite


def split_microbatches(batch: dict, n: int) -> dict:
    """(B, T) -> (n, B/n, T), microbatch j = rows j, n + j, 2n + j, ...: each device's contiguous rows
    spread evenly over the microbatches, so splitting moves no data between devices."""
    def one(x):
        return constrain(x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), (None, "batch", "seq"))
    return jax.tree.map(one, batch)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step minimises (static under jit): `objective` (objectives.py), LoRA or full weights."""

    name: str = "lm"
    lora: LoraConfig = LoraConfig()
    dpo: DPOConfig = DPOConfig()
    seed: int = 0  # LoRA dropout keys: fold_in(key(seed), step), then the microbatch
    loss_chunk: int = 0  # lm/sft: output projection + NLL over chunks of this many positions (0 = at once)
    reward: RewardConfig = RewardConfig()
    grpo: GRPOConfig = GRPOConfig()

    @classmethod
    def of(cls, cfg: TrainConfig, loss_chunk: int = 0) -> Objective:
        return cls(cfg.objective, cfg.lora, cfg.dpo, cfg.seed, loss_chunk, cfg.reward, cfg.grpo)

    @property
    def in_step_reference(self) -> bool:
        """Whether the step reads a reference model (frozen["ref"] with full weights; LoRA: the base)."""
        return (self.name == "dpo" and not self.dpo.precompute_reference) or (self.name == "grpo" and self.grpo.beta > 0)


def forward(graphdef, params: dict, batch: dict, adapters: Adapters | None = None) -> jax.Array:
    logits, _ = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"], batch["segment_ids"], lora=adapters)
    return logits


def loss_and_count(graphdef, params: dict, batch: dict, loss_chunk: int = 0,
                   adapters: Adapters | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss and counted tokens of a batch (losses.chunked_lm_loss: the output
    projection applied `loss_chunk` positions at a time; 0 = at once)."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], hidden_only=True, lora=adapters)
    return chunked_lm_loss(hidden, model.output_weight(), batch["targets"], batch["loss_mask"], loss_chunk)


def reward_loss(obj: Objective, graphdef, params: dict, batch: dict,
                adapters: Adapters | None = None) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """The reward objective: final-norm hidden states, the score head at the last position of each side
    of each packed pair (objectives.pair_last_positions), the Bradley-Terry loss. A batch key `margin`
    (B, T) float32 gives each pair's margin at its chosen side's last position."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], hidden_only=True, lora=adapters)
    chosen, rejected, valid = objectives.pair_last_positions(batch)
    r = rewards_at(hidden, model.score[...], jnp.concatenate([chosen, rejected], axis=1))  # one gather
    p = chosen.shape[1]
    margin = jnp.take_along_axis(batch["margin"], chosen, axis=1) if "margin" in batch else None
    loss_sum, count, metrics = objectives.reward(r[:, :p], r[:, p:], valid, margin,
                                                 obj.reward.center_rewards_coefficient)
    return loss_sum, (count, metrics)


def completion_rows(batch: dict, key: str, generations: int) -> jax.Array:
    """A rollout batch's per-completion array as (completions, positions): the rows layout's as it is,
    the packed layout's (B, G*C) as (B*G, C) (train/grpo_batch.py)."""
    x = batch[key]
    return x.reshape(-1, x.shape[1] // generations) if "logit_at" in batch else x


def policy_logps(graphdef, params: dict, batch: dict, temperature: float, generations: int,
                 adapters: Adapters | None = None) -> tuple[jax.Array, jax.Array]:
    """GRPO's view of a rollout batch: (log-probs of the targets (N, T), float32 logits (N, T, V)), both
    of logits / temperature, as TRL scores completions with the sampling temperature; N completions
    (grpo_batch.py's layouts: a packed batch's final hidden states gathered at `logit_at`, so the
    output layer runs on completion tokens only)."""
    if "logit_at" not in batch:
        logits = forward(graphdef, params, batch, adapters).astype(jnp.float32) / temperature
        return objectives.token_logps(logits, batch["targets"]), logits
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], hidden_only=True, lora=adapters)
    picked = jnp.take_along_axis(hidden, batch["logit_at"][..., None], axis=1)  # (B, G*C, D)
    logits = output_logits(picked, model.output_weight()) / temperature
    logits = logits.reshape(-1, logits.shape[1] // generations, logits.shape[-1])
    return objectives.token_logps(logits, completion_rows(batch, "targets", generations)), logits


def sampling_logps(obj: Objective, graphdef, trainable: dict, frozen: dict, batch: dict) -> jax.Array:
    """The policy's log-probs of a rollout batch before its updates (grpo.num_iterations > 1: the
    importance ratios' denominator, batch key `old_logps`); LoRA: the adapters on the frozen base."""
    if obj.lora.rank:
        params, adapters = frozen["base"], Adapters(trainable["layers"], obj.lora.scale, 0.0, None)
    else:
        params, adapters = trainable, None
    logps = policy_logps(graphdef, params, batch, obj.grpo.temperature, obj.grpo.num_generations, adapters)[0]
    return logps.reshape(batch["targets"].shape)  # the batch's layout: split and sharded with it


def grpo_step_loss(obj: Objective, graphdef, params: dict, batch: dict, frozen: dict,
                   adapters: Adapters | None) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """GRPO (grpo_loss.py) on a rollout batch (train/rl.py): `loss_mask` on the completion tokens,
    `advantages` per row (every column the same), `old_logps` when num_iterations > 1; the reference's
    log-probs (beta > 0) from frozen["ref"], or with LoRA the base with the adapters off."""
    g = obj.grpo
    rows = functools.partial(completion_rows, batch, generations=g.num_generations)
    logps, logits = policy_logps(graphdef, params, batch, g.temperature, g.num_generations, adapters)
    ref = None
    if g.beta:
        ref_params = frozen["base"] if obj.lora.rank else frozen["ref"]
        ref = jax.lax.stop_gradient(policy_logps(graphdef, ref_params, batch, g.temperature, g.num_generations)[0])
    low, high = g.epsilon, g.epsilon if g.epsilon_high is None else g.epsilon_high
    loss_sum, count, metrics = grpo_lib.grpo_token_loss(
        logps, rows("old_logps") if g.num_iterations > 1 else None, ref, rows("advantages")[:, 0],
        rows("loss_mask"), beta=g.beta, epsilon_low=low, epsilon_high=high, loss_type=g.loss_type,
        max_completion_length=g.max_completion_length, entropies=grpo_lib.entropy_from_logits(logits))
    return loss_sum, (count, metrics)


def objective_loss(obj: Objective, graphdef, trainable: dict, frozen: dict, batch: dict,
                   key: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """(summed loss, (count, summed metrics)) of the objective; differentiable in `trainable`.

    Full fine-tuning: `trainable` is the model's params; DPO's reference is `frozen["ref"]`. LoRA:
    `trainable` is the adapters, the model is `frozen["base"]`, and the reference is that base with the
    adapters off (no second copy of the weights). A reward model's LoRA trains its `score` head too
    (PEFT's modules_to_save): `trainable["score"]` replaces the base's.
    """
    if obj.lora.rank:
        params = frozen["base"] if "score" not in trainable else {**frozen["base"], "score": trainable["score"]}
        adapters = Adapters(trainable["layers"], obj.lora.scale, obj.lora.dropout, key)
    else:
        params, adapters = trainable, None
    if obj.name == "reward":
        return reward_loss(obj, graphdef, params, batch, adapters)
    if obj.name == "grpo":
        return grpo_step_loss(obj, graphdef, params, batch, frozen, adapters)
    if obj.name != "dpo":  # lm and sft: the loss mask says which tokens count
        loss_sum, count = loss_and_count(graphdef, params, batch, obj.loss_chunk, adapters)
        return loss_sum, (count, {})
    logits = forward(graphdef, params, batch, adapters)
    if "ref_logps" in batch:  # dpo.precompute_reference: computed once before training (loop.py)
        ref = batch["ref_logps"]
    else:
        ref_params = frozen["base"] if obj.lora.rank else frozen["ref"]
        ref = jax.lax.stop_gradient(objectives.token_logps(forward(graphdef, ref_params, batch), batch["targets"]))
    loss_sum, count, metrics = objectives.dpo(objectives.token_logps(logits, batch["targets"]), ref, batch,
                                              obj.dpo.beta, obj.dpo.label_smoothing)
    return loss_sum, (count, metrics)


def zero_metrics(obj: Objective) -> dict:
    """The objective's metric sums at their identity (the carry of a scan over microbatches): 0, and
    +-inf for the min / max of objectives.MINMAX."""
    names = {"dpo": objectives.DPO_METRICS, "reward": objectives.REWARD_METRICS}.get(obj.name, ())
    if obj.name == "grpo":  # grpo_token_loss's token sums (kl only with a reference)
        names = [k for k in grpo_lib.GRPO_METRICS if k != "kl" or obj.grpo.beta] + ["tokens"]
    return {k: objectives.metric_identity(k) for k in names}


def _accumulate(carry: tuple, new: tuple) -> tuple:
    """(..., summed metrics) + (..., summed metrics): every leaf adds, except MINMAX metrics (min / max)."""
    *head, metrics = carry
    *new_head, new_metrics = new
    return (*jax.tree.map(jnp.add, tuple(head), tuple(new_head)), objectives.combine_metrics(metrics, new_metrics))


def train_step(obj: Objective, graphdef, tx: optax.GradientTransformation, lr_schedule, grad_accum: int,
               state: dict, batch: dict, frozen: dict, *, nan_skip: bool = False) -> tuple[dict, dict]:
    """One update. state = {params, opt_state, step} (params: the model's, or LoRA adapters);
    batch = dict of (B, T) int32 (data.BATCH_KEYS); frozen = weights not trained (LoRA base, DPO reference).

    Gradients of the SUMMED loss are added over `grad_accum` microbatches (lax.scan) and divided once
    by the batch's count (tokens, or DPO pairs), so any microbatching gives the same update as one big batch.
    `nan_skip`: a non-finite loss or gradient norm keeps the old params and optimizer state (numerics.py).
    """
    grad_fn = jax.value_and_grad(functools.partial(objective_loss, obj, graphdef), has_aux=True)
    params = state["params"]
    key = jax.random.fold_in(jax.random.key(obj.seed), state["step"]) if obj.lora.dropout else None
    if grad_accum == 1:
        (loss_sum, (count, msum)), grads = grad_fn(params, frozen, batch, key)
    else:
        def micro(carry, xs):
            mb, j = xs
            k = None if key is None else jax.random.fold_in(key, j)
            (l, (n, m)), g = grad_fn(params, frozen, mb, k)
            return _accumulate(carry, (g, l, n, m)), None
        zero = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0), zero_metrics(obj))
        (grads, loss_sum, count, msum), _ = jax.lax.scan(
            micro, zero, (split_microbatches(batch, grad_accum), jnp.arange(grad_accum)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params, grad_norm = optax.apply_updates(params, updates), optax.global_norm(grads)
    if nan_skip:
        ok = is_finite_step(loss_sum, grad_norm)
        new_params, opt_state = keep_finite(ok, (new_params, opt_state), (params, state["opt_state"]))
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm,
               "learning_rate": lr_schedule(state["step"]), "tokens": count,
               **(grpo_lib.finish_grpo_metrics(msum) if obj.name == "grpo" else objectives.finish_metrics(msum, count))}
    return new_state, metrics


def eval_step(obj: Objective, graphdef, params: dict, batch: dict, frozen: dict,
              grad_accum: int = 1) -> tuple[jax.Array, jax.Array, dict]:
    """(loss sum, count, metric sums) of a batch, in the train step's `grad_accum` microbatches (a run
    that needs microbatches to fit a train step needs them for eval too). Metric sums: DPO's pair
    metrics (objectives.DPO_METRICS), the reward model's (REWARD_METRICS: min / max are combined, not
    added, over microbatches, and so must they be over eval batches: objectives.combine_metrics), none
    for lm/sft."""
    def one(mb):
        loss_sum, (count, metrics) = objective_loss(obj, graphdef, params, frozen, mb)
        return loss_sum, count, metrics
    if grad_accum == 1:
        return one(batch)

    def micro(carry, mb):
        return _accumulate(carry, one(mb)), None
    zero = (jnp.float32(0), jnp.float32(0), zero_metrics(obj))
    total, _ = jax.lax.scan(micro, zero, split_microbatches(batch, grad_accum))
    return total


def init_params(cfg: ModelConfig, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def merge_trained(base: dict, trained: dict, scale: float) -> dict:
    """A LoRA run's full params: the adapters merged into the base (lora.merge), and a reward model's
    trained `score` head in place of the base's."""
    merged = lora.merge(base, trained, scale)
    if "score" in trained:
        merged["score"] = trained["score"].astype(merged["score"].dtype)
    return merged


# --------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """What the loop needs, built once per run: shapes/shardings of the state and the jitted steps."""

    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract: dict  # {params, opt_state, step}: ShapeDtypeStruct with shardings (params: LoRA adapters)
    step_jit: Callable  # (state, batch, frozen) -> (state, metrics); donates state
    eval_jit: Callable  # (params, batch, frozen) -> (loss sum, count, metric sums)
    objective: Objective = Objective()
    frozen_abstract: dict = dataclasses.field(default_factory=dict)  # {"base"} (LoRA), {"ref"} (full DPO)
    frozen: dict = dataclasses.field(default_factory=dict)  # their values, placed by the loop
    grpo_packed: bool = False  # grpo: the update batch in grpo_batch.py's packed layout (grpo_batch.plan)

    def step_fn(self, state: dict, batch: dict) -> tuple[dict, dict]:
        return self.step_jit(state, batch, self.frozen)

    def eval_fn(self, params: dict, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
        return self.eval_jit(params, batch, self.frozen)

    def model_params(self, params: dict) -> dict:
        """The full model's params: LoRA adapters merged into the frozen base (for sampling)."""
        if not self.objective.lora.rank:
            return params
        return jax.jit(functools.partial(merge_trained, scale=self.objective.lora.scale))(self.frozen["base"], params)

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
                if self.objective.lora.rank:
                    p = lora.init(self.model_cfg, self.objective.lora, jax.random.key(seed))
                    if self.model_cfg.head == "score":  # the head trains beside the adapters
                        p["score"] = init_params(self.model_cfg, seed)["score"]
                else:
                    p = init_params(self.model_cfg, seed)
                return {"params": p, "opt_state": self.tx.init(p), "step": jnp.int32(0)}
            return jax.jit(fresh, out_shardings=sh)()
        opt_state = jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params)
        return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(0), sh["step"])}


def build(cfg: TrainConfig, model_cfg: ModelConfig, mesh) -> Setup:
    """Abstract sharded state (optimizer shardings mirror the params' via optax.tree_map_params) and
    the jitted step/eval with explicit in/out shardings. Nothing is allocated here.

    With LoRA the trained params are the adapters (float32) and the base model is frozen in the compute
    dtype, with no optimizer state; full DPO keeps a frozen reference copy in the compute dtype."""
    tx = make_optimizer(cfg.optim, cfg.steps)
    backend = attention.resolve(cfg.attention, mesh.devices.flat[0].platform, cfg.seq_len)
    grpo_packed = False
    if cfg.objective == "grpo":  # its update batch's layout decides the backend too (grpo_batch.plan)
        backend, grpo_packed = grpo_batch.plan(cfg, mesh)
    # auto chunking sizes one DEVICE's logits (its rows, its share of the vocabulary): sized by the global
    # batch, 405B's 512 rows gave 2-position chunks, a 4096-step loop streaming the output weight each step
    rows, _, vocab = local_shape(mesh, ("batch", "seq", "act_vocab"),
                                 (cfg.batch_size // cfg.grad_accum, cfg.seq_len, model_cfg.vocab_size))
    loss_chunk = resolve_chunk(cfg.loss_chunk, rows, cfg.seq_len, vocab)
    obj = Objective.of(cfg, loss_chunk)
    graphdef, _ = nnx.split(abstract_model(model_cfg, scan_layers=cfg.scan_layers, remat=cfg.remat, attention=backend))
    base = checkpoint.abstract_params(model_cfg, mesh)
    frozen_model = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(cfg.compute_dtype),
                                                               sharding=a.sharding), base)
    if obj.lora.rank:
        params, frozen = lora.abstract(model_cfg, obj.lora, mesh), {"base": frozen_model}
        if model_cfg.head == "score":  # PEFT's modules_to_save: the head trains (float32) with the adapters
            params["score"] = base["score"]
    else:
        params, frozen = base, ({"ref": frozen_model} if obj.in_step_reference else {})
    param_sh = jax.tree.map(lambda a: a.sharding, params)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, param_sh, transform_non_params=lambda _: replicated(mesh))
    abstract = {
        "params": params,
        "opt_state": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt, opt_sh),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
    }
    state_sh = jax.tree.map(lambda a: a.sharding, abstract)
    frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
    batch_sh = jax.sharding.NamedSharding(mesh, logical_spec(("batch", "seq"), None, mesh))
    step_jit = jax.jit(functools.partial(train_step, obj, graphdef, tx, schedule(cfg.optim, cfg.steps), cfg.grad_accum,
                                         nan_skip=cfg.nan_policy == "skip"),
                       in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, replicated(mesh)),
                       donate_argnums=0)
    eval_jit = jax.jit(functools.partial(eval_step, obj, graphdef, grad_accum=cfg.grad_accum), in_shardings=(param_sh, batch_sh, frozen_sh),
                       out_shardings=replicated(mesh))
    return Setup(model_cfg, mesh, graphdef, tx, abstract, step_jit, eval_jit, obj, frozen, grpo_packed=grpo_packed)
