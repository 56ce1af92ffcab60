"""Online RL with PPO in the one training loop (`objective: ppo`): the host side of a step, and the
run's starting state. The device side (the jitted step, the state's shapes) is train/ppo_step.py.

One step of the loop is one of TRL PPOTrainer's "updates" (TRL v0.19: one rollout batch, then
num_ppo_epochs x num_mini_batches optimizer updates; its scheduler steps once per update):

    prompts (data/prompts.py: batch_size per step, their place in the run's order)
      -> the live policy into the engine (serve/rollout.py Rollout.set_params; LoRA: merged into the
         base first), one completion per prompt (TRL's PPO draws one response per query), drawn with
         the streams (seed, step, prompt index): the same tokens on a rerun
      -> `ppo.rollout` kill point -> the score of each completion: ppo.reward_model is a reward
         checkpoint (`model:DIR` or DIR: serve/reward.py RewardModel, the score head at the last token
         of prompt + completion ids, as TRL's get_reward reads it) or a Python function with TRL's
         signature (MODULE:NAME, path/to/file.py:NAME: serve/reward_fns.py, called once per prompt);
         GRPO's reward path (rewards.py)
      -> the (N, seq_len) rows (prompt + completion ids, the stop token included), the completion
         positions, lengths, EOS flags, scores, and each epoch's row order (numpy, from (seed, step))
      -> ppo_step.ppo_step: old / reference log-probs, values, GAE, and every update, in one jitted call
      -> metrics; every log_every steps WORKDIR/rollouts.jsonl gets every row of the rollout: its
         completion, score, and the per-token log-probs, reference log-probs, values, advantages and
         returns the step used (over the completion's tokens and the state after it).

The value model is a Llama trunk with the `score` head, trained with the policy by one optimizer
(ppo_step.py): it starts from ppo.value_model if given, else from the reward checkpoint, else (a reward
function) from the policy's start trunk with a fresh head drawn as the reward objective draws it
(N(0, 0.02)). With LoRA the policy is adapters over the frozen base (the reference: the base with the
adapters off); the value model is adapters plus its trained head over a frozen trunk: the policy's
base itself when the value starts from the policy (no copy), else a frozen copy of its checkpoint's trunk
(a reward model is another network than the policy's base; the scorer holds its own copy too).

Several processes (jax.distributed, as `train`): every process reads the step's prompts and draws the
whole rollout on the global mesh (the engine's rule); each runs the reward function on its share of
the prompts and the scores are gathered (rewards.score: the function sees each prompt once per job);
the step's batch is the whole rollout placed on the global mesh (each device its rows), and the
per-token arrays rollouts.jsonl logs come back replicated (ppo_step.build): a job of any process count takes one process's steps
(tests/test_ppo.py, float32 tolerance).

What can go wrong, and what catches it:
  * a resume: a step is atomic (rollout + every update in one loop step), its randomness is the seed
    and the step (rollout streams, epoch permutations), the value model and the optimizer state over
    both are in the checkpoint (item `value` beside `params`), the prompt order is the iterator state:
    a SIGKILL anywhere and a rerun give the same per-step metrics, with nothing kept outside the checkpoint;
  * a reward function that raises, answers the wrong length or a non-number: reward_fns' one line naming
    the function and the prompt's FILE:LINE; `None` or NaN (TRL's "not applicable") has no meaning for
    a PPO score (TRL's PPOTrainer has a reward model only, which always answers; a penalty in its place
    would train the policy on a number the function never gave) and stops the run the same way; the
    last checkpoint is the state before this step; on several processes every process stops on the
    same line, whichever process's prompt failed;
  * a reward or value checkpoint of another tokenizer or too short a context: one line before any step
    (ppo_step.value_config), as are bad ppo.* keys (ppo_loss.PPOConfig, config.py);
  * rollouts.jsonl lines of steps a crash undid: dropped on restart (rl._SampleLog), as metrics.jsonl's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..failpoints import kill_point
from ..model import lora
from ..parallel.sharding import logical_spec, replicated
from ..serve.rollout import Rollout, RolloutConfig
from ..store import checkpoint
from . import rewards
from .config import TrainConfig
from .ppo_step import LOGGED, ROWS, TRUNK, PPOSetup, reward_checkpoint
from .rewards import RewardSource
from .rl import _SampleLog
from .state import restore_state, start_params
from .step import init_params, merge_trained


class PPO:
    """The rollout and scoring of an `objective: ppo` run, around ppo_step's jitted step."""

    def __init__(self, cfg: TrainConfig, setup: PPOSetup, tok, workdir: Path, start_step: int):
        self.cfg, self.p, self.setup, self.tok = cfg, cfg.ppo, setup, tok
        # the reward checkpoint (model:DIR, DIR) or function, on GRPO's reward path (rewards.py)
        self.source = RewardSource(self.p.reward_model, "ppo.reward_model", reward_checkpoint(self.p.reward_model),
                                   seq_len=cfg.seq_len, rows=cfg.batch_size, mesh=setup.mesh, tok=tok)
        self.rollout: Rollout | None = None  # built at the first rollout, from the live params
        self._merge = jax.jit(lambda base, p: merge_trained(base, p, setup.objective.lora.scale))
        self.samples = _SampleLog(workdir / "rollouts.jsonl", start_step)

    def close(self) -> None:
        self.samples.close()

    def step(self, state: dict, it, step: int, saved: int | None) -> tuple[dict, dict]:
        """Step `step` + 1 (0-based `step` finished so far): rollout, scores, the jitted PPO step."""
        prompts = next(it)
        rb = self._sample(state["params"], prompts, step)
        kill_point("ppo.rollout")
        t0 = time.perf_counter()
        scores = self._scores(prompts, rb)
        t1 = time.perf_counter()
        ids = rb.completion_ids()
        host = rollout_batch([p["ids"] for p in prompts], ids, self.cfg.seq_len, self.p.max_completion_length + 1)
        host.update(lengths=np.array([len(c) for c in ids], np.int32), has_eos=(~rb.truncated).astype(np.int32),
                    scores=scores, perms=epoch_orders(self.cfg.seed, step, len(ids), self.p.num_ppo_epochs))
        state, metrics, logged = self.setup.step_jit(state, self._put(host), self.setup.frozen)
        jax.block_until_ready(metrics)
        metrics = {**metrics, "rollout_seconds": rb.rollout_seconds, "rollout_tokens_per_second": rb.tokens_per_second,
                   "reward_seconds": t1 - t0, "update_seconds": time.perf_counter() - t1}
        if step + 1 == 1 or (step + 1) % self.cfg.log_every == 0:  # _SampleLog's steps: fetch only then
            self.samples.write(step + 1, self._lines(prompts, rb, scores, jax.device_get(logged)), self.cfg.log_every)
        return state, metrics

    def _sample(self, params: dict, prompts: list[dict], step: int):
        setup = self.setup
        live = self._merge(setup.frozen["base"], params) if setup.objective.lora.rank else params
        if self.rollout is None:
            settings = RolloutConfig(max_completion_length=self.p.max_completion_length,
                                     temperature=self.p.temperature, batch_size=len(prompts))
            # every prompt padded as the longest a run takes: one prefill program, none compiled later
            self.rollout = Rollout(setup.model_cfg, live, settings, mesh=setup.mesh, tokenizer=self.tok,
                                   dtype=self.cfg.compute_dtype,
                                   min_prompt_width=self.cfg.seq_len - self.p.max_completion_length)
        else:
            self.rollout.set_params(live)
        return self.rollout.sample([p["ids"] for p in prompts], 1, self.cfg.seed, step=step,
                                   prompt_indices=[p["index"] for p in prompts])

    def _scores(self, prompts: list[dict], rb) -> np.ndarray:
        """(N,) float32: the reward model's score of prompt + completion ids (one batched call), or the
        function's, called once per prompt as TRL calls it (text, or an assistant message for a chat
        prompt), each process its share of the prompts, the answers and the first error gathered."""
        need = "objective ppo needs a score for every completion"
        return rewards.score([self.source], prompts, rb, self.tok, 1, none=need)[:, 0]

    def _put(self, host: dict) -> dict:
        """The step's batch, which every process holds whole, as global arrays (each device takes its rows)."""
        mesh = self.setup.mesh

        def sharding(k):
            return replicated(mesh) if k == "perms" else jax.sharding.NamedSharding(mesh, logical_spec(ROWS[k], None, mesh))
        return {k: jax.make_array_from_process_local_data(sharding(k), v, v.shape) for k, v in host.items()}

    def _lines(self, prompts: list[dict], rb, scores: np.ndarray, logged: dict) -> list[dict]:
        """rollouts.jsonl's lines of this rollout: every row, its per-token arrays over the completion's
        tokens and the state after it (mask_1: min(length + 1, W) positions)."""
        out, width = [], self.p.max_completion_length + 1
        for r, (p, c) in enumerate(zip(prompts, rb.completion_ids())):
            n = min(len(c) + 1, width)
            out.append({"generation": 0, "row": r, "where": p["where"], "prompt": p["prompt"],
                        "completion": self.tok.decode(rb.completions[r]), "completion_ids": c, "score": float(scores[r]),
                        "truncated": bool(rb.truncated[r]), "length": len(c),
                        **{k: [float(x) for x in np.asarray(logged[k][r][:n])] for k in LOGGED}})
        return out


def rollout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], seq_len: int, width: int) -> dict:
    """The (N, seq_len) int32 rows of prompt + completion ids and the (N, width) completion positions
    (ppo_step's `index`; positions past a row are its last, never read unmasked)."""
    n = len(completion_ids)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    out["index"] = np.zeros((n, width), np.int32)
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        seq = list(p) + list(c)
        m = len(seq)  # <= seq_len: prompts are at most seq_len - max_completion_length (loop.py)
        out["tokens"][r, :m], out["targets"][r, :m - 1] = seq, seq[1:]
        out["positions"][r, :m], out["segment_ids"][r, :m] = np.arange(m), 1
        out["index"][r] = np.minimum(len(p) - 1 + np.arange(width), seq_len - 1)
    return out


def epoch_orders(seed: int, step: int, n: int, epochs: int) -> np.ndarray:
    """(epochs, n) int32: each PPO epoch's row order (TRL: np.random.permutation per epoch), a function
    of (seed, step) so that a rerun shuffles as the uninterrupted run did."""
    rng = np.random.default_rng([seed, step])
    return np.stack([rng.permutation(n) for _ in range(epochs)]).astype(np.int32)


# ---------------------------------------------------------------------------------- starting state


def _copy(tree):
    """Fresh buffers (the step donates its state; a float32 cast or a slice may share the source's)."""
    return jax.tree.map(lambda a: jax.device_put(a, a.sharding, may_alias=False), tree)


def _value_start(cfg: TrainConfig, setup: PPOSetup, start: dict) -> dict:
    """The value model's starting weights (float32, sharded): its source checkpoint's (a language model's
    trunk gets a fresh head), or the policy's start trunk with a fresh head (train/state.py's draw)."""
    if setup.value_source is not None:
        vsetup = dataclasses.replace(setup, model_cfg=setup.value_cfg)
        return start_params(dataclasses.replace(cfg, init_from=setup.value_source), vsetup)
    head = jax.jit(lambda: init_params(setup.value_cfg, cfg.seed)["score"],
                   out_shardings=setup.abstract["value"]["score"].sharding)()
    return {**{k: start[k] for k in TRUNK}, "score": head}  # the trunk not copied: the caller decides


def _frozen(cfg: TrainConfig, setup: PPOSetup, start: dict, value: dict) -> dict:
    """The frozen weights in the compute dtype (ppo_step docstring): ref or base, and value_base."""
    target = jax.tree.map(lambda a: a.sharding, setup.frozen_abstract)

    def cast(tree, sh):
        return jax.jit(lambda t: jax.tree.map(lambda a: a.astype(cfg.compute_dtype), t), out_shardings=sh)(tree)
    out = {k: cast(start, target[k]) for k in ("ref", "base") if k in target}
    if "value_base" in target:
        out["value_base"] = cast({k: value[k] for k in TRUNK}, target["value_base"])
    return out


def start_state(cfg: TrainConfig, setup: PPOSetup, workdir: Path, resume: int | None):
    """(state, data iterator state, start step, tokens seen, origin) as loop._start_state gives them:
    the workdir's checkpoint (policy, value, optimizer) or the starting weights; fills setup.frozen."""
    start = start_params(cfg, setup)
    value = _value_start(cfg, setup, start) if resume is None or "value_base" in setup.frozen_abstract else None
    setup.frozen = _frozen(cfg, setup, start, value)
    if resume is not None:
        state, data_state, meta = restore_state(workdir, resume, setup.abstract)
        return state, data_state, resume, meta.get("tokens", 0), f"resumed {workdir} at step {resume}"
    sh = setup.shardings
    key = jax.random.key(cfg.seed)
    if cfg.lora.rank:
        params = (checkpoint.restore_adapters(cfg.lora.init_from, setup.model_cfg, cfg.lora, setup.mesh)
                  if cfg.lora.init_from else jax.jit(lambda: lora.init(setup.model_cfg, cfg.lora, key),
                                                     out_shardings=sh["params"])())
        adapters = jax.jit(lambda: lora.init(setup.value_cfg, cfg.lora, jax.random.fold_in(key, 1)),
                           out_shardings={"layers": sh["value"]["layers"]})()
        value = {**adapters, "score": _copy(value["score"])}
    else:
        params, value = _copy(start), (_copy(value) if setup.value_source is None else value)
    opt = jax.jit(setup.tx.init, out_shardings=sh["opt_state"])({"policy": params, "value": value})
    state = {"params": params, "value": value, "opt_state": opt, "step": jax.device_put(jnp.int32(0), sh["step"])}
    what = f"LoRA rank {cfg.lora.rank} on {cfg.init_from}" if cfg.lora.rank else (
        f"weights from {cfg.init_from}" if cfg.init_from else "random init")
    return state, None, 0, 0, f"{what}, value model from {setup.value_source or 'the policy trunk'}"
