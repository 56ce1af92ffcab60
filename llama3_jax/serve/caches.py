"""KV cache factories: a new contiguous cache or page pool, born on the device with its final layout.

Why a jitted init with out_shardings: the cache is the largest thing decoding allocates, so it must
never exist unsharded on one device first; and without a mesh it is committed to the first device, like
the cache a donated call hands back, so the second call of a program sees the same input sharding and
does not compile again. The Generator reuses what these return while the shape fits (engine.py).
"""

from __future__ import annotations

import functools

import jax

from ..model import attention as attn
from ..model import quant
from ..model.config import ModelConfig
from ..model.kv_cache import CACHE_AXES, KVCache
from ..model.paged_cache import PagedKVCache
from ..parallel.sharding import named_sharding


def contiguous(cfg: ModelConfig, kv_dtype, mesh, batch: int, slots: int) -> KVCache:
    """An empty (L, batch, slots, KV, K) cache sharded by the logical rules (`batch`, `kv_heads`)."""
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, quant.kv_width(cfg.head_dim, kv_dtype))
    init = functools.partial(KVCache.init, cfg, batch, slots, kv_dtype)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        out = KVCache(k=one, v=one, segment_ids=one, index=one)
    else:
        kv = named_sharding(mesh, CACHE_AXES, shape)
        out = KVCache(k=kv, v=kv, segment_ids=named_sharding(mesh, ("batch", "cache_seq"), shape[1:3]),
                      index=named_sharding(mesh, (), ()))
    return jax.jit(init, out_shardings=out)()


def paged(cfg: ModelConfig, kv_dtype, mesh, kv_pages: int, page_size: int, paged_attention: str, batch: int,
          table_width: int) -> PagedKVCache:
    """An empty pool of kv_pages + 1 pages (page 0 is never handed out) with a (batch, table_width)
    page table, in the layout `paged_attention` reads (interleaved K/V or not)."""
    interleaved = attn.reads_interleaved(paged_attention)
    init = functools.partial(PagedKVCache.init, cfg, kv_pages + 1, page_size, batch, table_width, kv_dtype,
                             interleaved=interleaved)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        out = PagedKVCache(kv=one, table=one, interleaved=interleaved)
    else:  # kv heads over `tensor` (PagedKVCache.axes); the host-owned table replicated
        abstract = jax.eval_shape(init)
        out = PagedKVCache(kv=named_sharding(mesh, abstract.axes, abstract.kv.shape),
                           table=named_sharding(mesh, (None, None), (batch, table_width)),
                           interleaved=interleaved)
    return jax.jit(init, out_shardings=out)()
