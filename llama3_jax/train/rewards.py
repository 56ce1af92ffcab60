"""The rewards of an RL run's rollout, one path for `objective: grpo` (grpo.reward_funcs, rl.py) and
`objective: ppo` (ppo.reward_model, ppo.py): the reward sources, and the scoring of a rollout's
completions on every process alike.

A source is a Python function with TRL's signature (`MODULE:NAME`, `path/to/file.py:NAME`:
serve/reward_fns.RewardFn, called once per prompt with its G completions) or a reward checkpoint
(`model:DIR`; PPO also takes a bare DIR: serve/reward.py RewardModel, the score head at the last token
of the policy's own prompt + completion ids, one batch per rollout).

Several processes (jax.distributed, as `train`): every process holds the whole rollout (the engine's
rule: one global batch). A reward model scores every row on every process (a program on the global
mesh: the same inputs everywhere). The reward functions run on this process's contiguous share of the
prompts, and the answers, with the first error in prompt order, are gathered: each function sees each
prompt once per job (a judge behind an API is asked once, not once per host), and every process stops
on the same one-line error at the same rollout (a process whose function failed would otherwise leave
the others waiting in the next collective).

What can go wrong, and what catches it:
  * a function that raises, answers the wrong length or a non-number: RewardFn's one line naming the
    function and the prompt's FILE:LINE; `None` (or NaN) is TRL's "not applicable": kept as NaN where
    the objective has a use for it (GRPO), one line the same way where it has none (PPO's score);
  * a name that does not load, a reward checkpoint of another tokenizer or a shorter context: one line
    naming the config key, at start, before any rollout.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from ..parallel.multihost_io import several
from ..serve import restore, reward_fns
from ..serve.reward import RewardModel

ERROR_BYTES = 4096  # a reward error line, as gathered between processes (longer ones are cut)


class RewardSource:
    """One reward source: a Python function (`fn`: reward_fns.RewardFn, TRL's signature) or a reward
    checkpoint `path` (`model`: a RewardModel scoring `rows` prompt + completion rows per rollout,
    float32). `key` (grpo.reward_funcs, ppo.reward_model) names it in errors; `name` is TRL's: the
    function's name, the reward model directory's basename."""

    def __init__(self, spec: str, key: str, path: str | None, *, seq_len: int, rows: int, mesh, tok):
        self.spec = spec
        if path is None:
            try:
                self.fn, self.model = reward_fns.load(spec), None
            except ValueError as e:
                raise ValueError(f"{key} {spec}: {str(e).removeprefix(f'--reward-fn {spec}: ')}") from None
            self.name = spec.rpartition(":")[2]
            return
        self.name, self.fn = Path(path.rstrip("/")).name, None
        rm = restore.model_config(path)  # refused before the restore: RewardModel checks the head
        if rm.vocab_size < tok.n_words:  # it scores the policy's ids: one vocabulary
            raise ValueError(f"{key} {spec}: its vocab_size {rm.vocab_size} is smaller than the policy "
                             f"tokenizer's {tok.n_words} ids (a reward model for another tokenizer)")
        if rm.max_seq_len < seq_len:  # a row, prompt + completion, may fill seq_len
            raise ValueError(f"{key} {spec}: its context of {rm.max_seq_len} tokens is shorter than seq_len "
                             f"{seq_len} (a prompt + completion row)")
        self.model = RewardModel(path, mesh=mesh, tokenizer=tok, batch_size=rows)


def score(sources: list[RewardSource], prompts: list[dict], rb, tok, G: int, *, none: str | None = None) -> np.ndarray:
    """(B*G, F) float32: each source's reward of each completion (row b*G + g: prompt b's g-th), NaN
    where a function returned None. `none`: None is not allowed, and stops the run in one line ending
    with this reason. A collective on several processes: every process calls it each rollout."""
    out = np.full((len(prompts) * G, len(sources)), np.nan, np.float32)
    ids = rb.completion_ids()
    for f, source in enumerate(sources):
        if source.model is not None:
            out[:, f] = source.model.rewards([prompts[r // G]["ids"] + c for r, c in enumerate(ids)])
    lo, hi = share(len(prompts), jax.process_index())
    error = None
    try:
        for i in range(lo, hi):
            p, rows = prompts[i], slice(i * G, (i + 1) * G)
            texts = [tok.decode(c) for c in rb.completions[rows]]
            completions = texts if isinstance(p["prompt"], str) else [[{"role": "assistant", "content": t}]
                                                                      for t in texts]
            for f, source in enumerate(sources):
                if source.fn is not None:
                    got = source.fn(p["prompt"], completions, ids[rows], p["columns"], p["where"])
                    if none is not None and None in got:
                        raise ValueError(f"{p['where']}: reward function {source.fn.name} returned None for "
                                         f"completion {got.index(None)}: {none}")
                    out[rows, f] = [np.nan if r is None else r for r in got]
    except ValueError as e:  # reward_fns.RewardFn's one line (the function raised or answered badly)
        error = str(e)
    if several():
        error = _gather(out, error, len(prompts), G, [s.fn is not None for s in sources])
    if error:
        raise ValueError(error)
    return out


def share(n: int, process: int) -> tuple[int, int]:
    """[lo, hi): the prompts of a step whose reward functions `process` runs (contiguous, in order)."""
    pc = jax.process_count()
    return process * n // pc, (process + 1) * n // pc


def _gather(out: np.ndarray, error: str | None, n_prompts: int, G: int, fn_cols: list[bool]) -> str | None:
    """Every process's reward-function answers into `out` (in place; the reward-model columns, computed
    alike everywhere, are left as they are) and the first error in prompt order (that of the lowest
    process with one, as each stops at its first). A collective: every process calls it each rollout."""
    from jax.experimental import multihost_utils
    pc, cols = jax.process_count(), np.flatnonzero(fn_cols)
    width = -(-n_prompts // pc) * G  # the most rows a process scores
    lo, hi = share(n_prompts, jax.process_index())
    mine = np.full((width, len(cols)), np.nan, np.float32)
    mine[:(hi - lo) * G] = out[lo * G:hi * G][:, cols]
    message = np.zeros(ERROR_BYTES, np.uint8)
    if error:
        raw = error.encode()[:ERROR_BYTES]
        message[:len(raw)] = np.frombuffer(raw, np.uint8)
    rows, messages = multihost_utils.process_allgather((mine, message))  # (pc, width, F'), (pc, ERROR_BYTES)
    for k in range(pc):
        a, b = share(n_prompts, k)
        out[a * G:b * G, cols] = rows[k][:(b - a) * G]
    first = next((m for m in np.asarray(messages) if m.any()), None)
    return None if first is None else first.tobytes().rstrip(b"\0").decode(errors="ignore")
