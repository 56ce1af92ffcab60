"""Online RL in the one training loop (`objective: grpo`): the host side of a step. Each rollout:

    prompts (data/prompts.py: batch_size per step, their place in the run's order)
      -> the live params into the engine (serve/rollout.py Rollout.set_params: LoRA adapters merged
         into the base first), num_generations completions of each prompt, drawn with the streams
         (seed, step, prompt index, generation): the same tokens on a rerun, whatever the batch
      -> rewards (rewards.py, the one reward path of GRPO and PPO): each grpo.reward_funcs entry
         (serve/reward_fns.py: TRL's signature; `model:DIR`: serve/reward.py RewardModel on prompt +
         completion ids), weighted, summed over the sources
         that answered (grpo_loss.combine_rewards), group advantages (grpo_loss.group_advantages);
         a completion no source scored gets no reward and advantage 0, with TRL's warning
      -> the update's batch (grpo_batch.py: packed, one row per prompt and its G completions, the
         prompt computed once; or one row per completion): each completion's ids (its stop token
         included, as TRL's completion_ids) as targets, loss_mask on them, its advantage, `old_logps`
         (num_iterations > 1: one forward of the params before the updates, as TRL computes them)
    then `grpo.num_iterations` steps of the jitted train step (step.py grpo branch) on that batch, one
    optimizer update each (TRL's global step).

Several processes (jax.distributed, as `train`): every process reads the same prompts and draws the
same global rollout on the global mesh (the engine's rule); each runs the reward functions of its
share of the prompts, and the answers are gathered (rewards.score); the update's batch and the old log-probs are the
whole rollout batch placed on the global mesh (each device its rows), so a job of any process count
and any mesh takes the steps one device takes (tests/test_grpo.py, float32 tolerance).

What can go wrong, and what catches it:
  * a resume inside a rollout's num_iterations updates: the batch those updates use is gone with the
    process, and a new draw from the updated params would be another run. Each rollout batch is kept
    in WORKDIR/rollouts/STEP.npz (only when num_iterations > 1; older ones pruned once a later
    checkpoint is sealed) and read back, so the rerun's updates are the uninterrupted run's;
  * a reward function that raises, answers the wrong length or a non-number: reward_fns.RewardFn's one
    line naming the function and the prompt's FILE:LINE; the run stops (the loop saves nothing more:
    the last checkpoint is the state before this step), on every process alike (the error is gathered
    with the rewards: a process whose function failed would otherwise leave the others waiting);
  * a `model:DIR` reward for another tokenizer or a shorter context: refused in one line at start;
  * a recompile per step: the engine is built once, and the LoRA merge is one jitted program;
  * rollouts.jsonl lines of steps a crash undid: dropped on restart (as metrics.jsonl's), so a rerun
    has each step's sample once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ..failpoints import kill_point
from ..parallel.multihost_io import to_host
from ..parallel.sharding import logical_spec
from ..serve.rollout import Rollout, RolloutConfig
from . import grpo_batch, rewards
from . import grpo_loss as grpo_lib
from .config import TrainConfig
from .rewards import RewardSource
from .step import Setup, merge_trained, sampling_logps

# the metrics line's grpo entries without a "/" in their name (those with one are all logged)
RL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "rollout_seconds",
              "rollout_tokens_per_second", "update_seconds", "reward_seconds")


class GRPO:
    """The rollout phase and the updates of an `objective: grpo` run (module docstring)."""

    def __init__(self, cfg: TrainConfig, setup: Setup, tok, workdir: Path, start_step: int):
        self.cfg, self.g, self.setup, self.tok, self.workdir = cfg, cfg.grpo, setup, tok, workdir
        rows = cfg.batch_size * cfg.grpo.num_generations
        self.sources = [RewardSource(s, "grpo.reward_funcs", s[len("model:"):] if s.startswith("model:") else None,
                                     seq_len=cfg.seq_len, rows=rows, mesh=setup.mesh, tok=tok)
                        for s in cfg.grpo.reward_funcs]
        self.weights = list(cfg.grpo.reward_weights) if cfg.grpo.reward_weights else None
        self.rollout: Rollout | None = None  # built at the first rollout, from the live params
        self._merge = jax.jit(lambda base, p: merge_trained(base, p, setup.objective.lora.scale))
        self._old = jax.jit(lambda p, f, b: sampling_logps(setup.objective, setup.graphdef, p, f, b))
        self.buffer: dict | None = None  # the current rollout: host batch and its metrics
        self.samples = _SampleLog(workdir / "rollouts.jsonl", start_step)
        self.packed = setup.grpo_packed  # the update's layout (grpo_batch.plan); tests set it

    def close(self) -> None:
        self.samples.close()

    def _put(self, batch: dict) -> dict:
        """The whole (B*G, T) rollout batch, which every process holds, as global arrays in row order
        (each device takes its rows of it): the update and the old log-probs see the same rows, and
        the gathered old log-probs come back in the batch's order, whatever the mesh's device order."""
        sharding = jax.sharding.NamedSharding(self.setup.mesh, logical_spec(("batch", "seq"), None, self.setup.mesh))
        return {k: jax.make_array_from_process_local_data(sharding, v, v.shape) for k, v in batch.items()}

    # ------------------------------------------------------------------ the step
    def step(self, state: dict, it, step: int, saved: int | None) -> tuple[dict, dict]:
        """Update `step` + 1 (0-based `step` finished so far): a rollout first when it starts a group of
        num_iterations updates (or the group's batch read back on a resume inside one)."""
        mu = self.g.num_iterations
        start = step - step % mu
        if self.buffer is None or self.buffer["step"] != start:
            if step % mu == 0:
                self.buffer = self._rollout(state, next(it), step)
                self._keep(start, saved)
            else:
                self.buffer = self._load(start)
        b = self.buffer
        t0 = time.perf_counter()
        if mu > 1 and "old_logps" not in b["batch"]:  # the sampling policy's, before the group's first update
            old = self._old(state["params"], self.setup.frozen, self._put(b["batch"]))
            b["batch"]["old_logps"] = np.asarray(to_host(old), np.float32)  # gathered: every process keeps it all
            self._save(b)
        state, metrics = self.setup.step_fn(state, self._put(b["batch"]))
        jax.block_until_ready(metrics)
        metrics = {**metrics, **b["metrics"], "update_seconds": time.perf_counter() - t0}
        if step % mu == 0:
            self.samples.write(step + 1, b["sample"], self.cfg.log_every)
        return state, metrics

    def _rollout(self, state: dict, prompts: list[dict], step: int) -> dict:
        g, setup = self.g, self.setup
        params = state["params"]
        live = self._merge(setup.frozen["base"], params) if setup.objective.lora.rank else params
        if self.rollout is None:
            settings = RolloutConfig(max_completion_length=g.max_completion_length, temperature=g.temperature,
                                     top_p=g.top_p, top_k=g.top_k, batch_size=len(prompts) * g.num_generations)
            # every prompt padded as the longest a run takes (data/prompts.py): one prefill program for
            # any mix of prompt lengths, none compiled after the first step (serve/engine.py)
            self.rollout = Rollout(setup.model_cfg, live, settings, mesh=setup.mesh, tokenizer=self.tok,
                                   dtype=self.cfg.compute_dtype,
                                   min_prompt_width=self.cfg.seq_len - g.max_completion_length)
        else:
            self.rollout.set_params(live)
        rb = self.rollout.sample([p["ids"] for p in prompts], g.num_generations, self.cfg.seed, step=step,
                                 prompt_indices=[p["index"] for p in prompts])
        kill_point("grpo.rollout")
        return {"step": step, **self.score(prompts, rb)}

    def score(self, prompts: list[dict], rb) -> dict:
        """A rollout's completions (serve/rollout.RolloutBatch) -> rewards, group advantages, the update's
        batch, the metrics and the rollouts.jsonl sample: the host side after sampling, on its own so that
        tests/test_grpo_trl.py can hand it the very completions it hands TRL's GRPOTrainer."""
        g = self.g
        t0 = time.perf_counter()
        per_func = self._rewards(prompts, rb)
        rewards = grpo_lib.combine_rewards(per_func, self.weights)
        adv = np.asarray(grpo_lib.group_advantages(rewards, g.num_generations, g.scale_rewards), np.float32)
        ids = rb.completion_ids()
        metrics = {**grpo_lib.reward_metrics(per_func, [s.name for s in self.sources], g.num_generations,
                                             g.scale_rewards, self.weights),
                   **grpo_lib.completion_metrics([len(c) for c in ids], rb.truncated),
                   "rollout_seconds": rb.rollout_seconds, "rollout_tokens_per_second": rb.tokens_per_second,
                   "reward_seconds": time.perf_counter() - t0}
        batch = self._batch(prompts, ids, rb.truncated, adv)
        first = prompts[0]
        sample = [{"where": first["where"], "prompt": first["prompt"], "completion": self.tok.decode(rb.completions[k]),
                   "completion_ids": ids[k], "reward": _num(rewards[k]),
                   "rewards": {s.name: _num(per_func[k, f]) for f, s in enumerate(self.sources)},
                   "advantage": float(adv[k]), "truncated": bool(rb.truncated[k])}
                  for k in range(g.num_generations)]
        return {"batch": batch, "metrics": metrics, "sample": sample}

    def _rewards(self, prompts: list[dict], rb) -> np.ndarray:
        """(B*G, F) float32, NaN where a source returned None (rewards.score: each process runs the
        functions of its share of the prompts; the answers, or the first error, are gathered)."""
        out = rewards.score(self.sources, prompts, rb, self.tok, self.g.num_generations)
        _warn_unscored(out, prompts, self.g.num_generations)
        return out

    def _batch(self, prompts: list[dict], ids: list[list[int]], truncated: np.ndarray, adv: np.ndarray) -> dict:
        """The update's batch, in grpo_batch.py's packed layout or its rows layout (module docstring)."""
        loss_on = ~(np.asarray(truncated, bool) & self.g.mask_truncated_completions)
        p = [x["ids"] for x in prompts]
        if self.packed:
            return grpo_batch.packed(p, ids, loss_on, adv, self.cfg.seq_len, self.g.max_completion_length)
        return grpo_batch.rows(p, ids, loss_on, adv, self.cfg.seq_len)

    # ------------------------------------------------------------------ rollout batches kept for a resume
    def _path(self, step: int) -> Path:
        return self.workdir / "rollouts" / f"{step}.npz"

    def _save(self, b: dict) -> None:
        if jax.process_index():
            return
        path = self._path(b["step"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps({"metrics": b["metrics"], "sample": b["sample"]}).encode(),
                                           np.uint8), **b["batch"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _keep(self, start: int, saved: int | None) -> None:
        """Drop kept rollout batches older than the group of the last checkpoint (no resume needs them)."""
        if self.g.num_iterations == 1 or jax.process_index() or saved is None:
            return
        oldest = saved - saved % self.g.num_iterations
        for p in (self.workdir / "rollouts").glob("*.npz"):
            if p.stem.isdigit() and int(p.stem) < oldest:
                p.unlink(missing_ok=True)

    def _load(self, start: int) -> dict:
        path = self._path(start)
        if not path.exists():
            raise ValueError(f"{path}: missing: resuming inside the grpo.num_iterations updates of the rollout at "
                             f"step {start} needs its batch (use the workdir's rollouts/ as the run left it)")
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            batch = {k: z[k] for k in z.files if k != "meta"}
        return {"step": start, "batch": batch, **meta}


def _warn_unscored(per_func: np.ndarray, prompts: list[dict], G: int) -> None:
    """TRL 1.16's warning when every reward function returned None for a completion (it gets no reward:
    left out of the group's mean and std and of the reward metrics, advantage 0, as TRL does)."""
    unscored = np.flatnonzero(np.isnan(per_func).all(axis=1))
    if len(unscored) and jax.process_index() == 0:
        r = int(unscored[0])
        print(f"train: warning: {prompts[r // G]['where']}: every reward function returned None for completion "
              f"{r % G} of this prompt ({len(unscored)} such completion(s) this step): no reward, advantage 0",
              file=sys.stderr)


def _num(x) -> float | None:
    return None if np.isnan(x) else float(x)


class _SampleLog:
    """WORKDIR/rollouts.jsonl: a rollout's completions of its first prompt, with their rewards, every
    log_every steps (process 0). On (re)start lines of steps after `start_step` are dropped."""

    def __init__(self, path: Path, start_step: int):
        self.path, self.file = path, None
        if jax.process_index():
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
        self.file = open(path, "a")

    def write(self, step: int, sample: list[dict], every: int) -> None:
        if self.file is None or not (step == 1 or step % every == 0):
            return
        for k, s in enumerate(sample):
            self.file.write(json.dumps({"step": step, "generation": k, **s}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
