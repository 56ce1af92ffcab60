"""Next-token cross-entropy, whole or in chunks of the sequence (so the float32 logits never exist at once).

Both return (sum of token losses, number of counted tokens), summed rather than averaged so that
microbatches and shards add up exactly; objectives divide once.

`lm_loss` takes logits (B, T, V). `chunked_lm_loss` takes the final-norm hidden states (B, T, D) and
the output projection (D, V) and walks the sequence `chunk` positions at a time in a `lax.scan`: each
chunk's logits -> log-sum-exp -> picked logit -> masked sum, under `jax.checkpoint`, so the backward
recomputes a chunk's logits instead of keeping them. Peak memory for the loss is B * chunk * V float32
instead of B * T * V (Llama 3's 128,256-token vocabulary: 4.2 GB per 8,192-token sequence), for one
extra output matmul in the backward. The scan runs along the sequence, not over flattened tokens, so
a batch sharded over devices stays sharded: each device computes its own rows' chunks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..model.llama import output_logits
from ..parallel.sharding import constrain

# loss_chunk = -1 ("auto") chunks when one device's logits (its rows, its vocabulary shard) would pass
# this many bytes
AUTO_LOGITS_BYTES = 512 * 2**20


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (B, T, V), targets (B, T) int, loss_mask (B, T) (0 for padding and for the last token
    of each document) -> (sum of token losses, number of counted tokens), both float32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def chunked_lm_loss(hidden: jax.Array, out_weight: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                    chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """`lm_loss(output_logits(hidden, out_weight), targets, loss_mask)` computed `chunk` positions of every row
    at a time; chunk <= 0 or >= T: in one piece (no recomputation). T need not be a multiple of chunk."""
    b, t, _ = hidden.shape
    if chunk <= 0 or chunk >= t:
        return lm_loss(output_logits(hidden, out_weight), targets, loss_mask)
    n = math.ceil(t / chunk)

    def blocks(x):  # (B, T, ...) -> (n, B, chunk, ...), the tail padded with mask 0
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, n * chunk - t)
        x = jnp.pad(x, pad)
        return constrain(x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1),
                         (None, "batch", "seq", "act_embed")[: x.ndim + 1])

    @jax.checkpoint
    def one(total, xs):
        h, tgt, m = xs
        s, c = lm_loss(output_logits(h, out_weight), tgt, m)
        return (total[0] + s, total[1] + c), None

    (loss_sum, count), _ = jax.lax.scan(one, (jnp.float32(0), jnp.float32(0)),
                                        (blocks(hidden), blocks(targets), blocks(loss_mask)))
    return loss_sum, count


def resolve_chunk(loss_chunk: int, batch: int, seq_len: int, vocab: int) -> int:
    """The `loss_chunk` key -> positions per chunk (0 = one piece). -1 (auto): one piece while the
    float32 logits of `batch` rows x `vocab` (one device's share: train/step.py passes it) stay under
    AUTO_LOGITS_BYTES, else the largest power of two that does."""
    if loss_chunk >= 0:
        return loss_chunk
    if batch * seq_len * vocab * 4 <= AUTO_LOGITS_BYTES:
        return 0
    fit = max(1, AUTO_LOGITS_BYTES // (batch * vocab * 4))
    return 2 ** int(math.log2(fit))
