"""Scoring: log p(completion | prompt) per token, one forward pass per batch, no decoding.

Each (prompt, completion) pair is joined into one sequence, left-padded like a prompt (padding.py),
and run through the model once; `score_batch` turns the logits into the log-probability of each next
token, and `scored_rows` reads each pair's completion span back out of the padded rows. The engine
(`Generator.score_batches`) jits `score_batch` and walks the batches.
Shapes: B batch, T padded sequence, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .slots import left_padded_layout


@dataclasses.dataclass(frozen=True)
class Scored:
    tokens: list[int]     # the completion ids
    logprobs: list[float]  # log p(token_i | prompt, tokens_<i), one per completion token

    @property
    def sum_logprob(self) -> float:
        return float(np.sum(np.asarray(self.logprobs, np.float64)))


def score_batch(graphdef, params, tokens, lengths):
    """tokens (B, T) left-padded sequences -> log p(tokens[:, t+1] | tokens[:, :t+1]) (B, T-1)."""
    model = nnx.merge(graphdef, params)
    positions, segment_ids = left_padded_layout(lengths, tokens.shape[1])
    logits, _ = model(tokens, positions, segment_ids)
    logits = logits[:, :-1]  # picked logit - log-sum-exp: no second (B, T, vocab) log-softmax copy
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


TOP_LOGPROBS = 20  # alternatives per position `top_logprobs_batch` returns (OpenAI's most)


def top_logprobs_batch(graphdef, params, tokens, lengths):
    """`score_batch`'s log-probs (the same computation, so the same numbers) and, per position, the
    TOP_LOGPROBS likeliest next tokens: (logp (B, T-1), ids (B, T-1, K), their logp (B, T-1, K)). The
    server's `logprobs` / `echo` (log-probs of the model's distribution, before temperature or filters)."""
    model = nnx.merge(graphdef, params)
    positions, segment_ids = left_padded_layout(lengths, tokens.shape[1])
    logits, _ = model(tokens, positions, segment_ids)
    logits = logits[:, :-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    vals, ids = jax.lax.top_k(logits, TOP_LOGPROBS)
    return picked - lse, ids, vals - lse[..., None]


def scored_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], rows: Sequence[int], width: int,
                logp: np.ndarray) -> list[tuple[int, Scored]]:
    """[(pair index, Scored)] of one batch: row r holds pair rows[r] right-aligned in `width` slots, and
    logp (B, width - 1) from `score_batch` scores the token in slot j + 1 at column j."""
    out = []
    for r, i in enumerate(rows):
        n_prompt, n_comp = len(pairs[i][0]), len(pairs[i][1])
        first = width - (n_prompt + n_comp) + n_prompt - 1
        out.append((i, Scored(list(pairs[i][1]), logp[r, first:first + n_comp].tolist())))
    return out
