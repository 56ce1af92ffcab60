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
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from .. import checkpoint
from ..config import load_yaml_config
from ..data import BATCH_KEYS, list_documents, make_iterator, split_documents
from ..optim import OptimConfig, schedule
from ..sharding import logical_spec, make_mesh
from .config import TrainConfig, make_tokenizer, model_config, tokenizer_spec
from .metrics import MetricsLog, model_flops_per_token, peak_flops
from .state import restore_state, save_state
from .step import Setup, build


class Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT), sets a flag: the loop saves a checkpoint at the end of the
    step and exits cleanly. A second Ctrl-C stops at once (KeyboardInterrupt), saving nothing more."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal = None  # the name of the first signal received
        self._old = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, _frame):
        self.requested, self.signal = True, self.signal or signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts, whatever SIGINT was set to before
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\ntrain: SIGINT: saving a checkpoint after this step, then stopping "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def _eval_every(cfg: TrainConfig, is_main: bool) -> int:
    """`eval_every`, or 0 when the data holds no eval documents (a single text file, a one-line JSONL,
    data.eval_fraction=0): decided here, before any step, rather than failing at the first eval."""
    if not cfg.eval_every:
        return 0
    docs = list_documents(cfg.data)
    if split_documents(docs, "eval", cfg.data.eval_fraction):
        return cfg.eval_every
    if is_main:
        print(f"train: warning: no eval documents in data.path {cfg.data.path} ({len(docs)} document"
              f"{'s' * (len(docs) != 1)}, data.eval_fraction={cfg.data.eval_fraction}): eval_every="
              f"{cfg.eval_every} ignored, no eval", file=sys.stderr)
    return 0


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


def _sample(cfg: TrainConfig, setup: Setup, params: dict, tok) -> str:
    """Greedy continuation of `sample_prompt` with the serving engine."""
    from ..engine import Generator
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
    if cfg.seq_len > mc.max_seq_len:  # RoPE would run past the positions the model is made for
        raise ValueError(f"seq_len {cfg.seq_len} is longer than the model's max_seq_len {mc.max_seq_len} "
                         f"(lower seq_len, or give a new model a larger model.max_seq_len)")
    tok = tokenizer or make_tokenizer(cfg.tokenizer)
    if tok.n_words > mc.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_words} ids but the model's vocab_size is {mc.vocab_size}")
    eval_every = _eval_every(cfg, is_main)
    if resume is not None and is_main:
        _warn_if_schedule_changed(cfg, workdir, resume)
    setup = build(cfg, mc, mesh)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = model_flops_per_token(mc, cfg.seq_len) * tokens_per_step
    peak = peak_flops(cfg.peak_flops, list(mesh.devices.flat))

    with Preemption() as preempt:  # from here on SIGTERM or Ctrl-C means "save and stop", even while compiling
        state, data_state, start, tokens_seen, origin = _start_state(cfg, setup, workdir, resume)
        it = make_iterator(cfg.data, tokenizer=tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                           process_index=jax.process_index(), process_count=jax.process_count())
        try:
            if data_state is not None:
                it.set_state(data_state)
            if is_main:  # the run starts now: record what it is (not before, so a refused run changes nothing)
                checkpoint.save_config(workdir, mc, tokenizer=tokenizer_spec(cfg) if tokenizer is None else None)
                checkpoint.write_json_atomic(workdir / "train_config.json", dataclasses.asdict(cfg))
                print(f"train: {mc.num_params():,} params, mesh {dict(mesh.shape)}, {origin}, "
                      f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens", file=sys.stderr)
        except BaseException:
            it.close()
            raise
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
                    if eval_every and (step % eval_every == 0 or step == cfg.steps):
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
               "stopped_by": preempt.signal,
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
    how = f"preempted ({s['stopped_by'] or 'SIGTERM'}), saved" if s["preempted"] else "done"
    loss = f", loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s["first_loss"] is not None else ""
    ev = f", eval loss {s['eval_loss']:.4f}" if "eval_loss" in s else ""
    speed = f", {s['tokens_per_second']:.0f} tokens/s" if s["tokens_per_second"] else ""
    print(f"train: {how}: steps {s['start_step']} -> {s['step']} in {s['seconds']:.0f}s "
          f"(startup {s['startup_seconds'] or 0:.0f}s){loss}{ev}{speed}; checkpoint {workdir} step {s['step']}",
          file=sys.stderr)
