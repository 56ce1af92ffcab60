"""The reference attention: plain jnp, the oracle every faster backend is tested against.

Queries are grouped as (kv_heads, group) so the repeated KV heads are never materialised. Masking uses
segment ids (0 = padding / empty cache slot) and slot indices, which covers packed training sequences,
ragged prefill and cached decoding with one rule:
    a query attends to a key iff both are in the same non-zero segment and the key's slot <= the query's;
    a key of a negative segment is a shared prefix: every non-zero segment of its row sees it.
The shared prefix is GRPO's packed update (train/grpo_batch.py): a prompt (segment -1) and its G
completions (segments 1..G) in one row, the prompt computed once instead of G times. The reference and
blockwise backends implement it (grpo_batch.SHARED_PREFIX_BACKENDS); the others never get such rows.
It materialises the float32 (B, KV, G, T, S) scores, so its memory is quadratic in the sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def mask(q_seg, k_seg, q_idx, k_idx) -> jnp.ndarray:
    """q_seg (B, T), k_seg (B, S), q_idx (T,) or (B, T), k_idx (S,) or (B, S) -> bool (B, T, S)."""
    q_idx = jnp.broadcast_to(q_idx, q_seg.shape)
    k_idx = jnp.broadcast_to(k_idx, k_seg.shape)
    same = ((q_seg[:, :, None] == k_seg[:, None, :]) | (k_seg[:, None, :] < 0)) & (q_seg[:, :, None] != 0)
    causal = k_idx[:, None, :] <= q_idx[:, :, None]
    return same & causal


def attention(q, k, v, allowed) -> jnp.ndarray:
    """q (B, T, H, K), k/v (B, S, KV, K), allowed (B, T, S) -> (B, T, H, K)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attend(q, k, v, q_seg, k_seg, q_idx, k_idx) -> jnp.ndarray:
    """The backend interface (see attention/__init__.py): q (B, T, H, K), k/v (B, S, KV, K),
    q_seg (B, T), k_seg (B, S), q_idx (T,) or (B, T), k_idx (S,) -> (B, T, H, K)."""
    return attention(q, k, v, mask(q_seg, k_seg, q_idx, k_idx))
