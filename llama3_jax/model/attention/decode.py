"""Ragged decode attention: one query per row reads only the cache blocks the rows have filled.

Why: the decoding cache is one buffer (L, B, S, KV, K) as wide as the longest row the engine has
room for, and the reference attends every query over all S slots. In a ragged batch (prompts of 16
to 1024 tokens, answers of 8 to 256) most slots of most rows are empty, so decode cost followed the
cache size instead of the tokens. Here the cache is read as fixed blocks of `block` slots and only
blocks that hold tokens are visited: work grows with the rows' filled lengths (their sum, or B x the
longest: the two visiting orders below), not with B * S.

How: a row's filled slots are found from its segment ids (0 = empty): its first non-zero slot up to
the query's slot (everything past it is masked by the causal rule). The (row, block) pairs of all
rows form one flat work list (cumulative sums of blocks per row); a `lax.while_loop` takes `chunk`
pairs at a time, gathers their key/value blocks from the stacked cache (the layer index is an
argument, so no per-layer copy of the buffer is made), and folds each pair into its row's running
(max, sum, weighted values) with segment reductions: online softmax across chunks, exact in float32
up to rounding order. Masks inside a visited block are the reference's rule (same non-zero segment,
key slot <= query slot), so skipping is exact for any layout: a skipped block holds only empty slots
or slots after the query.

The engines keep a row's tokens contiguous and ending at the write slot (kv_cache.py), so a row's
work is ceil(len / block) + 1 blocks at most.

Two visiting orders, one masking rule (model.Llama's `decode_attention`):
  ragged (`attend`)         each row its own blocks, gathered: work ~ the SUM of the rows' lengths;
  window (`attend_window`)  the blocks from the earliest filled one of any row to the query's, for all
                            rows at once as contiguous slices: work ~ B x the LONGEST row. On XLA:CPU a
                            gather moves a byte several times slower than a slice, and window wins
                            (batch 32, rows of 16-1300 tokens in a 2048-slot cache: ~35 ms for two
                            layers vs ~100 ms ragged vs ~160-220 ms reference, a loaded 2-core VM,
                            with the 256-slot window blocks of then; WINDOW_BLOCK says why it is 32).
Shapes: q (B, 1, H, K). `attend` needs S to be a multiple of its block (`block_for` picks the largest
power of two <= the block that divides S); `attend_window` does not (its last slice is moved back to
end at S, and the slots it already visited are masked).

The paged cache (paged_cache.py) is read by `attend_paged`: the same work list and online softmax,
each row visiting its pages through its page table (page table[r, j] where `attend` reads block
first[r] + j), masked by position instead of segment ids.

On TPU the paged cache is read by `jax.experimental.pallas.ops.tpu.ragged_paged_attention` instead
(ragged_paged.py, the `paged_attention` switch), proven equal to `attend_paged`.
Einsum letters as in model/llama.py: w work item (row, block), s slots of a block, k kv heads, g heads per
kv head, d head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .reference import NEG_INF

BLOCK = 64  # slots per visited block: a row wastes at most two partial blocks
# attend_window's slots per block: small blocks read fewer empty slots past the longest row; on the
# 2-core CPU VM a batch-32 decode step of a 126M model (12 layers) took 109 ms with 256, 69 ms with
# 64 or 32 at rows of 41 slots, and 309 / 312 / 244 ms (256 / 64 / 32) at ragged rows up to 1,300
WINDOW_BLOCK = 32
F32 = jnp.float32


def block_for(slots: int, block: int = BLOCK) -> int:
    """The largest power of two <= `block` that divides `slots` (the cache width)."""
    b = block
    while slots % b:
        b //= 2
    return b


def work_list(k_seg, q_slot, block: int):
    """Per-row first block and block count: k_seg (B, S), q_slot () -> first (B,), count (B,) int32.

    A row with no filled slot (never the case for a decoding row: its query's own slot is written)
    gets zero blocks."""
    s = k_seg.shape[1]
    filled = (k_seg != 0) & (jnp.arange(s)[None] <= q_slot)
    first_slot = jnp.argmax(filled, axis=1)
    first = (first_slot // block).astype(jnp.int32)
    count = jnp.where(filled.any(axis=1), q_slot // block - first + 1, 0).astype(jnp.int32)
    return first, count


def _work_loop(q, kv: int, count, fetch, chunk: int | None = None):
    """Online softmax of q (B, 1, H, K) over a flat work list in which row r owns count[r] items.
    fetch(row (w,), j (w,) the item's rank within its row) -> keys, values (w, s, KV, K), allowed
    (w, s). A `while_loop` takes `chunk` items (default B) at a time and folds each into its row's
    running (max, sum, weighted values) with segment reductions. Rows with no item come out zero."""
    b, t, h, d = q.shape
    assert t == 1, "ragged decode attention takes one query per row"
    chunk = chunk or b
    g = h // kv
    qg = q.reshape(b, kv, g, d)
    ends = jnp.cumsum(count)
    starts = ends - count
    total = ends[-1]
    scale = d ** -0.5

    def cond(c):
        return c[0] * chunk < total

    def body(c):
        i, m_run, l_run, acc = c
        item = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
        row = jnp.minimum(jnp.searchsorted(ends, item, side="right"), b - 1).astype(jnp.int32)
        keys, vals, allowed = fetch(row, item - starts[row])                   # (w, s, k, d), (w, s)
        allowed &= (item < total)[:, None]
        sc = jnp.einsum("wkgd,wskd->wkgs", qg[row], keys, preferred_element_type=F32) * scale
        sc = jnp.where(allowed[:, None, None], sc, NEG_INF)
        m_i = sc.max(-1)                                                        # (w, k, g)
        p = jnp.where(allowed[:, None, None], jnp.exp(sc - m_i[..., None]), 0.0)
        o_i = jnp.einsum("wkgs,wskd->wkgd", p.astype(vals.dtype), vals, preferred_element_type=F32)
        m_new = jnp.maximum(m_run, jax.ops.segment_max(m_i, row, num_segments=b))
        f = jnp.exp(m_i - m_new[row])                                           # item -> its row's max
        l_run = l_run * jnp.exp(m_run - m_new) + jax.ops.segment_sum(p.sum(-1) * f, row, num_segments=b)
        acc = acc * jnp.exp(m_run - m_new)[..., None] + jax.ops.segment_sum(o_i * f[..., None], row,
                                                                            num_segments=b)
        return i + 1, m_new, l_run, acc

    init = (jnp.zeros((), jnp.int32), jnp.full((b, kv, g), NEG_INF, F32), jnp.zeros((b, kv, g), F32),
            jnp.zeros((b, kv, g, d), F32))
    _, _, l_run, acc = jax.lax.while_loop(cond, body, init)
    out = acc / jnp.where(l_run == 0, 1.0, l_run)[..., None]
    return out.reshape(b, 1, h, d).astype(q.dtype)


def attend(q, k_cache, v_cache, layer, q_seg, k_seg, q_slot, *, block: int = BLOCK, chunk: int | None = None,
           load=None):
    """q (B, 1, H, K); k_cache/v_cache the stacked (L, B, S, KV, K) buffers, read at `layer`;
    q_seg (B, 1); k_seg (B, S); q_slot () the query's cache slot -> (B, 1, H, K) in q's dtype.

    Rows with nothing to attend come out as zeros (the reference gives them the mean of the values;
    no real token is such a row). `chunk`: work items per loop step (default B). `load`: cache blocks ->
    keys/values (quant.kv_load for an int8 cache, whose rows are wider than K); default as stored."""
    b = q.shape[0]
    n_layers, _, s, kv, width = k_cache.shape
    load = load or (lambda c: c)
    block = block_for(s, block)
    nb = s // block
    kb = k_cache.reshape(n_layers, b, nb, block, kv, width)  # a bitcast, not a copy
    vb = v_cache.reshape(n_layers, b, nb, block, kv, width)
    kseg_b = k_seg.reshape(b, nb, block)
    qs = q_seg[:, 0].astype(jnp.int32)
    first, count = work_list(k_seg, q_slot, block)

    def fetch(row, j):
        blk = jnp.clip(first[row] + j, 0, nb - 1)
        slot = blk[:, None] * block + jnp.arange(block)[None]
        allowed = (kseg_b[row, blk] == qs[row][:, None]) & (qs[row][:, None] != 0) & (slot <= q_slot)
        return load(kb[layer, row, blk]), load(vb[layer, row, blk]), allowed

    return _work_loop(q, kv, count, fetch, chunk)


def attend_paged(q, pool, layer, q_seg=None, k_seg=None, q_slot=None, *, table, positions,
                 chunk: int | None = None, load=None):
    """`attend` over the paged cache (paged_cache.py): pool (L, 2, N, G, KV, W), the K pages then the V
    pages (the split layout); table (B, M) each row's pages in position order, positions (B,) the query's
    position (its own k/v are written there already). Row r visits its pages 0 .. positions[r] // G
    through its table (where `attend` reads block first[r] + j, this reads page table[r, j]); a key at
    position j * G + s is attended iff it is <= the query's position. q_seg, k_seg, q_slot: the
    interface's, unused (every decoding row is one segment, and its pages hold nothing else)."""
    g, kv = pool.shape[3], pool.shape[4]
    load = load or (lambda c: c)
    m = table.shape[1]

    def fetch(row, j):
        j = jnp.clip(j, 0, m - 1)
        page = table[row, j]
        allowed = j[:, None] * g + jnp.arange(g)[None] <= positions[row][:, None]
        return load(pool[layer, 0, page]), load(pool[layer, 1, page]), allowed

    return _work_loop(q, kv, jnp.minimum(positions // g + 1, m).astype(jnp.int32), fetch, chunk)


def attend_window(q, k_cache, v_cache, layer, q_seg, k_seg, q_slot, *, block: int = WINDOW_BLOCK, load=None):
    """`attend`'s interface; visits the blocks from the earliest filled block of any row to the query's,
    for every row at once: contiguous slices of the cache (no gather), so work follows the LONGEST
    row, not the sum. The faster choice where a gather is slow per byte (XLA:CPU)."""
    b, t, h, d = q.shape
    assert t == 1, "ragged decode attention takes one query per row"
    _, _, s, kv, _ = k_cache.shape
    load = load or (lambda c: c)
    block = min(block, s)  # need not divide s: the last block's slice is moved back, its overlap masked
    g = h // kv
    qg = q.reshape(b, kv, g, d)
    qs = q_seg[:, 0].astype(jnp.int32)
    filled = (k_seg != 0) & (jnp.arange(s)[None] <= q_slot)
    first_slot = jnp.min(jnp.where(filled.any(1), jnp.argmax(filled, axis=1), q_slot))
    scale = d ** -0.5

    def body(j, c):
        m_run, l_run, acc = c
        start = jnp.minimum(j * block, s - block)
        keys = load(jax.lax.dynamic_slice_in_dim(k_cache[layer], start, block, axis=1))   # (b, s, k, d)
        vals = load(jax.lax.dynamic_slice_in_dim(v_cache[layer], start, block, axis=1))
        seg = jax.lax.dynamic_slice_in_dim(k_seg, start, block, axis=1)
        slot = start + jnp.arange(block)
        allowed = (seg == qs[:, None]) & (qs[:, None] != 0) & (slot[None] <= q_slot) & (slot[None] >= j * block)
        sc = jnp.einsum("bkgd,bskd->bkgs", qg, keys, preferred_element_type=F32) * scale
        sc = jnp.where(allowed[:, None, None], sc, NEG_INF)
        m_new = jnp.maximum(m_run, sc.max(-1))
        p = jnp.where(allowed[:, None, None], jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(m_run - m_new)
        pv = jnp.einsum("bkgs,bskd->bkgd", p.astype(vals.dtype), vals, preferred_element_type=F32)
        return m_new, l_run * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (jnp.full((b, kv, g), NEG_INF, F32), jnp.zeros((b, kv, g), F32), jnp.zeros((b, kv, g, d), F32))
    _, l_run, acc = jax.lax.fori_loop(first_slot // block, q_slot // block + 1, body, init)
    out = acc / jnp.where(l_run == 0, 1.0, l_run)[..., None]
    return out.reshape(b, 1, h, d).astype(q.dtype)
