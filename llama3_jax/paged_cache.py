"""The paged decoding cache: fixed-size pages in one pool, a page table per decode slot.

Why: the contiguous cache (kv_cache.py) gives every slot as many cache slots as the longest row needs,
so memory follows B x the longest row, and one long prompt widens every slot. Here a row's token at
position t lives in page table[r, t // page] at offset t % page; the host (scheduler.PagePool) hands a
row ceil((prompt + max_new_tokens) / page) pages when it is admitted (only while that many are free) and
takes them back when it finishes. Memory then follows the rows' actual lengths and many short rows share
one big pool.

Page 0 is never handed out: free slots' table rows point at it, so their (ignored) decode steps write
there and never into a page another row owns.

Decode steps write each row's new k/v at (table[r, pos_r // page], pos_r % page) (`write`, a scatter);
attention reads a row's pages through its table (attention/decode.py `attend_paged`). Prompts are
prefilled into a contiguous temporary cache as for the contiguous layout, and `place` copies their
filled slots into the rows' pages. K and V may be int8 (quant.py: the scale rides in the row's last
4 bytes) exactly as in the contiguous cache.
Shapes: L layers, N pages (page 0 included), G page size, KV heads, W = kv_width, B slots, M table width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import quant
from .config import ModelConfig
from .kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    k: jax.Array      # (L, N, G, KV, W)
    v: jax.Array      # as k
    table: jax.Array  # (B, M) int32: page of each row's j-th block of G positions (0: none)

    @classmethod
    def init(cls, cfg: ModelConfig, pages: int, page_size: int, batch: int, table_width: int,
             dtype=jnp.bfloat16) -> "PagedKVCache":
        shape = (cfg.n_layers, pages, page_size, cfg.n_kv_heads, quant.kv_width(cfg.head_dim, dtype))
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   table=jnp.zeros((batch, table_width), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def write(ck, cv, layer, k, v, table, positions):
    """k, v (B, 1, KV, K) of the token at positions (B,) into layer `layer` of the pools."""
    g = ck.shape[2]
    blk = jnp.minimum(positions // g, table.shape[1] - 1)
    page = jnp.take_along_axis(table, blk[:, None], axis=1)[:, 0]
    off = positions % g
    ck = ck.at[layer, page, off].set(quant.kv_store(k[:, 0], ck.dtype))
    cv = cv.at[layer, page, off].set(quant.kv_store(v[:, 0], cv.dtype))
    return ck, cv


def place(cache: PagedKVCache, tmp: KVCache, pages) -> PagedKVCache:
    """Rows prefilled into `tmp` (n rows left-padded in P slots) into their pages: pages (n, M) their
    table rows (a batch-padding row: every entry out of range, so dropped). Position t of row i is
    tmp slot P - len_i + t; only t < len_i is copied."""
    n, p = tmp.segment_ids.shape
    g = cache.page_size
    lengths = jnp.sum(tmp.segment_ids != 0, axis=1)
    t = jnp.arange(p)[None]                                       # (1, P) positions
    blk = jnp.minimum(t // g, pages.shape[1] - 1)
    dst = jnp.take_along_axis(pages, jnp.broadcast_to(blk, (n, p)), axis=1)
    dst = jnp.where(t < lengths[:, None], dst, cache.k.shape[1])  # out of range: dropped
    src = jnp.clip(p - lengths[:, None] + t, 0, p - 1)            # (n, P)
    rows = jnp.arange(n)[:, None]
    off = jnp.broadcast_to(t % g, (n, p))

    def put(pool, buf):  # buf (L, n, P, KV, W) -> pool[:, dst, off]
        return pool.at[:, dst, off].set(buf[:, rows, src], mode="drop")

    return dataclasses.replace(cache, k=put(cache.k, tmp.k), v=put(cache.v, tmp.v))
