"""The device programs of continuous batching: prefill, place rows into decode slots, decode a chunk.

scheduler.py is the host loop that jits and calls these; here they are pure functions of
(graphdef, params, state) so each compiles once per shape with the state donated. The state is a dict:
`cache` (kv_cache.KVCache, or paged_cache.PagedKVCache) and per-slot leaves (B,): logits (B, V) waiting
to be sampled, pos (tokens of the row in the cache), n_gen, done, limit, keys, temperature, top_k, top_p,
ignore_eos (the row does not stop at the stop ids).

Rows enter in groups: every prompt admitted at one host visit with the same padded width P is
prefilled in ONE call (`insert`: n rows (n a power of two, padding rows dropped), a temporary cache of
P slots), then copied into its slots (`place`). A prompt longer than the prefill chunk may instead be
prefilled one chunk per host visit (`open_prefill`, `prefill_piece`, then `place`) while the other
slots keep decoding; the pieces run the same computation as `prefill`'s loop, so the logits are the same.

Contiguous cache (kv_cache.py's one-write-slot rule): all rows write slot `index` each step, each live
row's tokens fill [index - len_r, index). A new row's window of P slots goes to [index - P, index) of
its slot, the rest of that slot's segment ids zeroed; positions are per row (the model rotates q/k by
position, not by slot), so attention sees the same tokens at the same positions as when the row runs
alone. `shift` rolls every row left when `index` reaches the end, `resize` grows or shrinks the cache.
Paged cache (paged_cache.py): a row's token at position t sits in page table[r, t // page], so there is
no write slot to share and nothing to shift.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..model import paged_cache
from ..model.kv_cache import CACHE_AXES, KVCache
from ..model.paged_cache import PagedKVCache
from .sampling import sample_rows
from ..parallel.sharding import constrain

MIN_BUCKET = 16
# New-token slots a contiguous cache first holds when a budget is larger (no max_new_tokens: the context
# end). Both batching paths start there and grow the cache while a row still has room; read at run time
# (slots.FIRST_CHUNK), so one constant governs both.
FIRST_CHUNK = 256


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (and >= minimum): the padded prompt length."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def left_padded_layout(lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """lengths (B,) -> positions, segment_ids (B, width) for rows right-aligned in `width` slots."""
    pad = width - lengths[:, None]
    slot = jnp.arange(width)[None, :]
    segment_ids = (slot >= pad).astype(jnp.int32)
    positions = jnp.maximum(slot - pad, 0).astype(jnp.int32)
    return positions, segment_ids


def prompt_width(n: int, chunk: int | None = None, floor: int = 0) -> int:
    """Slots a prompt of n tokens is left-padded to: its power-of-two bucket (few compiles) or, with
    chunked prefill and n > chunk, n rounded up to a multiple of the chunk (at most context / chunk
    compiles; neither compute nor cache grows to the next power of two, which could pass the context).
    `floor` (Generator's min_prompt_width): padded as a prompt of at least that many tokens, so prompts
    of many lengths share one width: one prefill program and one cache size (RL rollouts, where a new
    mix of prompt lengths each step would otherwise compile a new prefill every few steps)."""
    n = max(n, floor)
    if chunk is None:
        return bucket(n)
    if n <= chunk:  # one pass: P <= chunk
        return min(bucket(n), chunk)
    return -(-n // chunk) * chunk


def first_chunk(lengths, width: int, chunk: int):
    """The first chunk holding a real token of any row (the leading all-padding ones are skipped)."""
    return (width - jnp.max(lengths)) // chunk


def open_window(cache: KVCache, lengths, width: int, skip) -> KVCache:
    """The whole window's segment ids written at the cache's write slot, which then moves past `skip`
    slots: skipped all-padding chunks must read as empty in a reused cache."""
    _, segment_ids = left_padded_layout(lengths, width)
    seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
    return dataclasses.replace(cache, segment_ids=seg, index=cache.index + skip)


def prefill_piece(model, tokens, lengths, cache: KVCache, j, chunk: int):
    """Chunk j (slots [j * chunk, (j + 1) * chunk)) of left-padded prompts tokens (B, P) against the
    cache (written at its write slot) -> logits of the piece's last slot (B, 1, V), cache."""
    positions, segment_ids = left_padded_layout(lengths, tokens.shape[1])
    piece = lambda a: jax.lax.dynamic_slice_in_dim(a, j * chunk, chunk, axis=1)  # noqa: E731
    return model(piece(tokens), piece(positions), piece(segment_ids), cache, last_only=True)


def prefill(model, tokens: jax.Array, lengths: jax.Array, cache: KVCache, chunk: int | None = None
            ) -> tuple[jax.Array, KVCache]:
    """tokens (B, P) left-padded, lengths (B,) -> logits of each row's last prompt token (B, V), cache.

    `chunk` (dividing P): the prompt runs `chunk` slots at a time against the cache (a `fori_loop`), so
    activations hold (B, chunk) tokens and (chunk, P) scores at once instead of the whole P; leading
    chunks that are padding in every row are skipped. The same logits and cache as one pass."""
    b, p = tokens.shape
    if chunk is None or chunk >= p:
        positions, segment_ids = left_padded_layout(lengths, p)
        logits, cache = model(tokens, positions, segment_ids, cache, last_only=True)
        return logits[:, 0], cache
    if p % chunk:
        raise ValueError(f"prefill chunk {chunk} does not divide the padded prompt of {p} slots")
    first = first_chunk(lengths, p, chunk)
    cache = open_window(cache, lengths, p, first * chunk)
    body = lambda j, carry: prefill_piece(model, tokens, lengths, carry[1], j, chunk)  # noqa: E731
    logits = jnp.zeros((b, 1, model.cfg.vocab_size), jnp.float32)
    logits, cache = jax.lax.fori_loop(first, p // chunk, body, (logits, cache))
    return logits[:, 0], cache


def decode_step(model, tokens: jax.Array, positions: jax.Array, cache) -> tuple[jax.Array, KVCache]:
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
    if isinstance(c, PagedKVCache):
        return {**state, "cache": dataclasses.replace(c, kv=constrain(c.kv, c.axes))}
    c = KVCache(k=constrain(c.k, CACHE_AXES), v=constrain(c.v, CACHE_AXES),
                segment_ids=constrain(c.segment_ids, ("batch", "cache_seq")), index=c.index)
    return {**state, "cache": c}


def _knobs(state):
    return state["temperature"], state["top_k"], state["top_p"]


def _place_contiguous(cache: KVCache, tmp: KVCache, slots) -> KVCache:
    """tmp's P slots into [index - P, index) of decode slots `slots` (out of range: dropped); the rest
    of those slots' segment ids zeroed."""
    n, p = tmp.segment_ids.shape
    start = cache.index - p

    def put(buf, new):  # only the P-slot band is rewritten, not the whole cache
        band = jax.lax.dynamic_slice_in_dim(buf, start, p, axis=2).at[:, slots].set(new, mode="drop")
        return jax.lax.dynamic_update_slice_in_dim(buf, band, start, axis=2)

    seg_rows = jax.lax.dynamic_update_slice(jnp.zeros((n, cache.max_len), jnp.int32), tmp.segment_ids, (0, start))
    return KVCache(k=put(cache.k, tmp.k), v=put(cache.v, tmp.v),
                   segment_ids=cache.segment_ids.at[slots].set(seg_rows, mode="drop"), index=cache.index)


def place(state: dict, tmp: KVCache, logits, slots, rows: dict, pages=None) -> dict:
    """Rows prefilled into `tmp` (n rows of P slots, index at P) into decode slots `slots` (n,) (a slot
    >= B is batch padding: dropped). rows: `lengths` and request.row_columns' fields -> (n,) arrays. The
    contiguous cache needs index >= P; a paged one takes the rows' page-table rows `pages` (n, M). The
    last logits (n, V) wait in the state: `decode_chunk` samples each row's first token."""
    cache = state["cache"]
    if isinstance(cache, PagedKVCache):
        cache = paged_cache.place(cache, tmp, pages)
    else:
        cache = _place_contiguous(cache, tmp, slots)
    n = slots.shape[0]
    new = dict(logits=logits, pos=rows["lengths"], n_gen=jnp.zeros((n,), jnp.int32), done=jnp.zeros((n,), bool),
               limit=rows["limit"], keys=row_keys(rows["seeds"], rows["row_seeds"]),
               temperature=rows["temperature"], top_k=rows["top_k"], top_p=rows["top_p"],
               ignore_eos=rows["ignore_eos"])
    out = {**state, "cache": cache}
    out.update({k: state[k].at[slots].set(v, mode="drop") for k, v in new.items()})
    return _laid_out(out)


def insert(graphdef, params, state: dict, tokens, slots, rows: dict, pages=None, chunk: int | None = None,
           src=None, lengths=None):
    """Prefill n prompts (tokens (n, P) left-padded) in one pass, then `place` them. With `src` (n,),
    `tokens` (u, P) and `lengths` (u,) are the u distinct prompts among them (n samples of one prompt,
    an RL rollout's G generations): each is prefilled once and row i takes prompt src[i]'s cache rows
    and logits (the same numbers: a row's prefill does not depend on the others)."""
    model = nnx.merge(graphdef, params)
    n, p = tokens.shape
    tmp = KVCache.init(model.cfg, n, p, state["cache"].dtype)
    logits, tmp = prefill(model, tokens, rows["lengths"] if src is None else lengths, tmp, chunk)
    if src is not None:
        tmp = dataclasses.replace(tmp, k=tmp.k[:, src], v=tmp.v[:, src], segment_ids=tmp.segment_ids[src])
        logits = logits[src]
    return place(state, tmp, logits, slots, rows, pages)


def open_prefill(cfg, dtype, tokens, lengths, chunk: int) -> KVCache:
    """An empty temporary cache for `prefill_piece` calls from the host: window open, first chunk next."""
    n, p = tokens.shape
    return open_window(KVCache.init(cfg, n, p, dtype), lengths, p, first_chunk(lengths, p, chunk) * chunk)


def prefill_step(graphdef, params, tmp: KVCache, tokens, lengths, j, chunk: int):
    """One chunk of a prefill run from the host (j from `first_chunk` up): (logits (n, V), tmp)."""
    logits, tmp = prefill_piece(nnx.merge(graphdef, params), tokens, lengths, tmp, j, chunk)
    return logits[:, 0], tmp


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


def decode_chunk(graphdef, params, state: dict, stop_ids, refill_at, steps: int, table=None):
    """Up to `steps` tokens for every live slot: sample from the waiting logits, then feed the token to
    the model for the next logits. Leaves early when every row is done, when `refill_at` rows have
    finished during this call, or (contiguous cache) when the cache's last slot is written. `table`:
    the paged cache's page table (B, M), owned by the host (rows of freed slots point at page 0).

    Returns (state, out (B, steps), n_out (B,)): row r's new tokens are out[r, :n_out[r]] (a stop token
    is not kept). A done row's slot still computes (garbage, never read) until it is refilled.
    """
    model = nnx.merge(graphdef, params)
    b = state["pos"].shape[0]
    done0 = state["done"]
    paged = isinstance(state["cache"], PagedKVCache)
    if paged:
        state = {**state, "cache": dataclasses.replace(state["cache"], table=table)}

    def cond(c):
        i, st, _, _ = c
        finished = jnp.sum(st["done"] & ~done0)
        room = True if paged else st["cache"].index < st["cache"].max_len
        return (i < steps) & room & ~jnp.all(st["done"]) & (finished < refill_at)

    def body(c):
        i, st, out, n_out = c
        live = ~st["done"]
        tok = sample(st["logits"], st["keys"], st["n_gen"], _knobs(st))
        keep = live & ~(is_stop(tok, stop_ids) & ~st["ignore_eos"])
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        n_gen = st["n_gen"] + keep
        done = st["done"] | (live & ~keep) | (n_gen >= st["limit"])
        logits, cache = decode_step(model, tok, st["pos"], st["cache"])
        st = {**st, "cache": cache, "logits": logits, "pos": st["pos"] + ~done, "n_gen": n_gen, "done": done}
        return i + 1, st, out, n_out + keep

    init = (jnp.zeros((), jnp.int32), state, jnp.zeros((b, steps), jnp.int32), jnp.zeros((b,), jnp.int32))
    _, state, out, n_out = jax.lax.while_loop(cond, body, init)
    return _laid_out(state), out, n_out


def empty_state(cache, b: int, vocab: int) -> dict:
    """No live row (every slot done). Every leaf its own buffer: the state is donated."""
    if isinstance(cache, KVCache):
        cache = dataclasses.replace(cache, index=jnp.zeros((), jnp.int32))  # a reused cache: start at slot 0
    return dict(cache=cache, **_empty_rows(b, vocab))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _empty_rows(b: int, vocab: int) -> dict:
    """empty_state's per-slot leaves, one program (eagerly, the vmapped row keys alone were ~4 ms of host
    time per run: an RL rollout pays it every step)."""
    zi = lambda: jnp.zeros((b,), jnp.int32)  # noqa: E731
    return dict(logits=jnp.zeros((b, vocab), jnp.float32), pos=zi(), n_gen=zi(), done=jnp.ones((b,), bool),
                limit=zi(), keys=row_keys(zi(), zi()), temperature=jnp.zeros((b,), jnp.float32), top_k=zi(),
                top_p=jnp.ones((b,), jnp.float32), ignore_eos=jnp.zeros((b,), bool))
