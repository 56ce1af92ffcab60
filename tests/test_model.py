"""Logits parity with transformers (the oracle) on tiny random models, and the cache interface."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_llama
from llama3_jax.store import checkpoint
from llama3_jax.convert import convert
from llama3_jax.model.kv_cache import KVCache

CASES = {
    # name: (make_hf_llama kwargs, model kwargs)
    "mha_scaled": (dict(heads=4, kv_heads=4, scaling=True), dict(scan_layers=True)),
    "gqa2_tied_unscaled": (dict(heads=4, kv_heads=2, scaling=False, tie=True), dict(scan_layers=False)),
    "gqa4_tied_scaled": (dict(heads=8, kv_heads=2, head_dim=8, dim=48, scaling=True, tie=True, layers=3),
                         dict(scan_layers=True)),
}


def _converted(tmp_path, **kw):
    hf = make_hf_llama(tmp_path / "hf", **kw)
    convert(tmp_path / "hf", tmp_path / "jax", src_format="hf", dst_format="jax", progress=False)
    return hf, tmp_path / "jax"


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf_kw, model_kw = CASES[case]
    hf, ckpt = _converted(tmp_path, **hf_kw)
    model = checkpoint.load_model(ckpt, dtype="float32", **model_kw)
    rng = np.random.default_rng(0)
    b, t = 3, 45  # positions beyond original_max_position_embeddings exercise the scaled frequencies
    tokens = rng.integers(0, 211, (b, t))
    lengths = np.array([45, 30, 7])
    valid = np.arange(t)[None, :] < lengths[:, None]  # right padding, masked by segment 0
    seg = valid.astype(np.int32)
    pos = np.broadcast_to(np.arange(t), (b, t))
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
    ours = np.asarray(logits)
    scale = np.abs(ref[valid]).max()
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5 * max(scale, 1.0), rtol=0)


def test_cached_prefill_and_decode_equal_full_forward(tmp_path):
    _, ckpt = _converted(tmp_path, heads=4, kv_heads=2)
    model = checkpoint.load_model(ckpt, dtype="float32")
    cfg = model.cfg
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 211, (2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    full, _ = model(tokens, pos, seg)
    cache = KVCache.init(cfg, 2, 16, jnp.float32)
    first, cache = model(tokens[:, :9], pos[:, :9], seg[:, :9], cache=cache)
    steps = [first]
    for i in range(9, 12):
        step, cache = model(tokens[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1], cache=cache)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-5)
    assert int(cache.index) == 12


def test_packed_documents_do_not_attend_across(tmp_path):
    _, ckpt = _converted(tmp_path, heads=4, kv_heads=2)
    model = checkpoint.load_model(ckpt, dtype="float32")
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 211, 7), rng.integers(0, 211, 5)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 7 + [2] * 5])
    pos = np.array([list(range(7)) + list(range(5))])
    logits, _ = model(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
    alone_a, _ = model(jnp.asarray(a[None]), jnp.asarray(np.arange(7)[None]), jnp.ones((1, 7), jnp.int32))
    alone_b, _ = model(jnp.asarray(b[None]), jnp.asarray(np.arange(5)[None]), jnp.ones((1, 5), jnp.int32))
    np.testing.assert_allclose(np.asarray(logits)[0, :7], np.asarray(alone_a)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[0, 7:], np.asarray(alone_b)[0], atol=1e-5)


def test_param_dtype_and_compute_dtype_are_separate(tmp_path):
    _, ckpt = _converted(tmp_path)
    model = checkpoint.load_model(ckpt, dtype="bfloat16")
    assert model.embed[...].dtype == jnp.float32
    cfg = dataclasses.replace(model.cfg)
    assert cfg.dtype == "bfloat16"
    logits, _ = model(jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_a_cache_write_past_the_last_slot_is_refused():
    """dynamic_update_slice clamps a write past the end (wrong logits, no error): the model refuses it
    when the shapes say so (jit) or the start index is known (an eager call)."""
    import jax
    from flax import nnx
    from llama3_jax.model.config import ModelConfig
    from llama3_jax.model.llama import abstract_model

    cfg = ModelConfig(vocab_size=31, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                      intermediate_size=32, max_seq_len=64, dtype="float32")
    model = abstract_model(cfg)  # weights from numpy: random init would compile once per shape
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype)),
                                   nnx.state(model, nnx.Param)))

    def call(model, t, cache):
        tokens = jnp.ones((1, t), jnp.int32)
        return model(tokens, jnp.arange(t)[None] + cache.index, tokens, cache=cache)

    cache = KVCache.init(cfg, 1, 8, jnp.float32)
    jitted = nnx.jit(call, static_argnums=1)
    with pytest.raises(ValueError, match="writing 9 tokens into a cache of 8 slots"):
        jitted(model, 9, cache)  # traced index: the static length is checked
    _, full = jitted(model, 8, cache)  # exactly fills the cache
    assert int(full.index) == 8
    with pytest.raises(ValueError, match="writing 3 tokens at slot 6 runs past its 8 slots"):
        call(model, 3, dataclasses.replace(cache, index=jnp.int32(6)))  # eager: the index is concrete
