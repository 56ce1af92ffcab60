"""Continuous batching: a fixed number of decode slots, refilled as rows finish.

Why: a static batch decodes until its longest row is done, so every finished row's slot idles. Here a
row that stops frees its slot at the next host visit; the next waiting prompt is prefilled alone (its
own power-of-two bucket, one compile per bucket) and written into that slot while the others keep
decoding.

The cache layout keeps the one-write-slot rule of kv_cache.py: all rows write slot `index` each step,
and each live row's tokens fill the slots just before it, [index - len_r, index). A new row's
prefilled window (bucket P, left-padded) is copied to [index - P, index) of its slot, the rest of that
slot's segment ids zeroed; positions are per row (the model rotates q/k by position, not by slot), so a
row's keys sit at other slots than when it runs alone and attention (masked by segment ids and slot
order) sees the same tokens at the same positions. Slots >= index always have segment 0. When `index`
reaches the end of the cache, every row is shifted left by the same amount (one roll of the cache) so
the longest live row starts at slot 0, or the cache doubles when that frees too little.

The device runs up to `steps` decode steps per call (a while_loop), leaving early when enough rows have
finished for refills to pay, or when the cache is full; the host then collects tokens, checks stop
strings, writes out finished rows and refills.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .kv_cache import CACHE_AXES, KVCache
from .multihost_io import to_host
from .sampling import sample_rows
from .sharding import constrain

MIN_BUCKET = 16
DECODE_STEPS = 32  # most decode steps per host visit


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (and >= minimum): the padded prompt length."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and its knobs. `seed` and `row_seed` pick the random stream: fold_in(key(seed), row_seed)."""
    tokens: Sequence[int]
    max_new_tokens: int       # the row's budget (the rest of the context when the caller gave none)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    row_seed: int = 0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]     # generated ids, without the stop token
    finish_reason: str    # "stop" (a stop token or string was generated) or "length" (its budget or the context's end)
    text: str | None = None


# ----------------------------------------------------------------------------- pure device functions


def left_padded_layout(lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """lengths (B,) -> positions, segment_ids (B, width) for rows right-aligned in `width` slots."""
    pad = width - lengths[:, None]
    slot = jnp.arange(width)[None, :]
    segment_ids = (slot >= pad).astype(jnp.int32)
    positions = jnp.maximum(slot - pad, 0).astype(jnp.int32)
    return positions, segment_ids


def prefill(model, tokens: jax.Array, lengths: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """tokens (B, P) left-padded, lengths (B,) -> logits of each row's last prompt token (B, V), cache."""
    positions, segment_ids = left_padded_layout(lengths, tokens.shape[1])
    logits, cache = model(tokens, positions, segment_ids, cache, last_only=True)
    return logits[:, 0], cache


def decode_step(model, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One new token per row: tokens, positions (B,) -> logits (B, V), cache advanced by one slot."""
    ones = jnp.ones_like(tokens)[:, None]
    logits, cache = model(tokens[:, None], positions[:, None], ones, cache)
    return logits[:, 0], cache


def row_keys(seeds: jax.Array, row_seeds: jax.Array) -> jax.Array:
    """Per-row keys fold_in(key(seed_r), row_seed_r): a row's stream never depends on its batch."""
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seeds, row_seeds)


def sample(logits, keys, step, knobs) -> jax.Array:
    """Each row draws with its key folded with its step (scalar or per row); knobs = (temperature,
    top_k, top_p) arrays (B,)."""
    step = jnp.broadcast_to(step, keys.shape)
    return sample_rows(logits, jax.vmap(jax.random.fold_in)(keys, step), *knobs)


def is_stop(tok, stop_ids):
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)


def _laid_out(state: dict) -> dict:
    """The cache keeps the logical rules' layout (`batch`, `kv_heads`) through every program that
    rewrites it, so the next call takes it as it is (no reshard, no recompile)."""
    c = state["cache"]
    c = KVCache(k=constrain(c.k, CACHE_AXES), v=constrain(c.v, CACHE_AXES),
                segment_ids=constrain(c.segment_ids, ("batch", "cache_seq")), index=c.index)
    return {**state, "cache": c}


def _knobs(state):
    return state["temperature"], state["top_k"], state["top_p"]


def insert(graphdef, params, state: dict, tokens, length, slot, seed, row_seed, temperature, top_k, top_p,
           limit):
    """Prefill one prompt (tokens (1, P) left-padded) into decode slot `slot` at the cache's current
    write slot (needs index >= P). Its last logits wait in the state: `decode_chunk` samples its first
    token (so this program holds no sampler, and the host need not wait for it)."""
    model = nnx.merge(graphdef, params)
    cache = state["cache"]
    p = tokens.shape[1]
    tmp = KVCache.init(model.cfg, 1, p, cache.k.dtype)
    logits, tmp = prefill(model, tokens, length, tmp)
    start = cache.index - p
    seg_row = jax.lax.dynamic_update_slice(jnp.zeros((1, cache.max_len), jnp.int32), tmp.segment_ids, (0, start))
    cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, tmp.k, (0, slot, start, 0, 0)),
                    v=jax.lax.dynamic_update_slice(cache.v, tmp.v, (0, slot, start, 0, 0)),
                    segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, seg_row, (slot, 0)),
                    index=cache.index)
    new = dict(logits=logits[0], pos=length[0], n_gen=jnp.int32(0), done=jnp.bool_(False), limit=limit,
               keys=row_keys(seed[None], row_seed[None])[0], temperature=temperature, top_k=top_k, top_p=top_p)
    return _laid_out({**state, "cache": cache, **{n: state[n].at[slot].set(v) for n, v in new.items()}})


def shift(state: dict, new_index):
    """Move every row's tokens by (new_index - index) slots (one roll of the cache; each live row's
    tokens end at index, so they all survive when new_index >= the longest) and zero the segment ids
    of slots >= new_index (and of those that wrapped round): slots past the write slot stay empty."""
    cache = state["cache"]
    d = new_index - cache.index
    seg = jnp.roll(cache.segment_ids, d, axis=1)
    slot = jnp.arange(cache.max_len)[None]
    seg = jnp.where((slot < new_index) & (slot >= d), seg, 0)  # d > 0: slots [0, d) wrapped round: empty
    cache = KVCache(k=jnp.roll(cache.k, d, axis=2), v=jnp.roll(cache.v, d, axis=2), segment_ids=seg,
                    index=jnp.asarray(new_index, jnp.int32))
    return _laid_out({**state, "cache": cache})


def resize(state: dict, slots: int):
    """The cache with `slots` slots: empty slots appended, or slots past the write slot dropped (the
    caller shifts the rows to the front first)."""
    cache = state["cache"]
    g = slots - cache.max_len
    if g < 0:
        cache = KVCache(k=cache.k[:, :, :slots], v=cache.v[:, :, :slots], segment_ids=cache.segment_ids[:, :slots],
                        index=cache.index)
    else:
        pad = ((0, 0), (0, 0), (0, g), (0, 0), (0, 0))
        cache = KVCache(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad),
                        segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, g))), index=cache.index)
    return _laid_out({**state, "cache": cache})


def decode_chunk(graphdef, params, state: dict, stop_ids, refill_at, steps: int):
    """Up to `steps` tokens for every live slot: sample from the waiting logits, then feed the token to
    the model for the next logits. Leaves early when every row is done, when `refill_at` rows have
    finished during this call, or when the cache's last slot is written.

    Returns (state, out (B, steps), n_out (B,)): row r's new tokens are out[r, :n_out[r]] (a stop token
    is not kept). A done row's slot still computes (garbage, never read) until it is refilled.
    """
    model = nnx.merge(graphdef, params)
    b = state["pos"].shape[0]
    done0 = state["done"]
    slots = state["cache"].max_len

    def cond(c):
        i, st, _, _ = c
        finished = jnp.sum(st["done"] & ~done0)
        return (i < steps) & (st["cache"].index < slots) & ~jnp.all(st["done"]) & (finished < refill_at)

    def body(c):
        i, st, out, n_out = c
        live = ~st["done"]
        tok = sample(st["logits"], st["keys"], st["n_gen"], _knobs(st))
        keep = live & ~is_stop(tok, stop_ids)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        n_gen = st["n_gen"] + keep
        done = st["done"] | (live & ~keep) | (n_gen >= st["limit"])
        logits, cache = decode_step(model, tok, st["pos"], st["cache"])
        st = {**st, "cache": cache, "logits": logits, "pos": st["pos"] + ~done, "n_gen": n_gen, "done": done}
        return i + 1, st, out, n_out + keep

    init = (jnp.zeros((), jnp.int32), state, jnp.zeros((b, steps), jnp.int32), jnp.zeros((b,), jnp.int32))
    _, state, out, n_out = jax.lax.while_loop(cond, body, init)
    return _laid_out(state), out, n_out


def empty_state(cache: KVCache, vocab: int) -> dict:
    """No live row (every slot done). Every leaf its own buffer: the state is donated."""
    b = cache.k.shape[1]
    cache = dataclasses.replace(cache, index=jnp.zeros((), jnp.int32))  # a reused cache: start at slot 0
    zi = lambda: jnp.zeros((b,), jnp.int32)  # noqa: E731
    return dict(cache=cache, logits=jnp.zeros((b, vocab), jnp.float32), pos=zi(), n_gen=zi(),
                done=jnp.ones((b,), bool), limit=zi(), keys=row_keys(zi(), zi()),
                temperature=jnp.zeros((b,), jnp.float32), top_k=zi(), top_p=jnp.ones((b,), jnp.float32))


# ------------------------------------------------------------------------------------ host side


def cut_at_stop(tokens: list[int], stops: Sequence[str], decode: Callable[[list[int]], str],
                checked: int = 0) -> tuple[int, str] | None:
    """The first stop string in decode(tokens): (tokens kept, text before the stop string), or None.

    Kept are the fewest tokens whose text holds a stop string: a stop string may span two or more
    tokens, and the last kept token may carry text past it (cut from `text`, kept in `tokens`).
    `checked`: a prefix of that many tokens is known to hold none.
    """
    if not stops or not any(s in decode(tokens) for s in stops):
        return None
    for n in range(checked + 1, len(tokens) + 1):
        text = decode(tokens[:n])
        found = [text.find(s) for s in stops if s in text]
        if found:
            return n, text[:min(found)]
    return None  # not prefix-stable (an incomplete character completed later): no cut


class Scheduler:
    """Runs requests through `batch_size` decode slots of one generator (engine.Generator: its graphdef,
    params, cfg, `_cache_for` and `_scope`). Yields [(request index, Completion)] as rows finish."""

    def __init__(self, generator, batch_size: int, steps: int = DECODE_STEPS):
        self.g, self.b, self.steps = generator, batch_size, steps
        self._insert = jax.jit(functools.partial(insert, generator.graphdef), donate_argnames=("state",))
        self._decode = jax.jit(functools.partial(decode_chunk, generator.graphdef), static_argnames=("steps",),
                               donate_argnames=("state",))
        self._shift = jax.jit(shift, donate_argnames=("state",))
        self._resize = jax.jit(resize, static_argnames=("slots",))

    def compiles(self) -> int:
        """Compiled programs so far (tests: distinct knobs must not add any)."""
        return sum(f._cache_size() for f in (self._insert, self._decode, self._shift, self._resize))

    def run(self, requests: Sequence[Request], stop_ids, decode: Callable[[list[int]], str] | None
            ) -> Iterator[list[tuple[int, Completion]]]:
        if not requests:
            return
        b = min(self.b, len(requests))
        longest = max(bucket(len(r.tokens)) for r in requests)
        budget = max(r.max_new_tokens for r in requests)
        slots = bucket(longest + min(budget, 256))
        with self.g._scope():
            state = empty_state(self.g._cache_for(b, slots), self.g.cfg.vocab_size)
        # longest prompt bucket first (stable): the cache is widest at the start and can shrink as the
        # long rows finish (the tokens do not depend on the order)
        waiting = collections.deque(sorted(range(len(requests)), key=lambda i: -bucket(len(requests[i].tokens))))
        rows: list[int | None] = [None] * b           # request in each slot
        toks: list[list[int]] = [[] for _ in range(b)]
        checked = [0] * b
        pos = np.zeros(b, np.int64)                    # tokens of each live row in the cache
        index = 0

        def finish(r, reason, n=None, text=None):
            i, t = rows[r], toks[r] if n is None else toks[r][:n]
            if text is None and decode is not None:
                text = decode(t)
            rows[r] = None
            return i, Completion(t, reason, text)

        while waiting or any(x is not None for x in rows):
            finished = []
            with self.g._scope():
                for r in range(b):  # refill free slots
                    while rows[r] is None and waiting:
                        i = waiting.popleft()
                        req = requests[i]
                        p = bucket(len(req.tokens))
                        if p + 1 > slots:
                            slots = bucket(p + 1 + self.steps)
                            state = self._resize(state, slots=slots)
                        if index < p:
                            state, index = self._shift(state, jnp.int32(p)), p
                        tokens = np.zeros((1, p), np.int32)
                        tokens[0, p - len(req.tokens):] = req.tokens
                        state = self._insert(
                            self.g.params, state, jnp.asarray(tokens), jnp.asarray([len(req.tokens)], jnp.int32),
                            jnp.int32(r), jnp.int32(req.seed), jnp.int32(req.row_seed),
                            jnp.float32(req.temperature), jnp.int32(req.top_k), jnp.float32(req.top_p),
                            jnp.int32(req.max_new_tokens))
                        rows[r], pos[r], checked[r], toks[r] = i, len(req.tokens), 0, []
                live = [r for r in range(b) if rows[r] is not None]
                if live:
                    if index >= slots:  # full: shift the rows to the front; double or halve the cache
                        longest_live = int(pos[live].max())
                        need = max(longest_live, bucket(len(requests[waiting[0]].tokens)) if waiting else 0)
                        if slots - longest_live < slots // 4:
                            slots *= 2
                            state = self._resize(state, slots=slots)
                        else:
                            state, index = self._shift(state, jnp.int32(longest_live)), longest_live
                            if bucket(2 * need) < slots:
                                slots = bucket(2 * need)
                                state = self._resize(state, slots=slots)
                    refill = min(len(waiting), max(1, b // 8)) if waiting else b + 1
                    state, out, n_out = self._decode(self.g.params, state, stop_ids, jnp.int32(refill),
                                                     steps=self.steps)
                    # gathered from every host: each process takes the same decisions (multihost_io.py)
                    out, n_out, done = to_host(out), to_host(n_out), to_host(state["done"])
                    new_index = int(to_host(state["cache"].index))
                    pos[live] += new_index - index
                    index = new_index
                    for r in live:
                        toks[r] += out[r, :n_out[r]].tolist()
                        got = self._check_strings(r, requests, rows, toks, checked, decode, finish)
                        if got:
                            finished += got
                        elif done[r]:
                            req = requests[rows[r]]
                            finished.append(finish(r, "length" if len(toks[r]) >= req.max_new_tokens else "stop"))
                    if any(rows[r] is None and not done[r] for r in range(b)):  # ended by a stop string
                        state = {**state, "done": jnp.asarray(done | np.array([x is None for x in rows]))}
            if finished:
                yield finished
        self.g._cache = state["cache"]

    @staticmethod
    def _check_strings(r, requests, rows, toks, checked, decode, finish):
        req = requests[rows[r]]
        if not req.stop or decode is None:
            return []
        cut = cut_at_stop(toks[r], req.stop, decode, checked[r])
        if cut is None:
            checked[r] = len(toks[r])
            return []
        return [finish(r, "stop", *cut)]
