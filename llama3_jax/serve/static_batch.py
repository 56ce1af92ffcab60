"""The static path: prefill + decode one whole batch until its longest row is done, then the next.

Kept beside continuous batching (scheduler.py) for the benchmark comparison (`--static-batching`).
The device programs (`generate_batch`, `extend_batch`) are jitted by engine.Generator; the host loop
(`static_batches`) walks the batches. Prompts are left-padded to one width, so every row writes the
same cache slot each step (kv_cache.py); the decode loop is a `lax.while_loop` with a per-row done mask.
The cache holds the bucket of the longest budget, at most slots.FIRST_CHUNK new tokens at first: while a
row has room and no stop token, the cache and the out buffer double (`extend_batch`), so memory follows the
longest answer rather than the context.
Shapes: B batch, P padded prompt, N max new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.kv_cache import KVCache
from ..parallel.multihost_io import to_host
from .padding import left_padded_batches
from .request import Completion, Request, finished, row_columns
from . import slots
from .slots import bucket, decode_step, is_stop, prefill, prompt_width, row_keys, sample


def _decode_loop(model, knobs, max_new: int, state, lengths, keys, stop_ids, limits):
    """Decode until every row is done or `max_new` steps; state = (step, tok, out, done, n_kept, cache).

    Row r is done when it samples a stop token (n_kept[r] = its step) or once it has limits[r] tokens.
    """
    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, tok, out, done, n_kept, cache = state
        logits, cache = decode_step(model, tok, lengths + step - 1, cache)
        tok = sample(logits, keys, step, knobs)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        hit = is_stop(tok, stop_ids) & ~done
        n_kept = jnp.where(hit, step, n_kept)
        return step + 1, tok, out, done | hit | (step + 1 >= limits), n_kept, cache

    return jax.lax.while_loop(cond, body, state)


def generate_batch(graphdef, max_new: int, params, cache: KVCache, tokens, lengths, active,
                   row_seeds, seeds, knobs, stop_ids, limits, prefill_chunk: int | None = None):
    """Prefill + decode one batch. Returns the loop state (step, last tok, out (B, N), done, n_kept, cache).

    Row r's answer is out[r, :n_kept[r]]; n_kept < limits[r] (its token budget, <= N) means it stopped on
    a stop token (excluded). Rows with active=False (batch padding) start done and never keep the loop
    running. Rows not done after N steps continue with `extend_batch`.
    """
    model = nnx.merge(graphdef, params)
    b = tokens.shape[0]
    cache = dataclasses.replace(cache, index=jnp.zeros((), jnp.int32))  # reused buffers: start at slot 0
    keys = row_keys(seeds, row_seeds)
    last_logits, cache = prefill(model, tokens, lengths, cache, prefill_chunk)
    tok = sample(last_logits, keys, 0, knobs)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok)
    hit = is_stop(tok, stop_ids)
    n_kept = jnp.where(hit, 0, limits).astype(jnp.int32)
    done = hit | ~active | (limits <= 1)
    state = (jnp.ones((), jnp.int32), tok, out, done, n_kept, cache)
    return _decode_loop(model, knobs, max_new, state, lengths, keys, stop_ids, limits)


def extend_batch(graphdef, max_new: int, params, state, lengths, row_seeds, seeds, knobs, stop_ids, limits):
    """Continue `generate_batch`'s loop state with room for `max_new` (> its N) tokens: the out buffer and
    the cache grow by zeros (empty slots, segment 0), and each row keeps its random stream (keys fold in
    the step), so the tokens equal one uninterrupted run with the larger N."""
    model = nnx.merge(graphdef, params)
    step, tok, out, done, n_kept, cache = state
    grow = max_new - out.shape[1]
    out = jnp.pad(out, ((0, 0), (0, grow)))
    slots = ((0, 0), (0, 0), (0, grow), (0, 0), (0, 0))
    cache = KVCache(k=jnp.pad(cache.k, slots), v=jnp.pad(cache.v, slots),
                    segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, grow))), index=cache.index)
    state = (step, tok, out, done, n_kept, cache)
    return _decode_loop(model, knobs, max_new, state, lengths, row_keys(seeds, row_seeds), stop_ids, limits)


# ------------------------------------------------------------------------------------------ host loop


def static_batches(gen, requests: Sequence[Request], stop_arr, batch_size: int, decode
                   ) -> Iterator[list[tuple[int, Completion]]]:
    """Yield [(request index, Completion)] per whole batch of `left_padded_batches`. `gen` is the
    engine.Generator: its params, prefill_chunk, jitted `_generate` / `_extend`, `_cache_for` (whose
    cache is handed back in `_cache` for the next batch), `_put` and `_scope`."""
    width = functools.partial(prompt_width, chunk=gen.prefill_chunk, floor=gen.min_prompt_width)
    for rows, tokens, lengths in left_padded_batches([r.tokens for r in requests], batch_size, width):
        b, p = tokens.shape
        cols = row_columns([requests[i] for i in rows], b)
        limits = cols["limit"]
        n = min(bucket(int(limits.max()), 1), slots.FIRST_CHUNK)
        cache = gen._cache_for(b, p + n)
        knobs = tuple(gen._put(cols[f], ("batch",)) for f in ("temperature", "top_k", "top_p"))
        common = dict(params=gen.params, lengths=gen._put(lengths, ("batch",)), knobs=knobs,
                      row_seeds=gen._put(cols["row_seeds"], ("batch",)), seeds=gen._put(cols["seeds"], ("batch",)),
                      stop_ids=stop_arr, limits=gen._put(limits, ("batch",)))
        with gen._scope():
            state = gen._generate(cache=cache, tokens=gen._put(tokens, ("batch", "seq")),
                                  active=gen._put(np.arange(b) < len(rows), ("batch",)), max_new=n, **common)
            while n < limits.max() and not bool(to_host(state[3]).all()):
                n *= 2
                state = gen._extend(state=state, max_new=n, **common)
        _, _, out, _, n_kept, gen._cache = state
        out, n_kept = to_host(out), to_host(n_kept)
        yield [(i, finished(out[r, :n_kept[r]].tolist(), limits[r], requests[i].stop, decode))
               for r, i in enumerate(rows)]
