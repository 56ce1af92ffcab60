"""The chunked loss equals the whole one (value and gradients), and its chunks never hold the whole
(tokens, vocab) logits, forward or backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.train.losses import chunked_lm_loss, lm_loss, resolve_chunk
from llama3_jax.model.llama import output_logits

B, T, D, V = 2, 37, 24, 211  # T not a multiple of the chunks


def data(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(ks[0], (B, T, D))
    w = jax.random.normal(ks[1], (D, V)) * 0.3
    targets = jax.random.randint(ks[2], (B, T), 0, V)
    mask = (jax.random.uniform(ks[3], (B, T)) > 0.2).astype(jnp.int32)
    return hidden, w, targets, mask


def whole(hidden, w, targets, mask):
    return lm_loss(output_logits(hidden, w), targets, mask)


@pytest.mark.parametrize("chunk", [0, 5, 16, 64])
def test_chunked_loss_and_gradients_equal_the_whole_loss(chunk):
    hidden, w, targets, mask = data()
    (s0, n0), g0 = jax.jit(jax.value_and_grad(whole, argnums=(0, 1), has_aux=True))(hidden, w, targets, mask)
    fn = jax.value_and_grad(lambda h, w: chunked_lm_loss(h, w, targets, mask, chunk), argnums=(0, 1), has_aux=True)
    (s1, n1), g1 = jax.jit(fn)(hidden, w)
    assert float(n1) == float(n0) == float(mask.sum())
    np.testing.assert_allclose(s1, s0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_holds_the_whole_logits():
    """Compiled temporaries of value+grad at T = 4096, V = 4096, chunk 256: well under the float32
    (T, V) logits (64 MiB), which the whole loss needs at least once."""
    t, v, d = 4096, 4096, 32
    args = (jax.ShapeDtypeStruct((1, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.int32))
    logits_bytes = t * v * 4

    def temp(chunk):
        f = jax.grad(lambda h, w, tg, m: chunked_lm_loss(h, w, tg, m, chunk)[0], argnums=(0, 1))
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp(0) >= logits_bytes
    assert temp(256) < logits_bytes / 4


def test_auto_chunk_only_when_the_logits_are_large():
    assert resolve_chunk(-1, 4, 64, 128256) == 0  # the tiny default job: 131 MB of logits, one piece
    chunk = resolve_chunk(-1, 1, 8192, 128256)
    assert 0 < chunk < 8192 and chunk * 128256 * 4 <= 512 * 2**20
    assert resolve_chunk(0, 1, 8192, 128256) == 0 and resolve_chunk(100, 1, 8192, 128256) == 100
