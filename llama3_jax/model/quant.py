"""int8 weights (weight-only, per output channel) and the int8 KV cache.

Why: decoding at small batch reads every weight once per token, so its speed is the weight bytes; int8
reads a quarter of float32's (half of bfloat16's). Activations, norms, attention and logits stay in the
compute dtype; only the matrices are int8.

Weights: symmetric, one float32 scale per output channel, s = max |w| over the channel's inputs / 127,
q = round(w / s) in [-127, 127], w ~ q * s (error <= s / 2 per weight). A projection is a matmul over the
int8 matrix with the scale applied to its OUTPUT, (x @ q) * s, so the float weight never exists:
    layers/<wq wk wv wo w_gate w_up w_down>   int8, same shape as the float weight
    layers/<name>_scale                       float32, the output dims (wq: (layers, q_heads, head_dim))
    embed (vocab, embed) int8 + embed_scale (vocab,): one scale per row, which is the per-output-channel
        scale of the tied output projection (Llama 3.2), and the lookup is q[token] * s[token]
    lm_head (embed, vocab) int8 + lm_head_scale (vocab,)
Norm weights stay float. model.quantize_params turns a float checkpoint's params into this layout (at
load, or in `convert --quantize int8`); ModelConfig.quantization = "int8" says a model's params are in it.

How the matmul runs (`matmul`): the reference is `dot(x, q.astype(x.dtype)) * s`. TPU and GPU fuse
that convert into the dot (1 byte read per weight); XLA:CPU does not: it writes a float copy of the
whole matrix every step (slower than float32). On CPU we therefore run an int8 x int8 -> int32 dot,
which XLA:CPU hands to YNNPACK reading the weight as int8: the activations are carried as two int8
"digits" per token, x ~ a1 q1 + a2 q2 with a1 = max|x| / 127 and a2 = a1 / 254, stacked on the token axis
so the weight is still read once. Its error against the reference is <= a1 / 508 per activation
(~1.5e-5 of the token's largest activation), far below the weights' own int8 error; tests hold both
paths to the reference. (A batch of ONE row is not routed to YNNPACK by XLA:CPU; the two digits make
every dot at least two rows.)

KV cache (`kv_store` / `kv_load`, called where the model writes and reads the cache): int8 with one
float32 scale per (position, kv head), max |x| / 127 over head_dim. The scale's 4 bytes are stored
after the head_dim int8 values (bitcast), so the cache stays ONE array per K and V, of width
head_dim + 4: every slot operation (roll, pad, slice, in-place update) is unchanged, and a zeroed slot
reads back as zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8 = "int8"
QUANTIZATIONS = (INT8,)
QMAX = 127.0
SCALE_BYTES = 4  # a float32 scale stored as 4 int8 after each cache row


def check(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or none); got {quantization!r}")


def scale_name(name: str) -> str:
    return f"{name}_scale"


# ------------------------------------------------------------------------------------------ weights


def quantize(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """w float -> (q int8 of w's shape, float32 scale over the dims not in `axes`); w ~ q * scale."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)  # an all-zero channel: any scale, q = 0
    q = jnp.clip(jnp.round(wf / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, jnp.squeeze(scale, axes)


def dequantize(q: jax.Array, scale: jax.Array, axes: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The inverse of `quantize` (up to its rounding)."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axes)).astype(dtype)


def _digits(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (n, k) float -> int8 (2n, k) digits and float32 (2n, 1) row scales: x ~ d[:n] a[:n] + d[n:] a[n:]."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1, keepdims=True)
    a1 = jnp.where(amax > 0, amax / QMAX, 1.0)
    q1 = jnp.round(xf / a1)
    a2 = a1 / (2 * QMAX)  # the remainder is within +-a1/2
    q2 = jnp.clip(jnp.round((xf - q1 * a1) / a2), -QMAX, QMAX)
    return jnp.concatenate([q1, q2]).astype(jnp.int8), jnp.concatenate([a1, a2])


def use_int8_dot() -> bool:
    """The int8 x int8 dot (module docstring) where the default backend is XLA:CPU."""
    return jax.default_backend() == "cpu"


def matmul(x: jax.Array, q: jax.Array, scale: jax.Array, contract: int = 0, out_dtype=None,
           int8_dot: bool | None = None) -> jax.Array:
    """x (n, k) float @ the dequantised int8 matrix q -> (n, m) in `out_dtype` (default x's).

    q is (k, m) (contract=0) or (m, k) (contract=1: the tied embedding as output projection); scale (m,).
    `int8_dot` None: `use_int8_dot()`; the reference path otherwise. Accumulation is float32 / int32.
    """
    out_dtype = out_dtype or x.dtype
    dims = (((1,), (contract,)), ((), ()))
    if int8_dot is None:
        int8_dot = use_int8_dot()
    if int8_dot:
        d, a = _digits(x)
        acc = jax.lax.dot_general(d, q, dims, preferred_element_type=jnp.int32).astype(jnp.float32) * a
        n = x.shape[0]
        y = acc[:n] + acc[n:]
    else:
        y = jax.lax.dot_general(x, q.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    return (y * scale.astype(jnp.float32)).astype(out_dtype)


def project(x: jax.Array, q: jax.Array, scale: jax.Array, n_in: int) -> jax.Array:
    """x (n, *in) @ q (*in, *out) with per-output-channel scale (*out) -> (n, *out): the int8 form of
    llama.py's projection einsums (every one is a matmul over flattened input and output dims)."""
    n = x.shape[0]
    out = q.shape[n_in:]
    k = q.size // max(1, _prod(out))
    y = matmul(x.reshape(n, k), q.reshape(k, -1), scale.reshape(-1))
    return y.reshape(n, *out)


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= s
    return p


def embed_lookup(q: jax.Array, scale: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of the int8 embedding table (vocab, D) for tokens (B, T) -> (B, T, D) in `dtype`."""
    rows = jnp.take(q, tokens, axis=0).astype(jnp.float32)
    return (rows * jnp.take(scale, tokens, axis=0)[..., None]).astype(dtype)


quantize_jit = jax.jit(quantize, static_argnums=1)


def cast_floats(params: dict, dtype) -> dict:
    """Cast the float weights of int8-layout params (norms) to `dtype`; int8 matrices and their float32
    scales are left as they are (a bfloat16 scale would add 0.4% error per channel)."""
    def cast(path, a):
        last = str(getattr(path[-1], "key", path[-1]))
        keep = a.dtype == jnp.int8 or last.endswith("_scale")
        return a if keep else jnp.asarray(a, dtype)
    return jax.tree_util.tree_map_with_path(cast, params)


# ----------------------------------------------------------------------------------------- KV cache


def is_int8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def kv_width(head_dim: int, dtype) -> int:
    """The cache's last dim: head_dim, plus the scale's bytes for int8."""
    return head_dim + SCALE_BYTES if is_int8(dtype) else head_dim


def kv_store(x: jax.Array, dtype) -> jax.Array:
    """k or v (..., head_dim) in the compute dtype -> what the cache of `dtype` holds for it."""
    if not is_int8(dtype):
        return x.astype(dtype)
    q, scale = quantize(x, (x.ndim - 1,))
    return jnp.concatenate([q, jax.lax.bitcast_convert_type(scale, jnp.int8)], axis=-1)


def kv_load(c: jax.Array, dtype) -> jax.Array:
    """Cache contents (..., kv_width) -> k or v (..., head_dim) in `dtype`."""
    if not is_int8(c.dtype):
        return c.astype(dtype)
    scale = jax.lax.bitcast_convert_type(c[..., -SCALE_BYTES:], jnp.float32)
    return (c[..., :-SCALE_BYTES].astype(jnp.float32) * scale[..., None]).astype(dtype)
