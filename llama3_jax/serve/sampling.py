"""Sampling: per-row temperature / top-k / top-p draws in one compiled program, and the strategies.

The engine does not compile per strategy: a strategy (`Greedy`, `Temperature`, `TopK`, `TopP`: small
frozen dataclasses that check their values) is turned by `row_params` into per-row (temperature,
top_k, top_p) values, and `sample_rows` draws for a whole batch whose rows each have their own values
(greedy is temperature 0), so requests with different knobs share one compiled decode program. There
is one way to draw, `sample_rows`: the strategies hold values, they do not sample.
`logits` are (B, V) float32 with one PRNG key per row; the engine gives each row its own key
(`fold_in(fold_in(seed, row), step)`), so a row's sample never depends on its neighbours in the batch.

Filters apply in the order transformers uses: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Greedy", "Temperature", "TopK", "TopP", "check_flags", "from_flags", "row_params", "sample_rows",
           "top_k_mask_rows", "top_p_mask"]


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


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(b < 0, b ^ 0x7FFFFFFF, b)


def top_k_mask_rows(logits: jax.Array, k: jax.Array) -> jax.Array:
    """(B, V), k (B,) int32 traced (0 = keep all) -> bool (B, V): each row's k largest logits (ties at the
    k-th value are all kept). `lax.top_k` needs a static k; a per-row traced k is found instead
    by bisecting for the largest value t with count(logits >= t) >= k over the order-preserving int32 view
    of the floats (32 steps, no sort over the vocabulary)."""
    keys = _ordered_bits(logits)
    k = jnp.where(k > 0, jnp.minimum(k, logits.shape[-1]), logits.shape[-1])[:, None]
    lo = jnp.min(keys, axis=-1, keepdims=True)          # count(>= lo) = V >= k
    hi = jnp.max(keys, axis=-1, keepdims=True)          # count(>= hi + 1) = 0 < k: hi is a candidate

    def step(_, bounds):  # invariant: count(keys >= lo) >= k; the answer is in [lo, hi]
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1) + ((lo ^ hi) & 1)  # ceil((lo + hi) / 2), no overflow
        ok = jnp.sum(keys >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 33, step, (lo, hi))
    return keys >= lo


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """logits (B, V), one key per row, per-row temperature (0 = greedy), top_k (0 = off), top_p (1 = off)
    -> ids (B,). One program for any mix of values; the top-k / top-p passes run only when some row asks
    for them, and the draw only when some row samples (temperature > 0). A row's draw depends on its
    logits, key and values only, never on the other rows' values."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
        x = logits / t[:, None]
        neg = jnp.asarray(-jnp.inf, x.dtype)
        x = jax.lax.cond(jnp.any(top_k > 0), lambda x: jnp.where(top_k_mask_rows(x, top_k), x, neg), lambda x: x, x)
        x = jax.lax.cond(jnp.any(top_p < 1), lambda x: jnp.where(top_p_mask(x, top_p), x, neg), lambda x: x, x)
        return jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(keys, x).astype(jnp.int32)

    # all of it only when some row samples: the Gumbel noise (B x V random numbers) cost 15 ms of a
    # greedy batch-32 step over a 32K vocabulary on the 2-core CPU VM, against 2 ms for the argmax
    drawn = jax.lax.cond(jnp.any(temperature > 0), draw, lambda logits: greedy, logits)
    return jnp.where(temperature > 0, drawn, greedy)


def _check_temperature(t: float) -> None:
    if not t > 0:
        raise ValueError(f"temperature must be > 0 for sampling (use Greedy for 0), got {t}")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (temperature 0)."""


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature) over the whole vocabulary."""

    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Sample among the k most likely tokens."""

    k: int
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        if self.k < 1:
            raise ValueError(f"top-k must be >= 1, got {self.k}")


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


Sampler = Greedy | Temperature | TopK | TopP


def row_params(sampler: "Sampler") -> tuple[float, int, float]:
    """A strategy -> its (temperature, top_k, top_p) for `sample_rows` (greedy: temperature 0)."""
    if isinstance(sampler, Greedy):
        return 0.0, 0, 1.0
    if isinstance(sampler, Temperature):
        return sampler.temperature, 0, 1.0
    if isinstance(sampler, TopK):
        return sampler.temperature, sampler.k, 1.0
    return sampler.temperature, sampler.k, sampler.p


def check_flags(temperature: float, top_k: int, top_p: float, where: str = "--") -> None:
    """Raise ValueError naming the bad value; `where` prefixes the names ("--" for flags, "'" for keys)."""
    q = "'" if where == "'" else ""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"{where}temperature{q} must be a number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{where}top{'_' if q else '-'}k{q} must be an integer >= 0, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"{where}top{'_' if q else '-'}p{q} must be in (0, 1], got {top_p!r}")


def from_flags(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """The CLI's flags -> a strategy. temperature 0 is greedy (top-k/top-p then change nothing)."""
    check_flags(temperature, top_k, top_p)
    if temperature == 0:
        return Greedy()
    if top_p < 1:
        return TopP(p=top_p, temperature=temperature, k=top_k)
    if top_k > 0:
        return TopK(k=top_k, temperature=temperature)
    return Temperature(temperature=temperature)
