"""Sampling strategies: small frozen dataclasses with one method, `sample(logits, key) -> ids`.

They are hashable, so the engine passes them to `jax.jit` as static arguments: one compile per strategy,
and every choice (greedy, temperature, top-k, top-p) runs on device inside the decode loop.
`logits` is (..., V) float32 and `key` one PRNG key; the engine gives each row its own key
(`fold_in(fold_in(seed, row), step)`), so a row's sample never depends on its neighbours in the batch.

Filters apply in the order transformers uses: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Greedy", "Temperature", "TopK", "TopP", "from_flags", "top_k_mask", "top_p_mask"]


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """(..., V) -> bool (..., V): the k largest logits (ties at the k-th value are all kept)."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return logits >= kth


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """(..., V) -> bool (..., V): the smallest set of most likely tokens whose probability reaches p.

    No sort over the vocabulary (slow on accelerators for 128K entries): we bisect for the largest
    probability threshold t whose kept mass sum(prob >= t) still reaches p. Positive float32 values are
    ordered like their int32 bit patterns, so 31 bisection steps over the bits find t exactly, and the
    kept set {prob >= t} is the prefix of the sorted order the definition asks for (ties at t are kept).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def mass_reaches(bits):  # bits (...,) int32 -> bool (...,)
        t = jax.lax.bitcast_convert_type(bits, jnp.float32)[..., None]
        return jnp.sum(jnp.where(probs >= t, probs, 0.0), axis=-1) >= p

    # invariant: threshold lo keeps mass >= p (t = 0 keeps everything), threshold hi keeps less.
    lo = jnp.zeros(probs.shape[:-1], jnp.int32)
    hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32) + 1

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = mass_reaches(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, step, (lo, hi))
    # p = 1 keeps every token. The bisection cannot promise it: float32 sums of the largest
    # probabilities round to 1.0 before the tail is in, and would drop the tail.
    return (probs >= jax.lax.bitcast_convert_type(lo, jnp.float32)[..., None]) | (jnp.asarray(p) >= 1)[..., None]


def _check_temperature(t: float) -> None:
    if not t > 0:
        raise ValueError(f"temperature must be > 0 for sampling (use Greedy for 0), got {t}")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (temperature 0)."""

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature) over the whole vocabulary."""

    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, logits / self.temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Sample among the k most likely tokens."""

    k: int
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        if self.k < 1:
            raise ValueError(f"top-k must be >= 1, got {self.k}")

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits / self.temperature
        logits = jnp.where(top_k_mask(logits, min(self.k, logits.shape[-1])), logits, -jnp.inf)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: among the smallest set of tokens whose probability reaches p (after an
    optional top-k cut, k = 0 meaning none)."""

    p: float
    temperature: float = 1.0
    k: int = 0

    def __post_init__(self):
        _check_temperature(self.temperature)
        if not 0 < self.p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.p}")
        if self.k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.k}")

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits / self.temperature
        if self.k:
            logits = jnp.where(top_k_mask(logits, min(self.k, logits.shape[-1])), logits, -jnp.inf)
        logits = jnp.where(top_p_mask(logits, self.p), logits, -jnp.inf)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


Sampler = Greedy | Temperature | TopK | TopP


def from_flags(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """The CLI's flags -> a strategy. temperature 0 is greedy (top-k/top-p then change nothing)."""
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return Greedy()
    if top_p < 1:
        return TopP(p=top_p, temperature=temperature, k=top_k)
    if top_k > 0:
        return TopK(k=top_k, temperature=temperature)
    return Temperature(temperature=temperature)
