"""The paged decoding cache: fixed-size pages in one pool, a page table per decode slot.

Why: the contiguous cache (kv_cache.py) gives every slot as many cache slots as the longest row needs,
so memory follows B x the longest row, and one long prompt widens every slot. Here a row's token at
position t lives in page table[r, t // page] at offset t % page; the host (scheduler.PagePool) hands a
row ceil((prompt + max_new_tokens) / page) pages when it is admitted (only while that many are free) and
takes them back when it finishes. Memory then follows the rows' actual lengths and many short rows share
one big pool.

Page 0 is never handed out: free slots' table rows point at it, so their (ignored) decode steps write
there and never into a page another row owns.

K and V share one pool array in one of two layouts, chosen by the attention that reads it:
  split        (L, 2, N, G, KV, W): [:, 0] the K pages, [:, 1] the V pages. XLA's page gather
               (attention/decode.py `attend_paged`, every platform but TPU) reads K and V of a page as
               two contiguous blocks; from the interleaved layout the same gather ran 1.2-1.6x slower on
               CPU (one whole-page gather, then two strided copies).
  interleaved  (L, N, G, 2 KV, W): head 2h is K of kv head h, 2h + 1 its V: the layout
               `jax.experimental.pallas.ops.tpu.ragged_paged_attention` reads (attention/ragged_paged.py),
               so the TPU kernel takes the pool as it is, with no per-step copy.
Either way a mesh splits the kv heads over `tensor` (`axes`; interleaved, an even split keeps each
head's K and V on one device).

Decode steps write each row's new k/v at (table[r, pos_r // page], pos_r % page) (`write`, a scatter);
attention reads a row's pages through its table (attention/decode.py `attend_paged`). Prompts are
prefilled into a contiguous temporary cache as for the contiguous layout, and `place` copies their
filled slots into the rows' pages. K and V may be int8 (quant.py: the scale rides in the row's last
4 bytes) exactly as in the contiguous cache.
Shapes: L layers, N pages (page 0 included), G page size, KV kv heads, W = kv_width, B slots, M table width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import quant
from .config import ModelConfig
from .kv_cache import KVCache

# logical axes of the pool (sharding.py rules): kv heads over `tensor` like the contiguous cache's;
# pages are shared by all rows, so they are not split over the batch axes
SPLIT_AXES = ("layers", None, None, None, "kv_heads", "head_dim")
INTERLEAVED_AXES = ("layers", None, None, "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    kv: jax.Array     # split (L, 2, N, G, KV, W) or interleaved (L, N, G, 2 KV, W)
    table: jax.Array  # (B, M) int32: page of each row's j-th block of G positions (0: none)
    interleaved: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def init(cls, cfg: ModelConfig, pages: int, page_size: int, batch: int, table_width: int,
             dtype=jnp.bfloat16, interleaved: bool = False) -> "PagedKVCache":
        kv, w = cfg.n_kv_heads, quant.kv_width(cfg.head_dim, dtype)
        shape = (cfg.n_layers, pages, page_size, 2 * kv, w) if interleaved else \
            (cfg.n_layers, 2, pages, page_size, kv, w)
        return cls(kv=jnp.zeros(shape, dtype), table=jnp.zeros((batch, table_width), jnp.int32),
                   interleaved=interleaved)

    @property
    def dtype(self):
        return self.kv.dtype

    @property
    def page_size(self) -> int:
        return self.kv.shape[2 if self.interleaved else 3]

    @property
    def n_pages(self) -> int:
        return self.kv.shape[1 if self.interleaved else 2]

    @property
    def axes(self) -> tuple:
        return INTERLEAVED_AXES if self.interleaved else SPLIT_AXES


def interleave(k, v):
    """k, v (..., KV, W) -> (..., 2 KV, W) with K of head h at 2h and its V at 2h + 1."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def write(pool, layer, k, v, *, table, positions, interleaved: bool = False):
    """k, v (B, 1, KV, K) of the token at positions (B,) into layer `layer` of the pool."""
    g = pool.shape[2 if interleaved else 3]
    blk = jnp.minimum(positions // g, table.shape[1] - 1)
    page = jnp.take_along_axis(table, blk[:, None], axis=1)[:, 0]
    off = positions % g
    k, v = quant.kv_store(k[:, 0], pool.dtype), quant.kv_store(v[:, 0], pool.dtype)
    if interleaved:
        return pool.at[layer, page, off].set(interleave(k, v))
    return pool.at[layer, 0, page, off].set(k).at[layer, 1, page, off].set(v)


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
    dst = jnp.where(t < lengths[:, None], dst, cache.n_pages)     # out of range: dropped
    src = jnp.clip(p - lengths[:, None] + t, 0, p - 1)            # (n, P)
    rows = jnp.arange(n)[:, None]
    off = jnp.broadcast_to(t % g, (n, p))
    k, v = tmp.k[:, rows, src], tmp.v[:, rows, src]               # (L, n, P, KV, W)
    if cache.interleaved:
        kv = cache.kv.at[:, dst, off].set(interleave(k, v), mode="drop")
    else:
        kv = cache.kv.at[:, 0, dst, off].set(k, mode="drop").at[:, 1, dst, off].set(v, mode="drop")
    return dataclasses.replace(cache, kv=kv)
