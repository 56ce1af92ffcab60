"""The decoding cache: one preallocated buffer per batch, written in place.

All rows write the same slot each step (prompts are left-padded by the engine), so an update is one
`dynamic_update_slice` at a scalar index on a donated buffer. `segment_ids` marks which slots hold real
tokens (0 = padding or not yet written); attention masks with it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import ModelConfig

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array            # (L, B, S, KV, K)
    v: jax.Array            # (L, B, S, KV, K)
    segment_ids: jax.Array  # (B, S) int32
    index: jax.Array        # () int32: next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]
