"""Rollouts for online RL: the serving engine drawing completions from the parameters being trained.

A `Rollout` is built once per run from the model config, the mesh, the tokenizer and the sampling
settings (`RolloutConfig`: the `grpo.*` / `ppo.*` rollout keys). It owns ONE `engine.Generator` (its
continuous-batching scheduler, paged or contiguous KV cache, per-row sampling) on the training mesh,
in the training process. Each RL step:

    rollout.set_params(params)   # the live training params (float32, layers stacked; LoRA: merged)
    batch = rollout.sample(prompt_ids, num_generations, seed, step=step, prompt_indices=...)

What can go wrong, and what catches it:
  * a weight copy to a second server, or a host round trip of the weights: `set_params` runs one
    jitted program on the device, the transform `restore.load_params` applies to a checkpoint (cast to
    the compute dtype, int8 if asked, layers split on CPU), with the engine's own output shardings, and
    hands the result to `Generator.set_params`;
  * a recompile per step (minutes on a large model): the swapped-in arrays have exactly the shapes,
    dtypes and shardings of the ones the engine compiled for (`Generator.set_params` refuses any that
    differ, naming the array), so every decode program and the transform itself compile once per run
    (tests/test_rollout.py counts XLA compiles across steps);
  * rollouts that change on resume or with the batch: row (prompt p, generation g) of step s draws from
    its own stream, a 62-bit hash of (seed, s, p, g) split into the engine's (seed, row_seed) pair
    (`row_stream`), and the engine never lets a row's draws depend on its neighbours; `prompt_indices`
    are the prompts' global indices (their data-set order), so a rerun from a checkpoint, another
    batch size or another process split draws the same tokens;
  * a prompt with no room for max_completion_length tokens in the context: ValueError naming the
    prompt (the caller skips or stops; nothing is cut silently).

The completions stop at the stop ids (default: the config's eos_ids plus the tokenizer's
<|end_of_text|> and <|eot_id|>) or are truncated at max_completion_length; `RolloutBatch` says which,
and which stop token ended a row (TRL keeps it in completion_ids and the loss mask). Several processes:
every process calls `sample` with the same global prompt list (the engine's rule, multihost_io.py).
Memory: the engine holds its own copy of the weights in the compute dtype (the training params are
not donated: the optimizer still needs them), plus its KV cache; during `set_params` the old and the
new copy exist together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from ..model.config import ModelConfig
from ..model.llama import abstract_model
from ..parallel.sharding import state_shardings
from . import restore
from . import sampling as sampling_lib
from .engine import Generator

__all__ = ["Rollout", "RolloutBatch", "RolloutConfig", "row_stream"]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """The sampling settings of one RL run (TRL's names). `stop_ids` None: the config's eos_ids plus the
    tokenizer's <|end_of_text|> and <|eot_id|>. `batch_size`: the engine's decode slots."""
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] | None = None
    batch_size: int = 64

    def __post_init__(self):
        n = self.max_completion_length
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"'max_completion_length' must be an integer >= 1, got {n!r}")
        sampling_lib.check_flags(self.temperature, self.top_k, self.top_p, "'")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"'batch_size' must be an integer >= 1, got {self.batch_size!r}")

    def sampler(self) -> sampling_lib.Sampler:
        return sampling_lib.from_flags(self.temperature, self.top_k, self.top_p)


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """One step's completions, prompt-major: row r = prompt r // G, generation r % G (G generations).

    `completions[r]`: the generated ids without the prompt and without the stop token; `stop_token[r]`:
    the stop id that ended it, or -1 when it was truncated at max_completion_length (`truncated[r]`);
    `lengths[r]` = len(completions[r]). `tokens`: ids decoded (kept ones plus each stop token);
    `rollout_seconds`: wall time of the whole sample call."""
    prompt_index: np.ndarray   # (R,) the prompt's index as given (prompt_indices)
    generation: np.ndarray     # (R,) 0 .. G-1
    completions: list[list[int]]
    stop_token: np.ndarray     # (R,) int32, -1 = truncated
    lengths: np.ndarray        # (R,) int32
    rollout_seconds: float
    tokens: int

    @property
    def truncated(self) -> np.ndarray:
        return self.stop_token < 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.rollout_seconds if self.rollout_seconds > 0 else 0.0

    def completion_ids(self) -> list[list[int]]:
        """Each completion with its stop token appended when it has one (TRL's completion_ids)."""
        return [c + [int(s)] if s >= 0 else list(c) for c, s in zip(self.completions, self.stop_token)]

    def padded(self, width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 (R, width) of `completion_ids`, right-padded with pad_id (mask 0 there);
        width must hold the longest (max_completion_length + 1 always does)."""
        ids = self.completion_ids()
        longest = max((len(c) for c in ids), default=0)
        if longest > width:
            raise ValueError(f"padded: a completion of {longest} ids does not fit width {width}")
        out = np.full((len(ids), width), pad_id, np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for r, c in enumerate(ids):
            out[r, :len(c)], mask[r, :len(c)] = c, 1
        return out, mask


def row_stream(seed: int, step: int, prompt_index: int, generation: int) -> tuple[int, int]:
    """The engine's (seed, row_seed) pair, two non-negative int32s, of one rollout row: a 62-bit hash
    of the four numbers, so no two rows of a run share a random stream (barring a 2^-62 collision)."""
    h = hashlib.blake2b(f"{seed}/{step}/{prompt_index}/{generation}".encode(), digest_size=8).digest()
    v = int.from_bytes(h, "little")
    return v & 0x7FFFFFFF, (v >> 31) & 0x7FFFFFFF


class Rollout:
    """The engine on the training mesh, fed the live parameters (module docstring).

    `cfg`: the policy's ModelConfig (head "lm"); `params`: its first parameters, in the training layout
    (pure dict, layers stacked, any float dtype, on `mesh` as the trainer holds them). `dtype`: the
    engine's compute dtype (the run's compute_dtype). Other keyword arguments go to `Generator`
    (quantize, kv_pages, page_size, decode_attention, split_layers, ...)."""

    def __init__(self, cfg: ModelConfig, params: dict, settings: RolloutConfig, *, mesh=None, tokenizer=None,
                 dtype: str = "bfloat16", **engine_kwargs):
        self.settings = settings
        self.engine = Generator(cfg=cfg, params=params, mesh=mesh, tokenizer=tokenizer, dtype=dtype, **engine_kwargs)
        g = self.engine
        shardings = self._engine_shardings()
        quantize = g.cfg.quantization if cfg.quantization is None else None  # int8 made at load: again each step
        split_layers = _is_split(g.params)

        def to_engine(p):
            return restore.load_params(None, dtype, mesh, cfg, p, quantize, split_layers)[1]
        self._to_engine = jax.jit(to_engine, out_shardings=shardings)
        self.set_params(params)
        self.stop_ids = list(settings.stop_ids) if settings.stop_ids is not None else self._default_stops()

    def _engine_shardings(self):
        """The engine params' shardings: the logical rules on the mesh (as a restore gives), else the
        first device (committed, like every array the engine's programs hand back)."""
        g = self.engine
        if g.mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda _: one, g.params)
        model = abstract_model(g.cfg, split_layers=_is_split(g.params))
        return nnx.to_pure_dict(state_shardings(g.mesh, nnx.state(model, nnx.Param)))

    def _default_stops(self) -> list[int]:
        ids = set(self.engine.cfg.eos_ids)
        tok = self.engine._tokenizer
        if tok is not None:
            tok = self.engine.tokenizer
            ids |= {getattr(tok, "eos_id", -1), getattr(tok, "eot_id", -1)}
        return sorted(i for i in ids if 0 <= i < self.engine.cfg.vocab_size)

    def set_params(self, params: dict) -> None:
        """Decode with these training-layout params from now on (one jitted cast/split on the device;
        nothing recompiles after the first call: module docstring)."""
        self.engine.set_params(self._to_engine(params))

    def sample(self, prompt_ids: Sequence[Sequence[int]], num_generations: int, seed: int, *, step: int = 0,
               prompt_indices: Sequence[int] | None = None) -> RolloutBatch:
        """num_generations completions of each prompt (token ids, BOS included if wanted), drawn with
        the streams `row_stream(seed, step, prompt_indices[i], g)` (default indices 0..n-1)."""
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
            raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}")
        idx = list(range(len(prompt_ids))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(idx) != len(prompt_ids):
            raise ValueError(f"{len(prompt_indices)} prompt_indices for {len(prompt_ids)} prompts")
        g, s = self.engine, self.settings
        sampler = s.sampler()
        reqs = []
        for i, p in zip(idx, prompt_ids):
            try:
                g.check_ids(p)
                err = g.context_error(len(p), s.max_completion_length)
                if err:
                    raise ValueError(err)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            for k in range(num_generations):
                a, b = row_stream(seed, step, i, k)
                reqs.append(g.request(list(p), s.max_completion_length, sampler, seed=a, row_seed=b))
        start = time.perf_counter()
        done: dict = {}
        for part in g.generate_requests(reqs, stop_ids=self.stop_ids, batch_size=s.batch_size, decode_text=False):
            done.update(part)
        seconds = time.perf_counter() - start
        rows = [done[r] for r in range(len(reqs))]
        stop = np.array([-1 if c.finish_reason == "length" else c.stop_token for c in rows], np.int32)
        lengths = np.array([len(c.tokens) for c in rows], np.int32)
        return RolloutBatch(prompt_index=np.repeat(np.array(idx, np.int64), num_generations),
                            generation=np.tile(np.arange(num_generations), len(idx)),
                            completions=[list(c.tokens) for c in rows], stop_token=stop, lengths=lengths,
                            rollout_seconds=seconds, tokens=int(lengths.sum() + (stop >= 0).sum()))


def _is_split(params: dict) -> bool:
    """Whether engine params hold per-layer arrays (split_layer_params: {"layers": {0: {...}, ...}})."""
    return all(isinstance(k, int) for k in params["layers"])
