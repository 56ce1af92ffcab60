"""Rotary position embeddings, in the HF ("rotate half") layout, with Llama 3.1 frequency scaling.

Frequencies are computed in float32 exactly as the reference does, so logits match to 1e-5;
angles are position * inv_freq in float32 (bf16 would round position 257 to 256).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies, scaled by the "llama3" rule when configured."""
    d = cfg.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(rs.factor), inv).astype(np.float32)
    smooth = ((old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(rs.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions (B, T) int -> cos, sin (B, T, head_dim) float32."""
    inv = jnp.asarray(inv_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv  # (B, T, K/2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x (B, T, H, K); rotate pairs (i, i + K/2)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
