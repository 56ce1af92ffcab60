"""Attention backends equal the reference (outputs and gradients), and the switch picks and refuses
as documented. Shapes: GQA ratios 1/4/8, packed documents, left padding (segment 0), T not a multiple
of the block size. Splash runs in Pallas interpret mode (the kernel's own code, on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.model import attention
from llama3_jax.model.attention import blockwise, reference

T, D, H = 40, 16, 8


def inputs(kv: int, dtype=jnp.float32, b: int = 2, t: int = T, seed: int = 0):
    """Row 0: three packed documents then right padding; row 1: left padding then one document."""
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, H, D), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, D), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, D), dtype)
    seg = np.zeros((b, t), np.int32)
    seg[0, : t // 3], seg[0, t // 3: t - 7], seg[0, t - 7: t - 3] = 1, 2, 3
    seg[1, 5:] = 1
    cot = jax.random.normal(ks[3], (b, t, H, D), jnp.float32) * (seg != 0)[..., None, None]
    return q, k, v, jnp.asarray(seg), cot


def loss_of(fn, seg, cot):
    """A scalar whose gradient is the VJP with cotangent `cot` (zero on padding rows, which no real
    token reads and whose values the backends need not agree on)."""
    idx = jnp.arange(seg.shape[1])
    return lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg, idx, idx).astype(jnp.float32) * cot)


def check_equal(fn, kv, dtype, tol):
    q, k, v, seg, cot = inputs(kv, dtype)
    idx = jnp.arange(T)
    valid = np.asarray(seg != 0)[..., None, None]
    ref = jax.jit(reference.attend)(q, k, v, seg, seg, idx, idx).astype(jnp.float32)
    out = jax.jit(fn)(q, k, v, seg, seg, idx, idx).astype(jnp.float32)
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=tol, rtol=tol)
    g_ref = jax.jit(jax.grad(loss_of(reference.attend, seg, cot), argnums=(0, 1, 2)))(q, k, v)
    g_new = jax.jit(jax.grad(loss_of(fn, seg, cot), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_new, g_ref):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * 4, rtol=tol,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("kv", [8, 2, 1])  # GQA ratios 1, 4, 8
def test_blockwise_equals_reference_float32(kv):
    # blocks of 16 and 8 over T = 40: ragged last blocks, and many block pairs skipped as fully masked
    check_equal(lambda *a: blockwise.attend(*a, block_q=16, block_k=8), kv, jnp.float32, 1e-5)


def test_blockwise_equals_reference_bfloat16():
    check_equal(lambda *a: blockwise.attend(*a, block_q=16, block_k=16), 2, jnp.bfloat16, 2e-2)


def test_blockwise_with_a_cache_shape_equals_reference():
    """Queries at slots [index, index + T) against a longer cache (S > T), as in chunked prefill."""
    q, k, v, seg, _ = inputs(2, t=24)
    kc = jnp.concatenate([k, k[:, :16]], axis=1)
    vc = jnp.concatenate([v, v[:, :16]], axis=1)
    k_seg = jnp.concatenate([seg, seg[:, :16]], axis=1)
    q_idx, k_idx = 8 + jnp.arange(24), jnp.arange(40)
    q_seg = k_seg[:, 8:32]
    valid = np.asarray(q_seg != 0)[..., None, None]
    ref = jax.jit(reference.attend)(q, kc, vc, q_seg, k_seg, q_idx, k_idx)
    out = jax.jit(lambda *a: blockwise.attend(*a, block_q=8, block_k=16))(q, kc, vc, q_seg, k_seg, q_idx, k_idx)
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=1e-5)


@pytest.mark.parametrize("kv", [8, 2, 1])
def test_splash_interpret_equals_reference_float32(kv):
    check_equal(attention.get("splash_interpret"), kv, jnp.float32, 1e-5)


def test_splash_interpret_equals_reference_bfloat16():
    check_equal(attention.get("splash_interpret"), 2, jnp.bfloat16, 2e-2)


def test_switch_resolves_and_refuses():
    assert attention.resolve("auto", "cpu", 512) == "reference"
    assert attention.resolve("auto", "cpu", attention.BLOCKWISE_MIN_LEN) == "blockwise"
    assert attention.resolve("auto", "tpu", 512) == "splash"
    assert attention.resolve("splash", "cpu", 64) == "splash_interpret"
    assert attention.resolve("blockwise", "tpu", 64) == "blockwise"
    with pytest.raises(ValueError, match="attention=cudnn needs an NVIDIA GPU"):
        attention.resolve("cudnn", "cpu", 64)
    with pytest.raises(ValueError, match="attention must be one of auto, reference, blockwise, splash, cudnn"):
        attention.resolve("flash", "cpu", 64)


def test_cudnn_segments_become_packed_runs():
    """The packed-layout offsets/lengths cuDNN gets describe exactly the non-zero segment runs."""
    from llama3_jax.model.attention.cudnn import _runs
    _, _, _, seg, _ = inputs(2)
    offsets, lengths = map(np.asarray, _runs(seg))
    for row, off, ln in zip(np.asarray(seg), offsets, lengths):
        runs = [(int(o), int(n)) for o, n in zip(off, ln) if o >= 0]
        rebuilt = np.zeros_like(row)
        for i, (o, n) in enumerate(runs):
            rebuilt[o: o + n] = row[o]
            assert np.all(row[o: o + n] == row[o]) and row[o] != 0
        assert np.array_equal(rebuilt, row) and np.all(off[len(runs):] == -1)


def test_ragged_and_window_decode_equal_reference_on_a_ragged_cache():
    """One query per row against a stacked (L, B, S, KV, K) cache whose rows are filled to different
    lengths ending at the write slot (the engines' layout), plus a row with a hole in its segments and
    a row filled from slot 0: equal to the reference over all S slots (blocks straddle row starts, the
    work list spans several loop steps)."""
    from llama3_jax.model.attention import decode
    n_layers, b, s, kv, index = 3, 5, 48, 2, 37
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (b, 1, H, D), jnp.float32)
    kc = jax.random.normal(ks[1], (n_layers, b, s, kv, D), jnp.float32)
    vc = jax.random.normal(ks[2], (n_layers, b, s, kv, D), jnp.float32)
    seg = np.zeros((b, s), np.int32)
    for r, n in enumerate([1, 9, 20, 38, 30]):  # row r holds n tokens ending at slot index
        seg[r, index + 1 - n: index + 1] = 1
    seg[4, 12:15] = 0  # a hole: masked, not skipped
    seg[2, 40:] = 1    # past the query's slot: masked by the causal rule
    seg = jnp.asarray(seg)
    q_seg = jnp.ones((b, 1), jnp.int32)
    layer, block = 2, 8
    want = reference.attend(q, kc[layer], vc[layer], q_seg, seg, jnp.array([index]), jnp.arange(s))
    args = (q, kc, vc, jnp.int32(layer), q_seg, seg, jnp.int32(index))
    got = jax.jit(lambda *a: decode.attend(*a, block=block, chunk=3))(*args)  # 15 items: 5 loop steps
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg="ragged")
    got = jax.jit(lambda *a: decode.attend_window(*a, block=20))(*args)  # 48 slots: the last block overlaps
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg="window")
    first, count = decode.work_list(seg, jnp.int32(index), 8)
    assert count.tolist() == [1, 2, 3, 5, 4]  # only the blocks a row has filled are visited
    assert decode.block_for(48) == 16 and decode.block_for(272) == 16 and decode.block_for(2048) == 64


def test_shared_prefix_row_equals_each_completion_alone_in_reference_and_blockwise():
    """A negative segment is a shared prefix (train/grpo_batch.py's packed GRPO rows): one row [prompt
    (segment -1, left padding 0) | completion 1 | completion 2] gives at each completion's slots what a row
    [prompt | that completion] alone gives, forward and backward (q, k, v), in the reference and in
    blockwise (small blocks: pairs skipped across completions, but never the prompt's)."""
    p, c, pad = 9, 7, 3
    t = pad + p + 2 * c
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (1, t, H, D))
    k = jax.random.normal(ks[1], (1, t, 2, D))
    v = jax.random.normal(ks[2], (1, t, 2, D))
    seg = np.zeros((1, t), np.int32)
    seg[0, pad:pad + p], seg[0, pad + p:pad + p + c], seg[0, pad + p + c:] = -1, 1, 2
    seg = jnp.asarray(seg)
    idx = jnp.arange(t)
    cot = jax.random.normal(ks[3], (1, t, H, D)) * (seg != 0)[..., None, None]
    for fn in (reference.attend, lambda *a: blockwise.attend(*a, block_q=8, block_k=4)):
        packed = fn(q, k, v, seg, seg, idx, idx)
        g_packed = jax.grad(loss_of(fn, seg, cot), argnums=(0, 1, 2))(q, k, v)
        for j, lo in enumerate((pad + p, pad + p + c)):  # completion j alone after the prompt
            keep = np.r_[pad:pad + p, lo:lo + c]
            alone_seg = jnp.ones((1, len(keep)), jnp.int32)
            i2 = jnp.arange(len(keep))
            sub = lambda x: x[:, keep]  # noqa: E731
            alone = fn(sub(q), sub(k), sub(v), alone_seg, alone_seg, i2, i2)
            np.testing.assert_allclose(packed[:, lo:lo + c], alone[:, p:], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(packed[:, pad:pad + p], alone[:, :p], atol=1e-5, rtol=1e-5)
        # the prompt's keys and values collect the gradient of every completion that reads them
        g_alone = [jnp.zeros_like(x) for x in (q, k, v)]
        for j, lo in enumerate((pad + p, pad + p + c)):
            keep = np.r_[pad:pad + p, lo:lo + c]
            sub_cot = cot[:, keep].at[:, :p].multiply(1.0 if j == 0 else 0.0)  # the prompt's own rows once
            alone_seg = jnp.ones((1, len(keep)), jnp.int32)
            i2 = jnp.arange(len(keep))
            g = jax.grad(lambda a, b, c_: jnp.sum(fn(a, b, c_, alone_seg, alone_seg, i2, i2) * sub_cot),
                         argnums=(0, 1, 2))(q[:, keep], k[:, keep], v[:, keep])
            g_alone = [acc.at[:, keep].add(x) for acc, x in zip(g_alone, g)]
        for name, a, b in zip("qkv", g_packed, g_alone):
            np.testing.assert_allclose(np.asarray(a)[:, pad:], np.asarray(b)[:, pad:], atol=1e-4, rtol=1e-4,
                                       err_msg=f"d{name}")
