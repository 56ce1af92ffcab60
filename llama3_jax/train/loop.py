"""Sharded pretraining: one pure `train_step` under `jax.jit`, and the loop around it.

    YAML + overrides -> TrainConfig -> mesh -> abstract sharded state
      -> restore (WORKDIR checkpoint, else `init_from` params, else jitted sharded init)
      -> grain iterator (its saved state) -> loop { step -> metrics line -> eval -> checkpoint }
      -> final checkpoint -> sample (greedy, or drawn with sample_temperature/sample_top_k)

Parameters and AdamW moments live in float32 with the shardings of the logical rules (sharding.py);
the optimizer state's shardings come from the params' through `optax.tree_map_params`. The model
computes in `compute_dtype`. The workdir is itself a `jax` checkpoint (config.json + orbax items
`params`, `opt_state`, `data`, `meta`), so generate/convert/init_from read it as they read a converted
model. Step numbers count finished updates: checkpoint N holds the weights after N updates and the
iterator positioned at batch N + 1; metrics line N reports the loss of batch N (before its update).
SIGTERM / Ctrl-C handling is preemption.py; evaluation, evaluate.py; the end-of-run sample and summary
line, report.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ..store import checkpoint, remote
from ..store.lock import Lock
from ..parallel import compile_cache, distributed
from ..parallel.multihost_io import on_main
from ..model import lora
from ..model.config import ModelConfig
from . import objectives
from ..config_loader import load_yaml_config
from ..data import BATCH_KEYS, PromptIterator, corpus_documents, make_iterator, skipped_line_count
from ..failpoints import kill_point
from .objectives import DPO_METRICS, REWARD_METRICS
from .rl import GRPO, RL_METRICS
from . import ppo, ppo_step
from .optim import OptimConfig, schedule
from ..store.paths import is_remote
from ..parallel.sharding import logical_spec, make_mesh, require_divisible
from .config import RL_OBJECTIVES, TrainConfig, make_tokenizer, model_config, resolve_lora, tokenizer_spec
from . import evaluate as evaluation
from .evaluate import DATA_KIND
from .metrics import MetricsLog, model_flops_per_token, peak_flops
from .numerics import Guard
from .preemption import Preemption
from .report import draw_sample, report
from .state import restore_state, save_state, start_params
from .step import Setup, build, forward

def run_train(config_path: str | None, overrides=(), *, tokenizer=None) -> dict:
    """`llama3-jax train --config FILE key=value ...`: returns the run's summary (also printed). The
    command keeps compiled programs in the `compile_cache` directory (parallel/compile_cache.py)."""
    cfg = load_yaml_config(TrainConfig, config_path, list(overrides))
    compile_cache.enable(cfg.compile_cache, "compile_cache")
    return train(cfg, tokenizer=tokenizer)


def _reference_table(cfg: TrainConfig, setup: Setup, tok, workdir: Path) -> dict | None:
    """dpo.precompute_reference: every pair's reference log-probs (chosen, rejected), computed once in
    a pass over the whole data set before training and kept in WORKDIR/reference_logps.json (a resume
    reads it back), so the steps need no reference forward pass and full DPO holds no reference copy."""
    if cfg.objective != "dpo" or not cfg.dpo.precompute_reference:
        return None
    path = workdir / "reference_logps.json"
    workdir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    if jax.process_count() > 1:
        raise ValueError("dpo.precompute_reference runs on one process (set it to false on multi-host jobs)")
    params = setup.frozen["base"] if setup.frozen else _frozen(cfg, setup, force=True)["ref"]
    fn = jax.jit(lambda p, b: objectives.token_logps(forward(setup.graphdef, p, b), b["targets"]))
    table = {}
    every = dataclasses.replace(cfg.data, eval_fraction=0.0, shuffle=False)
    with make_iterator(every, tokenizer=tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                       num_epochs=1, kind="dpo", pair_index=True) as it:
        for batch in it:
            logps = np.asarray(fn(params, setup.put_batch({k: batch[k] for k in BATCH_KEYS})), np.float64)
            for r, seg in enumerate(batch["segment_ids"]):
                trained = batch["loss_mask"][r] == 1
                for p in range(1, int(seg.max()) // 2 + 1):
                    sides = [float(logps[r][(seg == s) & trained].sum()) for s in (2 * p - 1, 2 * p)]
                    table[it.documents[batch["pair"][r][seg == 2 * p - 1][0]].key] = tuple(sides)
    checkpoint.write_json_atomic(path, {k: list(v) for k, v in table.items()})
    return table


def _warn_if_schedule_changed(cfg: TrainConfig, workdir: Path, step: int) -> None:
    """One warning line when a resumed run's learning-rate schedule differs from the one it was
    trained with so far (usually a new `steps`: the cosine is stretched or squeezed from here on)."""
    try:
        before = json.loads((workdir / "train_config.json").read_text())
        old, old_steps = OptimConfig(**before["optim"]), int(before["steps"])
    except (OSError, ValueError, KeyError, TypeError):  # an older or hand-made workdir: nothing to compare
        return
    new = cfg.optim
    ahead = np.arange(step, max(old_steps, cfg.steps) + 1)
    if np.allclose(schedule(old, old_steps)(ahead), schedule(new, cfg.steps)(ahead), rtol=1e-6, atol=0):
        return  # e.g. a new `steps` with a fixed optim.decay_steps: the same rates from here on
    changed = [f"{k} {a} -> {b}" for k, a, b in [
        ("steps", old_steps, cfg.steps), ("optim.decay_steps", old.decay_steps, new.decay_steps),
        ("optim.warmup_steps", old.warmup_steps, new.warmup_steps), ("optim.lr", old.lr, new.lr),
        ("optim.min_lr_ratio", old.min_lr_ratio, new.min_lr_ratio)] if a != b]
    was, now = float(schedule(old, old_steps)(step)), float(schedule(new, cfg.steps)(step))
    print(f"train: warning: resuming at step {step} with a different learning-rate schedule "
          f"({', '.join(changed)}): the rate here is now {now:.3g}, was {was:.3g}", file=sys.stderr)


def _frozen(cfg: TrainConfig, setup: Setup, force: bool = False, start: dict | None = None) -> dict:
    """The weights a fine-tuning step reads but does not train, in the compute dtype: the LoRA base, or
    full DPO's reference model (both the starting weights, state.start_params: `init_from`, else the
    seeded init; `start` when the caller has them)."""
    if not setup.frozen_abstract and not force:
        return {}
    abstract = setup.frozen_abstract or {"ref": jax.tree.map(lambda a: a.sharding, setup.abstract["params"])}
    target = jax.tree.map(lambda a: getattr(a, "sharding", a), abstract)
    params = start if start is not None else start_params(cfg, setup)
    (name, target), = target.items()  # one frozen model: "base" or "ref"
    cast = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(cfg.compute_dtype), p), out_shardings=target)
    return {name: cast(params)}


def _start_state(cfg: TrainConfig, setup: Setup, workdir: Path, resume: int | None):
    """(state, data iterator state, start step, tokens seen, where it came from): the workdir's latest
    checkpoint wins over `init_from`, which wins over a fresh init. Fills `setup.frozen`."""
    if cfg.objective == "ppo":  # a policy, its value model and the reference (train/ppo.py)
        return ppo.start_state(cfg, setup, workdir, resume)
    start = start_params(cfg, setup) if setup.frozen_abstract else None
    setup.frozen = _frozen(cfg, setup, start=start)
    if resume is not None:
        state, data_state, meta = restore_state(workdir, resume, setup.abstract)
        return state, data_state, resume, meta.get("tokens", 0), f"resumed {workdir} at step {resume}"
    if cfg.lora.init_from:  # train on from a LoRA checkpoint's adapters (fresh optimizer state)
        adapters = checkpoint.restore_adapters(cfg.lora.init_from, setup.model_cfg, cfg.lora, setup.mesh)
        return (setup.init_state(cfg.seed, adapters), None, 0, 0,
                f"LoRA rank {cfg.lora.rank} adapters from {cfg.lora.init_from} on {cfg.init_from}")
    if cfg.lora.rank:
        state = setup.init_state(cfg.seed)
        if "score" in state["params"]:  # a reward model's head trains on from the base's (modules_to_save);
            # a copy: the frozen base may hold this very buffer (a float32 cast is a no-op), and steps donate
            state["params"]["score"] = jax.device_put(start["score"], start["score"].sharding, may_alias=False)
        return state, None, 0, 0, f"LoRA rank {cfg.lora.rank} on {cfg.init_from}"
    if cfg.init_from:  # a checkpoint, or an HF / Meta directory streamed onto the mesh (convert/load.py)
        return setup.init_state(cfg.seed, start_params(cfg, setup)), None, 0, 0, f"weights from {cfg.init_from}"
    return setup.init_state(cfg.seed), None, 0, 0, "random init"


def _lock_workdir(local: Path, name: str, held: dict) -> None:
    """Process 0 takes the workdir's lock (store/lock.py), WORKDIR/.lock (a remote workdir's on its local
    staging directory), before anything in the workdir is read or written; every process hears of a
    refusal (on_main). The lock goes into `held`, for `train` to release."""
    def take():
        held["lock"] = Lock(local / ".lock", f"workdir {name}").acquire()
    on_main(take)


def _local_paths(cfg: TrainConfig, held: dict) -> tuple[TrainConfig, remote.WorkdirMirror | None]:
    """`cfg` with its remote paths made local (remote.py): `init_from` and `data.path` fetched into the
    cache, a remote `workdir` pulled into its staging directory (the mirror pushes it back); the
    workdir's lock taken first (`_lock_workdir`)."""
    changes, mirror = {}, None
    if is_remote(cfg.workdir):
        mirror = remote.WorkdirMirror(cfg.workdir, cfg.keep_checkpoints)
    _lock_workdir(mirror.local if mirror else Path(cfg.workdir), cfg.workdir, held)
    if mirror:
        mirror.pull()
        changes["workdir"] = str(mirror.local)
    if is_remote(cfg.init_from):
        changes["init_from"] = remote.fetch(cfg.init_from, "init_from")
    if is_remote(cfg.data.path):
        changes["data"] = dataclasses.replace(cfg.data, path=remote.fetch(cfg.data.path, "data.path"))
    return dataclasses.replace(cfg, **changes), mirror


@dataclasses.dataclass
class _Run:
    """What a run works with, settled before its first step (`_prepare`)."""
    cfg: TrainConfig          # with remote paths made local
    given: TrainConfig        # as the user gave it (URLs): recorded in train_config.json and a LoRA workdir's base
    mirror: remote.WorkdirMirror | None
    workdir: Path
    is_main: bool
    mesh: jax.sharding.Mesh
    resume: int | None        # the checkpoint step resumed, None: a new run
    mc: ModelConfig
    tok: object
    own_tokenizer: bool       # the tokenizer came from cfg.tokenizer (recorded in config.json), not the caller
    documents: list | None    # the corpus, listed once per run (None: prepared data)
    eval_every: int
    setup: Setup
    t0: float                 # wall clock at the start of `train`
    tokens_per_step: int
    flops_per_step: float
    peak: float


@dataclasses.dataclass
class _Progress:
    """The loop's counters. Step numbers count finished updates (module docstring)."""
    start: int
    step: int
    tokens: int               # tokens seen, over every (re)start
    saved: int | None         # the step of the last checkpoint
    losses: list = dataclasses.field(default_factory=list)
    accuracy: float | None = None  # a reward model's, at the last metrics line
    last_eval: dict | None = None
    sample: str | None = None
    # wall clock after the first step (compilation excluded after it), at the last metrics line, at the end
    t_first: float | None = None
    t_log: float | None = None
    step_log: int | None = None
    startup: float | None = None
    t_end: float | None = None


def train(cfg: TrainConfig, *, tokenizer=None) -> dict:
    """Run (or resume) the job described by `cfg`; returns a summary dict (losses, throughput, sample).
    The workdir is locked for the whole run (process 0's lock, store/lock.py): a second run into it is
    refused with one line naming this one."""
    held: dict = {}
    try:
        run = _prepare(cfg, tokenizer, held)
        with Preemption() as preempt:  # from here on SIGTERM or Ctrl-C means "save and stop", even while compiling
            state, data_state, start, tokens_seen, origin = _start_state(run.cfg, run.setup, run.workdir,
                                                                         run.resume)
            reference = _reference_table(run.cfg, run.setup, run.tok, run.workdir)
            it = _open_iterator(run, reference, data_state, origin)
            progress = _Progress(start=start, step=start, tokens=tokens_seen,
                                 saved=start if run.resume is not None else None)
            _run_steps(run, progress, state, it, reference, preempt)
        summary = _summary(run, progress, preempt.signal, it.truncated)
        if run.is_main:
            report(run.cfg, summary, run.workdir)
        if run.mirror:  # the final metrics and sample.txt
            run.mirror.push()
        return summary
    finally:
        if "lock" in held:
            held["lock"].release()


def _prepare(cfg: TrainConfig, tokenizer, held: dict) -> _Run:
    """Everything settled before the first step, each refusal before anything is compiled or written:
    processes, the workdir's lock, local paths, the mesh, the model config (a resumed workdir's own), the
    tokenizer, the data listing, the abstract sharded state (step.build)."""
    t0 = time.time()
    distributed.initialize(cfg.distributed)  # before any other JAX call
    cfg = resolve_lora(cfg)  # lora.init_from: its base and LoRA settings
    given = cfg
    cfg, mirror = _local_paths(cfg, held)
    workdir = Path(cfg.workdir)
    is_main = jax.process_index() == 0
    mesh = _train_mesh(cfg)
    # a corrupt latest step is reported and set aside; the newest intact one is resumed
    resume = checkpoint.latest_intact_step(workdir, set_aside=True) if checkpoint.is_checkpoint(workdir) else None
    mc = model_config(cfg, workdir if resume is not None else None)
    require_divisible("q_heads", mc.n_heads, mesh, "the model's n_heads")  # before any compile
    if cfg.seq_len > mc.max_seq_len:  # RoPE would run past the positions the model is made for
        raise ValueError(f"seq_len {cfg.seq_len} is longer than the model's max_seq_len {mc.max_seq_len} "
                         f"(lower seq_len, or give a new model a larger model.max_seq_len)")
    tok = tokenizer or make_tokenizer(cfg.tokenizer)
    if tok.n_words > mc.vocab_size:
        raise ValueError(_tokenizer_too_big(cfg, tok, mc, tokenizer is None, workdir if resume is not None else None))
    documents = corpus_documents(cfg.data, DATA_KIND[cfg.objective])  # listed once per run (None: prepared)
    eval_every = evaluation.eval_every(cfg, is_main, documents)
    if resume is not None and is_main:
        _warn_if_schedule_changed(cfg, workdir, resume)
    setup = (ppo_step.build if cfg.objective == "ppo" else build)(cfg, mc, mesh)
    tokens_per_step = cfg.batch_size * cfg.seq_len * (cfg.grpo.num_generations if cfg.objective == "grpo" else 1)
    return _Run(cfg=cfg, given=given, mirror=mirror, workdir=workdir, is_main=is_main, mesh=mesh, resume=resume,
                mc=mc, tok=tok, own_tokenizer=tokenizer is None, documents=documents, eval_every=eval_every,
                setup=setup, t0=t0, tokens_per_step=tokens_per_step,
                flops_per_step=model_flops_per_token(mc, cfg.seq_len) * tokens_per_step,
                peak=peak_flops(cfg.peak_flops, list(mesh.devices.flat)))


def _tokenizer_too_big(cfg: TrainConfig, tok, mc: ModelConfig, own: bool, resumed: Path | None) -> str:
    """The one line for a tokenizer with more ids than the model has rows. From a resumed workdir that
    is almost always another run's model (another job pointed at the same workdir): say so, and which."""
    mine = (cfg.tokenizer or "Llama 3's") if own else type(tok).__name__
    if resumed is None:
        return f"tokenizer ({mine}) has {tok.n_words} ids but the model's vocab_size is {mc.vocab_size}"
    try:
        before = json.loads((resumed / "train_config.json").read_text())
        source = "".join(f", {k} {before[k]}" for k in ("model", "init_from") if before.get(k))
    except (OSError, ValueError, TypeError, AttributeError):
        source = ""
    theirs = checkpoint.load_tokenizer_spec(resumed) or "Llama 3's"
    return (f"workdir {resumed} holds another run's model ({mc.num_params():,} params: dim {mc.dim}, n_layers "
            f"{mc.n_layers}, vocab_size {mc.vocab_size}{source}; trained with tokenizer {theirs}): this run's "
            f"tokenizer ({mine}) has {tok.n_words} ids; use a new workdir for this run, or that run's tokenizer")


def _train_mesh(cfg: TrainConfig) -> jax.sharding.Mesh:
    """The run's mesh; refused when a microbatch does not split over its batch shards."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, dcn_data=cfg.mesh.dcn_data,
                     dcn_fsdp=cfg.mesh.dcn_fsdp)
    batch_axes = logical_spec(("batch",), None, mesh)[0] or ()
    n_batch = math.prod(mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes))
    # grpo: a step's rows are its batch_size prompts x num_generations completions (train/rl.py)
    rows, what = (cfg.batch_size * cfg.grpo.num_generations, "batch_size*grpo.num_generations/grad_accum") \
        if cfg.objective == "grpo" else (cfg.batch_size, "batch_size/grad_accum")
    if (rows // cfg.grad_accum) % n_batch:
        raise ValueError(f"{what} = {rows // cfg.grad_accum} sequences do not split over "
                         f"the {n_batch} batch shards of the mesh (mesh.data*mesh.fsdp)")
    return mesh


def _open_iterator(run: _Run, reference: dict | None, data_state: dict | None, origin: str):
    """The training batches, positioned where the checkpoint left them; then (main process) the run is
    recorded in the workdir and announced. The iterator is closed again if that fails."""
    cfg = run.cfg
    if cfg.objective in RL_OBJECTIVES:  # prompts, not packed rows (data/prompts.py); every process reads them all
        room = (cfg.grpo if cfg.objective == "grpo" else cfg.ppo).max_completion_length
        it = PromptIterator(cfg.data, run.documents, tokenizer=run.tok, batch_size=cfg.batch_size, seed=cfg.seed,
                            max_prompt_len=cfg.seq_len - room)
    else:
        it = make_iterator(cfg.data, tokenizer=run.tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                           kind=DATA_KIND[cfg.objective], reference=reference, documents=run.documents)
    try:
        if data_state is not None:
            it.set_state(data_state)
        if run.is_main:  # the run starts now: record what it is (not before, so a refused run changes nothing)
            _record_run(run, origin)
    except BaseException:
        it.close()
        raise
    return it


def _record_run(run: _Run, origin: str) -> None:
    """config.json (the model, its tokenizer, a LoRA run's base) and train_config.json (the run as given)
    in the workdir, and the run's first line on stderr."""
    cfg, given, mc = run.cfg, run.given, run.mc
    base = given.init_from if is_remote(given.init_from) else str(Path(cfg.init_from or "").absolute())
    record = lora.config_record(cfg.lora, base) if cfg.lora.rank else None
    checkpoint.save_config(run.workdir, mc, tokenizer=tokenizer_spec(cfg) if run.own_tokenizer else None,
                           lora_record=record)
    checkpoint.write_json_atomic(run.workdir / "train_config.json", dataclasses.asdict(given))
    print(f"train: {mc.num_params():,} params, mesh {dict(run.mesh.shape)}, {origin}, "
          f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens", file=sys.stderr)


def _run_steps(run: _Run, p: _Progress, state, it, reference: dict | None, preempt: Preemption) -> None:
    """The loop { step -> metrics line -> eval -> checkpoint } until `steps` or an agreed stop, then the
    final checkpoint and sample (`_finish`). Closes the iterator, the metrics log and the checkpointer."""
    cfg, setup = run.cfg, run.setup
    log = MetricsLog(run.workdir, p.start, cfg.tensorboard)
    mgr = checkpoint.manager(run.workdir, max_to_keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint,
                             on_sealed=run.mirror and run.mirror.push)
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=p.start, disable=not (cfg.progress and run.is_main), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    guard = Guard(cfg.nan_policy, cfg.nan_max_consecutive, cfg.spike_factor, last_checkpoint=lambda: p.saved)
    rl = {"grpo": GRPO, "ppo": ppo.PPO}[cfg.objective](cfg, setup, run.tok, run.workdir, p.start) \
        if cfg.objective in RL_OBJECTIVES else None
    try:
        with jax.set_mesh(run.mesh):
            while p.step < cfg.steps and not preempt.agreed(p.step, cfg.log_every):
                if rl is not None:  # rollout, rewards, then the update (train/rl.py)
                    state, metrics = rl.step(state, it, p.step, p.saved)
                else:
                    state, metrics = setup.step_fn(state, setup.put_batch(next(it)))
                kill_point("train.step")
                p.step += 1
                guard.push(p.step, metrics)  # checks the previous step: stop / count a skip / spike
                p.tokens += run.tokens_per_step
                bar.update(1)
                if p.t_first is None:  # the first step of this (re)start: its startup is behind it
                    _started(run, p, metrics)
                # step 1 is logged too (a new run's first loss), but not a resumed run's first step:
                # a resumed run logs the steps an uninterrupted one does
                if p.step % cfg.log_every == 0 or p.step == cfg.steps or p.step == 1:
                    guard.flush()
                    _log_metrics(run, p, metrics, guard.skipped, log, bar)
                if run.eval_every and (p.step % run.eval_every == 0 or p.step == cfg.steps):
                    _evaluate_now(run, p, state["params"], reference, log)
                if p.step % cfg.checkpoint_every == 0:
                    guard.flush()  # never save a non-finite state
                    save_state(mgr, p.step, state, it.get_state(), {"step": p.step, "tokens": p.tokens})
                    kill_point("train.save")
                    p.saved = p.step
            guard.flush()
            _finish(run, p, state, it, mgr)
    finally:
        bar.close()
        if rl is not None:
            rl.close()
        mgr.close()
        log.close()
        it.close()


def _started(run: _Run, p: _Progress, metrics) -> None:
    """After the first step of a (re)start: its startup time (restore, data, compilation, that step),
    and the clock from which throughput is measured."""
    jax.block_until_ready(metrics)
    p.t_first = p.t_log = time.time()
    p.startup, p.step_log = p.t_first - run.t0, p.step


def _log_metrics(run: _Run, p: _Progress, metrics, skipped: int, log: MetricsLog, bar) -> None:
    """Metrics line `p.step`: the loss of the batch just stepped, and the throughput since the previous
    line, or since the first step of this (re)start; the first line of a (re)start also reports the
    startup time (restore, data, compilation)."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.time()
    record = {"step": p.step, "loss": m["loss"], "learning_rate": m["learning_rate"],
              "grad_norm": m["grad_norm"], "tokens_per_second": None, "mfu": None,
              "loss_tokens": int(m["tokens"]), "tokens": p.tokens,
              "skipped_updates": skipped, **{k: m[k] for k in DPO_METRICS + REWARD_METRICS if k in m},
              **{k: v for k, v in m.items() if "/" in k or k in RL_METRICS}}  # grpo's (TRL's names; rl.py)
    if not p.losses:  # the first line of a (re)start
        record["startup_seconds"] = round(p.startup, 2)
        record["data_skipped_lines"] = skipped_line_count()  # reported on stderr
    if p.step > p.step_log:
        n, dt = p.step - p.step_log, now - p.t_log
        record["tokens_per_second"] = n * run.tokens_per_step / dt
        record["mfu"] = n * run.flops_per_step / dt / run.peak if math.isfinite(run.peak) else None
    p.t_log, p.step_log = now, p.step
    p.losses.append(m["loss"])
    p.accuracy = m.get("accuracy")  # a reward model's: the summary line's
    log.write(record)
    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{record['tokens_per_second'] or 0:.0f}")


def _evaluate_now(run: _Run, p: _Progress, params: dict, reference: dict | None, log: MetricsLog) -> None:
    """The eval metrics line for `p.step`; the time it takes is not counted as training time."""
    t_eval = time.time()
    p.last_eval = evaluation.evaluate(run.cfg, run.setup, params, run.tok, reference, run.documents)
    log.write({"step": p.step, **p.last_eval})
    if p.t_log is not None:  # eval time is not training time
        p.t_log, p.t_first = p.t_log + time.time() - t_eval, p.t_first + time.time() - t_eval


def _finish(run: _Run, p: _Progress, state, it, mgr) -> None:
    """After the last step: the final checkpoint (unless that step was just saved), every save sealed,
    then the sample of a run that reached `steps`."""
    cfg = run.cfg
    p.t_end = time.time()
    if p.saved != p.step:
        save_state(mgr, p.step, state, it.get_state(), {"step": p.step, "tokens": p.tokens})
        kill_point("train.final_save")
    mgr.wait_until_finished()
    # the engine places its inputs from one host; multi-process decoding is not built yet; a reward
    # model has no output layer to sample from (its summary gives the final accuracy instead)
    if cfg.sample_tokens and p.step >= cfg.steps and jax.process_count() == 1 and run.mc.head == "lm":
        p.sample = draw_sample(cfg, run.setup, state["params"], run.tok)


def _summary(run: _Run, p: _Progress, stopped_by: str | None, truncated: int) -> dict:
    """The dict `train` returns (and `report` prints)."""
    timed = p.step - p.start - 1  # steps after the first (which includes compilation)
    return {"workdir": run.given.workdir if run.mirror else str(run.workdir), "start_step": p.start, "step": p.step,
            "preempted": p.step < run.cfg.steps, "stopped_by": stopped_by,
            "first_loss": p.losses[0] if p.losses else None, "last_loss": p.losses[-1] if p.losses else None,
            **({"last_accuracy": p.accuracy} if p.accuracy is not None else {}),
            "seconds": round(time.time() - run.t0, 1), "startup_seconds": p.startup and round(p.startup, 1),
            "tokens_per_second": timed * run.tokens_per_step / (p.t_end - p.t_first) if timed > 0 else None,
            **(p.last_eval or {}), "sample": p.sample, "truncated": truncated}
