"""Online RL in the one training loop (`objective: grpo`): the host side of a step. Each rollout:

    prompts (data/prompts.py: batch_size per step, their place in the run's order)
      -> the live params into the engine (serve/rollout.py Rollout.set_params: LoRA adapters merged
         into the base first), num_generations completions of each prompt, drawn with the streams
         (seed, step, prompt index, generation): the same tokens on a rerun, whatever the batch
      -> rewards: each grpo.reward_funcs entry (serve/reward_fns.py: TRL's signature; `model:DIR`:
         serve/reward.py RewardModel on prompt + completion ids), weighted, summed over the sources
         that answered (grpo_loss.combine_rewards), group advantages (grpo_loss.group_advantages)
      -> the (B*G, seq_len) batch: one row per completion, tokens = prompt + completion (its stop
         token included, as TRL's completion_ids), loss_mask on the completion's targets, the row's
         advantage on every column, `old_logps` (num_iterations > 1: one forward of the params before
         the updates, as TRL computes them)
    then `grpo.num_iterations` steps of the jitted train step (step.py grpo branch) on that batch, one
    optimizer update each (TRL's global step).

What can go wrong, and what catches it:
  * a resume inside a rollout's num_iterations updates: the batch those updates use is gone with the
    process, and a new draw from the updated params would be another run. Each rollout batch is kept
    in WORKDIR/rollouts/STEP.npz (only when num_iterations > 1; older ones pruned once a later
    checkpoint is sealed) and read back, so the rerun's updates are the uninterrupted run's;
  * a reward function that raises, answers the wrong length or a non-number: reward_fns.RewardFn's one
    line naming the function and the prompt's FILE:LINE; the run stops (the loop saves nothing more:
    the last checkpoint is the state before this step);
  * a recompile per step: the engine is built once, and the LoRA merge is one jitted program;
  * rollouts.jsonl lines of steps a crash undid: dropped on restart (as metrics.jsonl's), so a rerun
    has each step's sample once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from ..failpoints import kill_point
from ..serve import reward_fns
from ..serve.reward import RewardModel
from ..serve.rollout import Rollout, RolloutConfig
from . import grpo_loss as grpo_lib
from .config import TrainConfig
from .step import Setup, merge_trained, sampling_logps

FLOAT_KEYS = ("advantages", "old_logps")
# the metrics line's grpo entries without a "/" in their name (those with one are all logged)
RL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "rollout_seconds",
              "rollout_tokens_per_second", "update_seconds", "reward_seconds")


class RewardSource:
    """One grpo.reward_funcs entry: a Python function (TRL's signature) or `model:DIR`. `name` is
    TRL's: the function's name, the reward model directory's basename."""

    def __init__(self, spec: str, cfg: TrainConfig, setup: Setup, tok):
        self.spec = spec
        if spec.startswith("model:"):
            path = spec[len("model:"):]
            self.name, self.fn = Path(path).name, None
            self.model = RewardModel(path, mesh=setup.mesh, tokenizer=tok)
        else:
            self.fn, self.model = reward_fns.load(spec), None
            self.name = spec.rpartition(":")[2]

    def __call__(self, prompt: dict, completions: list, completion_ids: list[list[int]]) -> list[float | None]:
        if self.fn is not None:
            return self.fn(prompt["prompt"], completions, completion_ids, prompt["columns"], prompt["where"])
        return self.model.rewards([prompt["ids"] + ids for ids in completion_ids])


class GRPO:
    """The rollout phase and the updates of an `objective: grpo` run (module docstring)."""

    def __init__(self, cfg: TrainConfig, setup: Setup, tok, workdir: Path, start_step: int):
        self.cfg, self.g, self.setup, self.tok, self.workdir = cfg, cfg.grpo, setup, tok, workdir
        self.sources = [RewardSource(s, cfg, setup, tok) for s in cfg.grpo.reward_funcs]
        self.weights = list(cfg.grpo.reward_weights) if cfg.grpo.reward_weights else None
        self.rollout: Rollout | None = None  # built at the first rollout, from the live params
        self._merge = jax.jit(lambda base, p: merge_trained(base, p, setup.objective.lora.scale))
        self._old = jax.jit(lambda p, f, b: sampling_logps(setup.objective, setup.graphdef, p, f, b))
        self.buffer: dict | None = None  # the current rollout: host batch and its metrics
        self.samples = _SampleLog(workdir / "rollouts.jsonl", start_step)

    def close(self) -> None:
        self.samples.close()

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
            whole = self.setup.put_batch(b["batch"]) if jax.process_count() == 1 else None
            if whole is None:
                raise ValueError("grpo.num_iterations > 1 runs on one process for now (set it to 1 on multi-host jobs)")
            b["batch"]["old_logps"] = np.asarray(jax.device_get(self._old(state["params"], self.setup.frozen, whole)),
                                                 np.float32)
            self._save(b)
        batch = self.setup.put_batch(_rows_of_process(b["batch"]))
        state, metrics = self.setup.step_fn(state, batch)
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
            self.rollout = Rollout(setup.model_cfg, live, settings, mesh=setup.mesh, tokenizer=self.tok,
                                   dtype=self.cfg.compute_dtype)
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
                   "reward": _num(rewards[k]), "advantage": float(adv[k]), "truncated": bool(rb.truncated[k])}
                  for k in range(g.num_generations)]
        return {"batch": batch, "metrics": metrics, "sample": sample}

    def _rewards(self, prompts: list[dict], rb) -> np.ndarray:
        """(B*G, F) float32, NaN where a source returned None."""
        G, chat = self.g.num_generations, None
        out = np.full((len(prompts) * G, len(self.sources)), np.nan, np.float32)
        ids = rb.completion_ids()
        for i, p in enumerate(prompts):
            rows = range(i * G, (i + 1) * G)
            texts = [self.tok.decode(rb.completions[r]) for r in rows]
            chat = not isinstance(p["prompt"], str)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
            for f, source in enumerate(self.sources):
                got = source(p, completions, [ids[r] for r in rows])
                out[i * G:(i + 1) * G, f] = [np.nan if r is None else r for r in got]
        return out

    def _batch(self, prompts: list[dict], ids: list[list[int]], truncated: np.ndarray, adv: np.ndarray) -> dict:
        """The (B*G, seq_len) rows of the update (module docstring)."""
        G, T = self.g.num_generations, self.cfg.seq_len
        n = len(ids)
        out = {k: np.zeros((n, T), np.int32) for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
        out["advantages"] = np.repeat(adv[:, None], T, axis=1).astype(np.float32)
        for r, c in enumerate(ids):
            p = prompts[r // G]["ids"]
            seq = p + c
            m = len(seq) - 1  # <= seq_len: prompts are at most seq_len - max_completion_length (prompts.py)
            out["tokens"][r, :m], out["targets"][r, :m] = seq[:-1], seq[1:]
            out["positions"][r, :m], out["segment_ids"][r, :m] = np.arange(m), 1
            if not (self.g.mask_truncated_completions and truncated[r]):
                out["loss_mask"][r, len(p) - 1:m] = 1
        return out

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


def _rows_of_process(batch: dict) -> dict:
    """This process's rows of the global rollout batch (every process computes the whole of it)."""
    n, pc, pi = len(batch["tokens"]), jax.process_count(), jax.process_index()
    return {k: v[pi * n // pc:(pi + 1) * n // pc] for k, v in batch.items()}


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
