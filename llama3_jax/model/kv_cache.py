"""The decoding cache: one preallocated buffer per batch, written in place.

All rows write the same slot each step (prompts are left-padded by the engine), so an update is one
`dynamic_update_slice` at a scalar index on a donated buffer. `segment_ids` marks which slots hold real
tokens (0 = padding or not yet written); attention masks with it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import quant
from .config import ModelConfig

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array            # (L, B, S, KV, K); int8: (L, B, S, KV, K + 4), each row's scale after it (quant.py)
    v: jax.Array            # as k
    segment_ids: jax.Array  # (B, S) int32
    index: jax.Array        # () int32: next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, quant.kv_width(cfg.head_dim, dtype))
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))

    @property
    def dtype(self):
        return self.k.dtype

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def check_write(self, n: int) -> None:
        """Raise ValueError unless n tokens fit in slots [index, index + n).

        `dynamic_update_slice` does not fail on a write past the last slot: it moves the start back so
        the update fits, overwriting earlier slots, and the logits come out wrong without a word. What
        is checked, at trace time: n against the number of slots (static shapes) always, and the start
        index when it is concrete (an eager call). Inside jit the index is traced and is not checked
        (that would need a device-to-host sync per step); the engine sizes its cache as padded prompt
        + max new tokens, so its writes always fit.
        """
        if n > self.max_len:
            raise ValueError(f"KV cache too small: writing {n} tokens into a cache of {self.max_len} slots")
        if not isinstance(self.index, jax.core.Tracer):
            start = int(self.index)
            if start + n > self.max_len:
                raise ValueError(f"KV cache too small: writing {n} tokens at slot {start} runs past its "
                                 f"{self.max_len} slots")
