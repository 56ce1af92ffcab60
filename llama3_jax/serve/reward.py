"""Rewards of whole sequences from a reward checkpoint (model head "score"): `RewardModel`.

The reward of a sequence is the score head's value at its last token, as transformers'
`LlamaForSequenceClassification` (num_labels=1) reads it; a chat record's last token is the
`<|eot_id|>` closing its last turn, a plain prompt + completion's the EOS after the completion. Records
are rendered exactly as SFT and reward training render them (data/chat.py render_messages /
render_completion: one renderer, so the ids scored are the ids trained on).

    rm = RewardModel("rm/", dtype="float32")
    rm.rewards([rm.render({"prompt": "2+2=", "completion": "4"})])   # -> [float]

What can go wrong, and what catches it:
  * a padded row read at the wrong slot: rows are LEFT-padded (padding.py), so every row's last real
    token sits in the last slot, and the device function reads only that slot (`last_only`: no (B, T, D)
    final norm, no head over all T); padding has segment 0 and is masked, positions restart at 0 at the
    first real token, so a padded row scores as it would alone (tests compare with transformers);
  * recompiling per call: rows are cut into batches of a power-of-two row count (at most batch_size)
    and a power-of-two width, so a caller scoring a few sequences at a time (rejection sampling) reuses
    a handful of compiled shapes;
  * a policy checkpoint given here, or a reward checkpoint given to the decoding engine: each is
    refused in one line before anything is restored (`check_reward_model`; offline.py for generate);
  * a record that is not a prompt + completion or a conversation, a token outside the vocabulary, a
    sequence longer than the context: a ValueError naming the field (`render`, `context_error`), which
    the JSONL job reports as `FILE:LINE: skipped: why` or writes as the line's error.
Several processes: every process passes the same host arrays and reads the rewards back gathered
(multihost_io.to_host), as the engine does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.config import ModelConfig
from ..model.llama import abstract_model, rewards_at
from ..parallel.multihost_io import to_host
from ..parallel.sharding import mesh_scope, put
from ..store import checkpoint
from . import restore
from .padding import left_pad
from .slots import bucket, left_padded_layout

NO_OUTPUT_LAYER = "a reward model has no output layer; use score"
NOT_A_REWARD_MODEL = "{path}: not a reward model (its head is {head!r}); score gives a policy's log-probs"


def reward_batch(graphdef, params, tokens, lengths):
    """tokens (B, T) left-padded, lengths (B,) -> float32 rewards (B,): the score head at each row's
    last real token (slot T - 1)."""
    model = nnx.merge(graphdef, params)
    positions, segment_ids = left_padded_layout(lengths, tokens.shape[1])
    hidden, _ = model(tokens, positions, segment_ids, last_only=True, hidden_only=True)  # (B, 1, D)
    return rewards_at(hidden, model.score[...], jnp.zeros((tokens.shape[0], 1), jnp.int32))[:, 0]


def reward_batches(seqs: Sequence[Sequence[int]], batch_size: int
                   ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Sequences sorted longest first, cut into batches of at most `batch_size` rows, each batch
    padded to a power-of-two row count and width (few compiles). Yields (indices, tokens (B, P),
    lengths (B,)); rows past len(indices) are padding (one zero token)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        b = min(bucket(len(rows)), batch_size)
        tokens, lengths = left_pad([seqs[i] for i in rows], bucket(len(seqs[rows[0]])), b)
        yield rows, tokens, lengths


def check_reward_model(cfg: ModelConfig, path) -> None:
    if cfg.head != "score":
        raise ValueError(NOT_A_REWARD_MODEL.format(path=path, head=cfg.head))


def check_policy_model(cfg: ModelConfig) -> None:
    """The decoding engine's refusal of a reward model, in one line."""
    if cfg.head == "score":
        raise ValueError(NO_OUTPUT_LAYER)


def is_reward_model(checkpoint_dir) -> bool:
    """Whether the checkpoint's config has a score head. A directory whose config cannot be read is
    not one here: the restore that follows reports it as it reports any unreadable checkpoint."""
    try:
        return restore.model_config(checkpoint_dir).head == "score"
    except (OSError, ValueError, KeyError):
        return False


class RewardModel:
    """A restored reward checkpoint that scores token-id sequences in padded, length-bucketed batches.

    `checkpoint_dir`: a reward checkpoint (train `objective: reward`, or convert --from hf of a
    LlamaForSequenceClassification directory); `cfg` + `params` instead: a model already in memory.
    `mesh` (sharding.make_mesh) shards the parameters and batch rows by the logical rules; None: the
    first device. `dtype` is the compute dtype (float32 matches transformers' float32 rewards).
    """

    def __init__(self, checkpoint_dir: str | Path | None = None, *, dtype: str = "float32", mesh=None,
                 batch_size: int = 8, tokenizer=None, cfg: ModelConfig | None = None, params: dict | None = None,
                 split_layers: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        restore.check_options(dtype, None, None)
        if params is None and checkpoint_dir is not None:
            check_reward_model(restore.model_config(checkpoint_dir), checkpoint_dir)  # before the restore
        elif cfg is not None:
            check_reward_model(cfg, "cfg")
        cfg, params, split_layers = restore.load_params(checkpoint_dir, dtype, mesh, cfg, params, None, split_layers)
        self.cfg, self.params, self.mesh, self.dtype, self.batch_size = cfg, params, mesh, dtype, batch_size
        self.graphdef, _ = nnx.split(abstract_model(cfg, split_layers=split_layers))
        if tokenizer is None and checkpoint_dir is not None and checkpoint.is_checkpoint(checkpoint_dir):
            tokenizer = checkpoint.load_tokenizer_spec(checkpoint_dir)
        self._tokenizer = tokenizer
        self._reward = jax.jit(functools.partial(reward_batch, self.graphdef))

    @property
    def tokenizer(self):
        """The tokenizer the checkpoint records (loaded on first use; a path or a Tokenizer may be given)."""
        from ..tokenizer import load_tokenizer
        if not hasattr(self._tokenizer, "decode"):
            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    # ------------------------------------------------------------------ records -> ids
    def render(self, record: dict) -> list[int]:
        """The token ids of a record, checked: {"prompt", "completion"} (prompt text or messages;
        completion text, an assistant message or a list of messages) or {"messages"} (a whole
        conversation), in the chat format SFT renders. Raises ValueError naming the field."""
        # here, not at the top: data/'s package imports grain, which serve/ does not need to import
        from ..data.chat import render_completion, render_messages, sft_problem
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        rec = _normalized(record)
        why = sft_problem(rec)
        if why:
            raise ValueError(why)
        tok = self.tokenizer
        if "messages" in rec:
            ids, _ = render_messages(tok, rec["messages"])
        else:
            if not isinstance(rec["prompt"], str) and not hasattr(tok, "encode_header"):
                raise ValueError(f"chat messages need Llama 3's chat format, which this tokenizer "
                                 f"({type(tok).__name__}) does not have")
            ids, _ = render_completion(tok, rec["prompt"], rec["completion"])
        self.check_ids(ids)
        return ids

    def check_ids(self, ids: Sequence[int], field: str | None = None) -> None:
        """Raise ValueError unless `ids` is a non-empty list of in-vocabulary token ids."""
        where = f"{field}: " if field else ""
        if len(ids) == 0:
            raise ValueError(f"{where}empty sequence")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"{where}token {i} is {t!r}, not an integer id")
            if not 0 <= t < self.cfg.vocab_size:
                raise ValueError(f"{where}token id {t} (position {i}) is outside the model's vocabulary "
                                 f"[0, {self.cfg.vocab_size})")

    def context_error(self, n: int) -> str | None:
        """Why a sequence of n tokens does not fit the model's context, or None."""
        ctx = self.cfg.max_seq_len
        return None if n <= ctx else f"sequence of {n} tokens is longer than the model's context of {ctx} tokens"

    # ------------------------------------------------------------------ rewards
    def rewards(self, token_id_lists: Sequence[Sequence[int]]) -> list[float]:
        """The reward of each sequence (float32 values as Python floats), in input order. Raises
        ValueError naming the sequence on bad ids or one longer than the context."""
        for i, ids in enumerate(token_id_lists):
            self.check_ids(ids, f"sequence {i}")
            err = self.context_error(len(ids))
            if err:
                raise ValueError(f"sequence {i}: {err}")
        out: list[float] = [0.0] * len(token_id_lists)
        for batch in self.reward_batches(token_id_lists):
            for i, r in batch:
                out[i] = r
        return out

    def reward_batches(self, seqs: Sequence[Sequence[int]]) -> Iterator[list[tuple[int, float]]]:
        """Yield [(sequence index, reward)] per batch (longest first): checked ids that fit the context."""
        for rows, tokens, lengths in reward_batches(seqs, self.batch_size):
            with self._scope():
                r = to_host(self._reward(self.params, self._put(tokens, ("batch", "seq")),
                                         self._put(lengths, ("batch",))))
            yield [(i, float(r[k])) for k, i in enumerate(rows)]

    def _scope(self):
        return mesh_scope(self.mesh)

    def _put(self, x: np.ndarray, names) -> jax.Array:
        return put(self.mesh, x, names)


def _normalized(record: dict) -> dict:
    """A scoring record in the shape data/chat.py renders: with a messages prompt, a text completion
    becomes one assistant message and a single message a list of one."""
    if "messages" in record and ("prompt" in record or "completion" in record):
        raise ValueError("expected 'messages' or 'prompt' + 'completion', not both")
    if "messages" in record or "prompt" not in record or "completion" not in record:
        return record
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        elif isinstance(completion, dict):
            completion = [completion]
    elif isinstance(prompt, str) and not isinstance(completion, str):
        raise ValueError("with a text 'prompt', 'completion' must be text")
    return {"prompt": prompt, "completion": completion}
