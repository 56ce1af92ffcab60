"""Sharded pretraining: one pure `train_step` under `jax.jit`, and the loop around it.

    YAML + overrides -> TrainConfig -> mesh -> abstract sharded state
      -> restore (WORKDIR checkpoint, else `init_from` params, else jitted sharded init)
      -> grain iterator (its saved state) -> loop { step -> metrics line -> eval -> checkpoint }
      -> final checkpoint -> greedy sample

Parameters and AdamW moments live in float32 with the shardings of the logical rules (sharding.py);
the optimizer state's shardings come from the params' through `optax.tree_map_params`. The model
computes in `compute_dtype`. The workdir is itself a `jax` checkpoint (config.json + orbax items
`params`, `opt_state`, `data`, `meta`), so generate/convert/init_from read it as they read a converted
model. Step numbers count finished updates: checkpoint N holds the weights after N updates and the
iterator positioned at batch N + 1; metrics line N reports the loss of batch N (before its update).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from . import checkpoint
from .config import ModelConfig, load_model_config, load_yaml_config
from .data import BATCH_KEYS, DataConfig, make_iterator
from .model import Llama, abstract_model
from .optim import OptimConfig, flops_per_token, lm_loss, make_optimizer, schedule
from .sharding import constrain, global_batch, logical_spec, make_mesh, replicated

# Peak dense bf16 FLOP/s per chip (vendor datasheets), for MFU when `peak_flops` is not set.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
# CPU: nominal float32 FMA peak per core, 2 AVX2 FMA units * 8 lanes * 2 flops * 3 GHz = 96 GFLOP/s,
# for the whole host however many (fake) devices it is split into.
CPU_PEAK_FLOPS_PER_CORE = 96e9


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: the rest of the devices
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str = "runs/default"
    model: str | dict = "tiny"  # preset name, or ModelConfig keys (with optional `preset` as the base)
    init_from: str | None = None  # a jax checkpoint (convert output or a train workdir): its config + params
    tokenizer: str | None = None  # None: Llama 3's tokenizer.model; a path to one; or "bytes" (UTF-8 bytes)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    seq_len: int = 512
    grad_accum: int = 1  # microbatches per step (scanned inside the step)
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # none | full | dots
    scan_layers: bool = True
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = no eval
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = False
    sample_prompt: str = "def "
    sample_tokens: int = 32  # 0 = no sample at the end
    peak_flops: float = 0.0  # per device, for MFU; 0 = PEAK_FLOPS by device kind (CPU: see above)
    progress: bool = True

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every", "eval_batches")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16 or float32, got {self.compute_dtype!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none, full or dots, got {self.remat!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, BOS 256, EOS 257 (`tokenizer: bytes`): a real tokenizer for models
    with a tiny vocabulary (tests, quick experiments), with no 128K-row embedding to pay for."""

    bos_id, eos_id, n_words = 256, 257, 258
    stop_tokens = (257,)

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def make_tokenizer(spec: str | None):
    if spec == "bytes":
        return ByteTokenizer()
    from .tokenizer import Tokenizer
    return Tokenizer(spec)


def model_config(cfg: TrainConfig, resume_dir: Path | None = None) -> ModelConfig:
    """The model's shape: a resumed workdir's, else init_from's, else `model`; dtypes from the run."""
    if resume_dir is not None or cfg.init_from:
        mc = checkpoint.load_config(resume_dir or cfg.init_from)
    elif isinstance(cfg.model, str):
        mc = load_model_config(cfg.model)
    else:
        keys = dict(cfg.model)
        base = load_model_config(keys.pop("preset")).to_dict() if "preset" in keys else {}
        mc = ModelConfig.from_dict(base | keys)
    return dataclasses.replace(mc, dtype=cfg.compute_dtype, param_dtype="float32")


# --------------------------------------------------------------------------------- pure functions


def split_microbatches(batch: dict, n: int) -> dict:
    """(B, T) -> (n, B/n, T), microbatch j = rows j, n + j, 2n + j, ...: each device's contiguous rows
    spread evenly over the microbatches, so splitting moves no data between devices."""
    def one(x):
        return constrain(x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), (None, "batch", "seq"))
    return jax.tree.map(one, batch)


def loss_and_count(graphdef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss and counted tokens of a batch (see optim.lm_loss)."""
    logits, _ = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"], batch["segment_ids"])
    return lm_loss(logits, batch["targets"], batch["loss_mask"])


def train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, grad_accum: int,
               state: dict, batch: dict) -> tuple[dict, dict]:
    """One update. state = {params, opt_state, step}; batch = dict of (B, T) int32 (data.BATCH_KEYS).

    Gradients of the SUMMED loss are added over `grad_accum` microbatches (lax.scan) and divided once
    by the batch's token count, so any microbatching gives the same update as one big batch.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_and_count, graphdef), has_aux=True)
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


def eval_step(graphdef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    return loss_and_count(graphdef, params, batch)


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
    graphdef, _ = nnx.split(abstract_model(model_cfg, scan_layers=cfg.scan_layers, remat=cfg.remat))
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
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx, schedule(cfg.optim, cfg.steps), cfg.grad_accum),
                      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(mesh)),
                      donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef), in_shardings=(param_sh, batch_sh),
                      out_shardings=replicated(mesh))
    return Setup(model_cfg, mesh, graphdef, tx, abstract, step_fn, eval_fn)


# --------------------------------------------------------------------------------- checkpoints


def gather_data_states(state: dict) -> dict:
    """Every process's iterator state (each reads its own share of the data), for process 0 to save:
    {"process_count": P, "states": [state of process 0, ..., state of process P-1]}."""
    if jax.process_count() == 1:
        return {"process_count": 1, "states": [state]}
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return {"process_count": len(sizes),
            "states": [json.loads(bytes(every[i, :sizes[i]]).decode()) for i in range(len(sizes))]}


def this_process_data_state(saved: dict, where: str) -> dict:
    """This process's entry of `gather_data_states`; the data order is tied to the process count."""
    if saved.get("process_count") != jax.process_count():
        raise ValueError(f"{where}: the data iterator state was saved by {saved.get('process_count')} processes, "
                         f"this run has {jax.process_count()} (resume with the same process count)")
    return saved["states"][jax.process_index()]


def save_state(mgr: ocp.CheckpointManager, step: int, state: dict, data_state: dict, meta: dict) -> None:
    """Async save: orbax copies the arrays to host before returning (so the next step may donate them)
    and writes into a temp dir that is renamed only when complete. `data_state` is this process's
    iterator state; every process's is gathered into the checkpoint."""
    mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]), opt_state=ocp.args.StandardSave(state["opt_state"]),
        data=ocp.args.JsonSave(gather_data_states(data_state)), meta=ocp.args.JsonSave(meta)), force=True)


def restore_state(directory: Path, step: int, abstract: dict) -> tuple[dict, dict, dict]:
    """(state, this process's data iterator state, meta) of a training checkpoint, into `abstract`'s
    shardings (any mesh: a checkpoint from 8 devices restores on 1 or 4)."""
    if not (Path(directory) / str(step) / "opt_state").exists():
        raise ValueError(f"{directory} step {step}: no optimizer state (a converted model? use it as init_from)")
    with checkpoint.manager(directory, read_only=True) as m:
        out = m.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract["params"]),
            opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    step_arr = jax.device_put(jnp.int32(out["meta"]["step"]), abstract["step"].sharding)
    data_state = this_process_data_state(out["data"], f"{directory} step {step}")
    return {"params": out["params"], "opt_state": out["opt_state"], "step": step_arr}, data_state, out["meta"]


# ------------------------------------------------------------------------------------- metrics


class MetricsLog:
    """WORKDIR/metrics.jsonl, appended and flushed per line by process 0. On (re)start it keeps only
    lines with step <= the restored step, so a resumed run has each step once."""

    def __init__(self, workdir: Path, start_step: int, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        self.on = jax.process_index() == 0
        self.tb = None
        if not self.on:
            return
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut by a crash
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            self.tb = _tensorboard_writer(workdir / "tensorboard")

    def write(self, record: dict) -> None:
        if not self.on:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.on:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _tensorboard_writer(logdir: Path):
    """An event-file writer that needs no TensorFlow: tensorboardX (the `tensorboard` extra), else
    torch's; None, with a note, when neither is installed."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            return importlib.import_module(module).SummaryWriter(str(logdir))
        except ImportError:
            continue
    print("tensorboard: no event-file writer is installed (pip install 'llama3-jax[tensorboard]'); "
          "metrics are in metrics.jsonl only", file=sys.stderr)
    return None


def peak_flops(cfg_peak: float, devices) -> float:
    """Peak FLOP/s of the whole job: `peak_flops` per device, else by device kind (CPU: per core)."""
    if cfg_peak > 0:
        return cfg_peak * len(devices)
    if devices[0].platform == "cpu":
        return CPU_PEAK_FLOPS_PER_CORE * (os.cpu_count() or 1)
    kind = devices[0].device_kind
    per = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)
    return per * len(devices) if per else float("nan")  # unknown accelerator: set `peak_flops`


def model_flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """6 N over the matmul weights (no embedding lookup; a tied embedding counts as the output layer)."""
    n = mc.num_params() - (0 if mc.tie_embeddings else mc.vocab_size * mc.dim)
    n -= mc.n_layers * 2 * mc.dim + mc.dim  # norm gains
    return flops_per_token(n, mc.n_layers, mc.n_heads, mc.head_dim, seq_len)


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the end of the step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ----------------------------------------------------------------------------------------- loop


def run_train(config_path: str | None, overrides=(), *, tokenizer=None) -> dict:
    """`llama3-jax train --config FILE key=value ...`: returns the run's summary (also printed)."""
    return train(load_yaml_config(TrainConfig, config_path, list(overrides)), tokenizer=tokenizer)


def _evaluate(cfg: TrainConfig, setup: Setup, params: dict, tok) -> dict:
    """Mean loss over the first `eval_batches` batches of the held-out split (the same every time).

    Every process runs exactly `eval_batches` steps (each is a collective): a process whose share of
    the held-out data ends early feeds all-padding batches, which count no tokens."""
    total, count = 0.0, 0.0
    with make_iterator(cfg.data, tokenizer=tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                       split="eval", process_index=jax.process_index(),
                       process_count=jax.process_count()) as it:
        padding = None
        for _ in range(cfg.eval_batches):
            batch = next(it, None)
            if batch is None:
                rows = cfg.batch_size // jax.process_count()
                padding = padding or {k: np.zeros((rows, cfg.seq_len), np.int32) for k in BATCH_KEYS}
                batch = padding
            s, n = setup.eval_fn(params, setup.put_batch(batch))
            total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": int(count)}


def _sample(cfg: TrainConfig, setup: Setup, params: dict, tok) -> str:
    """Greedy continuation of `sample_prompt` with the serving engine."""
    from .engine import Generator
    gen = Generator(cfg=setup.model_cfg, params=params, dtype=cfg.compute_dtype, mesh=setup.mesh, tokenizer=tok)
    [completion] = gen.generate([cfg.sample_prompt], max_new_tokens=cfg.sample_tokens, batch_size=1)
    return completion.text


def _start_state(cfg: TrainConfig, setup: Setup, workdir: Path, resume: int | None):
    """(state, data iterator state, start step, tokens seen, where it came from): the workdir's latest
    checkpoint wins over `init_from`, which wins over a fresh init."""
    if resume is not None:
        state, data_state, meta = restore_state(workdir, resume, setup.abstract)
        return state, data_state, resume, meta.get("tokens", 0), f"resumed {workdir} at step {resume}"
    if cfg.init_from:
        _, params = checkpoint.restore_params(cfg.init_from, setup.mesh, cfg=setup.model_cfg)
        return setup.init_state(cfg.seed, params), None, 0, 0, f"weights from {cfg.init_from}"
    return setup.init_state(cfg.seed), None, 0, 0, "random init"


def train(cfg: TrainConfig, *, tokenizer=None) -> dict:
    """Run (or resume) the job described by `cfg`; returns a summary dict (losses, throughput, sample)."""
    t0 = time.time()
    workdir = Path(cfg.workdir)
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    batch_axes = logical_spec(("batch",), None, mesh)[0] or ()
    n_batch = math.prod(mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes))
    if (cfg.batch_size // cfg.grad_accum) % n_batch:
        raise ValueError(f"batch_size/grad_accum = {cfg.batch_size // cfg.grad_accum} sequences do not split over "
                         f"the {n_batch} batch shards of the mesh (mesh.data*mesh.fsdp)")
    resume = checkpoint.latest_step(workdir) if checkpoint.is_checkpoint(workdir) else None
    mc = model_config(cfg, workdir if resume is not None else None)
    tok = tokenizer or make_tokenizer(cfg.tokenizer)
    if tok.n_words > mc.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_words} ids but the model's vocab_size is {mc.vocab_size}")
    setup = build(cfg, mc, mesh)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = model_flops_per_token(mc, cfg.seq_len) * tokens_per_step
    peak = peak_flops(cfg.peak_flops, list(mesh.devices.flat))

    with Preemption() as preempt:  # from here on SIGTERM means "save and stop", even during compilation
        state, data_state, start, tokens_seen, origin = _start_state(cfg, setup, workdir, resume)
        if is_main:
            checkpoint.save_config(workdir, mc)
            checkpoint.write_json_atomic(workdir / "train_config.json", dataclasses.asdict(cfg))
            print(f"train: {mc.num_params():,} params, mesh {dict(mesh.shape)}, {origin}, "
                  f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens", file=sys.stderr)
        it = make_iterator(cfg.data, tokenizer=tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                           process_index=jax.process_index(), process_count=jax.process_count())
        if data_state is not None:
            it.set_state(data_state)
        log = MetricsLog(workdir, start, cfg.tensorboard)
        mgr = checkpoint.manager(workdir, max_to_keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and is_main), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        step, saved, losses, last_eval, sample = start, start if resume is not None else None, [], None, None
        t_first = t_log = startup = None  # wall clock after the first step (compilation excluded after it)
        try:
            with jax.set_mesh(mesh):
                while step < cfg.steps and not preempt.requested:
                    state, metrics = setup.step_fn(state, setup.put_batch(next(it)))
                    step += 1
                    tokens_seen += tokens_per_step
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1:
                        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        now = time.time()
                        record = {"step": step, "loss": m["loss"], "learning_rate": m["learning_rate"],
                                  "grad_norm": m["grad_norm"], "tokens_per_second": None, "mfu": None,
                                  "loss_tokens": int(m["tokens"]), "tokens": tokens_seen}
                        if t_log is None:  # the first step of a (re)start: restore, data, compilation
                            t_first, startup = now, now - t0
                            record["startup_seconds"] = round(startup, 2)
                        else:
                            n, dt = step - step_log, now - t_log
                            record["tokens_per_second"] = n * tokens_per_step / dt
                            record["mfu"] = n * flops_per_step / dt / peak if math.isfinite(peak) else None
                        t_log, step_log = now, step
                        losses.append(m["loss"])
                        log.write(record)
                        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{record['tokens_per_second'] or 0:.0f}")
                    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                        t_eval = time.time()
                        last_eval = _evaluate(cfg, setup, state["params"], tok)
                        log.write({"step": step, **last_eval})
                        if t_log is not None:  # eval time is not training time
                            t_log, t_first = t_log + time.time() - t_eval, t_first + time.time() - t_eval
                    if step % cfg.checkpoint_every == 0:
                        save_state(mgr, step, state, it.get_state(), {"step": step, "tokens": tokens_seen})
                        saved = step
                t_end = time.time()
                if saved != step:
                    save_state(mgr, step, state, it.get_state(), {"step": step, "tokens": tokens_seen})
                mgr.wait_until_finished()
                # the engine places its inputs from one host; multi-process decoding is not built yet
                if cfg.sample_tokens and step >= cfg.steps and jax.process_count() == 1:
                    sample = _sample(cfg, setup, state["params"], tok)
        finally:
            bar.close()
            mgr.close()
            log.close()
            it.close()

    timed = step - start - 1  # steps after the first (which includes compilation)
    summary = {"workdir": str(workdir), "start_step": start, "step": step, "preempted": step < cfg.steps,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "seconds": round(time.time() - t0, 1), "startup_seconds": startup and round(startup, 1),
               "tokens_per_second": timed * tokens_per_step / (t_end - t_first) if timed > 0 else None,
               **(last_eval or {}), "sample": sample}
    if is_main:
        _report(cfg, summary, workdir)
    return summary


def _report(cfg: TrainConfig, s: dict, workdir: Path) -> None:
    if s["sample"] is not None:
        text = f"{cfg.sample_prompt}{s['sample']}"
        tmp = workdir / ".sample.txt.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, workdir / "sample.txt")
        print(f"sample (greedy, {cfg.sample_tokens} tokens): {text!r}", file=sys.stderr)
    how = "preempted (SIGTERM), saved" if s["preempted"] else "done"
    loss = f", loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s["first_loss"] is not None else ""
    ev = f", eval loss {s['eval_loss']:.4f}" if "eval_loss" in s else ""
    speed = f", {s['tokens_per_second']:.0f} tokens/s" if s["tokens_per_second"] else ""
    print(f"train: {how}: steps {s['start_step']} -> {s['step']} in {s['seconds']:.0f}s "
          f"(startup {s['startup_seconds'] or 0:.0f}s){loss}{ev}{speed}; checkpoint {workdir} step {s['step']}",
          file=sys.stderr)
