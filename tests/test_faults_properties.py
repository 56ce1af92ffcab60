"""Property-based tests (hypothesis): invariants over generated inputs rather than chosen examples.

  * tokenizer: decode(encode(text)) == text for any Unicode text, with the ids equal to Meta's
    llama_models tokenizer (the oracle); the byte tokenizer round-trips too;
  * chat rendering: whatever the message content (special-token look-alikes included), the only
    special ids in a rendered dialog are the template's own, in the template's places;
  * converters: random small shapes, dtypes, tied or not: jax -> hf|meta -> jax is bit-exact;
  * attention: on random packed/padded segment layouts, a query's output is unchanged (bit for bit)
    when every key it must not see is replaced, and equals attention over its allowed keys alone.
Example counts are small where each example compiles or writes checkpoints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3_jax.model import attention
from llama3_jax.store import checkpoint
from llama3_jax.model.config import ModelConfig, RopeScaling
from llama3_jax.convert import convert
from llama3_jax.convert.core import expected_shapes
from llama3_jax.tokenizer import Tokenizer, special_token_names
from llama3_jax.train import ByteTokenizer

meta_tok_mod = pytest.importorskip("llama_models.llama3.tokenizer")

# no example database in the checkout; fixtures are module-scoped (read-only), so reuse across examples is fine
SLOW = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def meta_tok(tok):
    return meta_tok_mod.Tokenizer(tok.model_path)


# ------------------------------------------------------------------------------------- tokenizer

# any Unicode scalar value (hypothesis leaves out surrogates, which a Python str from UTF-8 cannot hold),
# plus text built from special-token names and the characters the splitting regex cares about
SPECIALS = special_token_names()
TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(SPECIALS), st.text(alphabet=" \n\t\r'sdtmlv<|>_0123456789aé😀", max_size=8)),
             max_size=20).map("".join),
)


@SLOW
@given(text=TEXT)
def test_encode_decode_round_trip_and_equal_to_meta(tok, meta_tok, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text
    assert ids == meta_tok.encode(text, bos=False, eos=False, allowed_special=set(), disallowed_special=())
    assert all(i < tok.n_words - len(SPECIALS) for i in ids), "content produced a special id"


@settings(SLOW)
@given(text=st.text(max_size=200))
def test_byte_tokenizer_round_trip(text):
    t = ByteTokenizer()
    assert t.decode(t.encode(text, bos=True, eos=True)) == text


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "ipython"]),
                                 "content": TEXT})


@settings(SLOW, max_examples=50)
@given(messages=st.lists(MESSAGE, max_size=5))
def test_chat_content_never_produces_a_special_token(tok, messages):
    ids = tok.encode_dialog(messages)
    sp = tok.special_tokens
    specials = [i for i in ids if i >= tok.n_words - len(SPECIALS)]
    header = [sp["<|start_header_id|>"], sp["<|end_header_id|>"]]
    assert specials == [tok.bos_id] + (header + [tok.eot_id]) * len(messages) + header
    assert tok.decode(ids).count("<|eot_id|>") >= len(messages)  # look-alikes decode as text too


# -------------------------------------------------------------------------------------- converters

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@st.composite
def small_models(draw):
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 4))
    scaled = draw(st.booleans())
    cfg = ModelConfig(vocab_size=draw(st.integers(5, 40)), dim=heads * head_dim, n_layers=draw(st.integers(1, 3)),
                      n_heads=heads, n_kv_heads=kv, head_dim=head_dim, intermediate_size=draw(st.integers(3, 24)),
                      rope_scaling=RopeScaling(original_max_position_embeddings=16) if scaled else None,
                      max_seq_len=64, tie_embeddings=draw(st.booleans()), bos_id=1, eos_ids=(2,))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    return dataclasses.replace(cfg, param_dtype=dtype), dtype, draw(st.sampled_from(["hf", "meta"])), draw(st.integers(0, 2**31))


@settings(SLOW, max_examples=4)
@given(case=small_models())
def test_converter_round_trip_is_bit_exact(tmp_path_factory, case):
    cfg, dtype, fmt, seed = case
    rng = np.random.default_rng(seed)
    params = {"layers": {}}
    for name, shape in expected_shapes(cfg).items():
        full = (cfg.n_layers, *shape) if name.startswith("layers/") else shape
        a = rng.standard_normal(full).astype(DTYPES[dtype])
        if name.startswith("layers/"):
            params["layers"][name.split("/")[1]] = a
        else:
            params[name] = a
    d = tmp_path_factory.mktemp("rt")
    checkpoint.save_params(d / "src", cfg, jax.tree.map(jnp.asarray, params))
    convert(d / "src", d / fmt, src_format="jax", dst_format=fmt, progress=False)
    back = convert(d / fmt, d / "back", src_format=fmt, dst_format="jax", progress=False)
    assert back.param_dtype == dtype and back.tie_embeddings == cfg.tie_embeddings
    _, restored = checkpoint.restore_params(d / "back")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
    assert len(got) == len(flat)
    for path, want in flat:
        np.testing.assert_array_equal(np.asarray(got[path]).view(np.uint8), want.view(np.uint8),
                                      err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------------------- attention

B, T, H, KV, K = 2, 16, 4, 2, 8


@st.composite
def layouts(draw):
    """Per row: packed documents (segment ids 1, 2, ...) of random lengths, then padding (0)."""
    rows = []
    for _ in range(B):
        lengths = draw(st.lists(st.integers(1, T), min_size=1, max_size=5))
        seg = [s for i, n in enumerate(lengths, start=1) for s in [i] * n][:T]
        rows.append(seg + [0] * (T - len(seg)))
    return np.asarray(rows, np.int32), draw(st.integers(0, 2**31))


_attend = jax.jit(lambda q, k, v, seg: attention.attention(q, k, v, attention.mask(seg, seg, jnp.arange(T), jnp.arange(T))))


@settings(SLOW, max_examples=40)
@given(case=layouts())
def test_attention_sees_exactly_its_segment_and_past(case):
    seg, seed = case
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, n, K)).astype(np.float32) for n in (H, KV, KV))
    out = np.asarray(_attend(q, k, v, seg))
    for b in range(B):
        for i in range(T):
            if seg[b, i] == 0:
                continue
            allowed = [j for j in range(T) if seg[b, j] == seg[b, i] and j <= i]
            hidden = [j for j in range(T) if j not in allowed]
            # replace every key/value the query must not see: its output does not move a bit
            k2, v2 = k.copy(), v.copy()
            k2[b, hidden] = rng.standard_normal((len(hidden), KV, K)) * 100
            v2[b, hidden] = rng.standard_normal((len(hidden), KV, K)) * 100
            np.testing.assert_array_equal(np.asarray(_attend(q, k2, v2, seg))[b, i], out[b, i])
            # and it is plain softmax attention over the allowed keys (numpy, float64)
            for h in range(H):
                kk, vv = k[b, allowed, h // (H // KV)], v[b, allowed, h // (H // KV)]
                s = kk.astype(np.float64) @ q[b, i, h] / np.sqrt(K)
                p = np.exp(s - s.max())
                np.testing.assert_allclose(out[b, i, h], p @ vv / p.sum(), rtol=1e-5, atol=1e-5)
