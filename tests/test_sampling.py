"""Sampling on hand-made logits: supports and frequencies against computed expectations.

Every draw goes through the engine's one path, `sample_rows`, with the per-row values a strategy gives
(`row_params`): the strategies hold values, they do not sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.serve import sampling
from llama3_jax.serve.sampling import Greedy, Temperature, TopK, TopP

N_DRAWS = 4000


def knobs(samplers) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row (temperature, top_k, top_p) arrays for `sample_rows`, one row per strategy."""
    t, k, p = zip(*map(sampling.row_params, samplers))
    return jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32)


sample_rows = jax.jit(sampling.sample_rows)


def rows_draw(sampler, logits, keys) -> np.ndarray:
    """logits (B, V), keys (B,) -> ids (B,): every row with `sampler`'s values, through the engine's path."""
    return np.asarray(sample_rows(jnp.asarray(logits), keys, *knobs([sampler] * len(keys))))


def draws(sampler, logits, seed=0, n=N_DRAWS) -> np.ndarray:
    """n samples (one key each) for a single (V,) row of logits: n rows of it in one batch."""
    keys = jax.random.split(jax.random.key(seed), n)
    return rows_draw(sampler, np.broadcast_to(np.asarray(logits), (n, len(logits))), keys)


def freqs(samples, v) -> np.ndarray:
    return np.bincount(samples, minlength=v) / len(samples)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_p_mask_is_the_smallest_set_reaching_p():
    """The bisection mask equals the sort-and-cumsum definition, for set sizes from 1 to many."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(24, 211)).astype(np.float32) * 3
    ps, expected = [], []
    for row in logits:
        probs = softmax(row.astype(np.float64))
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        j = int(rng.integers(0, 60))  # keep j + 1 tokens: p halfway between two cumulative masses
        ps.append((cum[j - 1] + cum[j]) / 2 if j else cum[0] / 2)
        keep = np.zeros(211, bool)
        keep[order[:j + 1]] = True
        expected.append(keep)
    got = jax.jit(jax.vmap(sampling.top_p_mask))(jnp.asarray(logits), jnp.asarray(ps, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), np.array(expected))


def test_top_p_1_keeps_every_token():
    """Peaked rows (a few tokens hold almost all the mass): float32 running sums reach 1.0 before the
    tail is counted, which must not drop the tail when p = 1. The p = 1 rows share a batch with a
    p < 1 row, so the top-p pass really runs over them."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(33, 211)).astype(np.float32) * 10)
    probs = jax.nn.softmax(logits, axis=-1)
    assert bool((probs > 0).all())  # every token is a possible sample
    keep = jax.jit(jax.vmap(sampling.top_p_mask, in_axes=(0, None)))(logits, 1.0)
    assert bool(keep.all())
    keys = jax.random.split(jax.random.key(0), 33)
    with_mask = np.asarray(sample_rows(logits, keys, *knobs([TopP(p=1.0)] * 32 + [TopP(p=0.5)])))
    np.testing.assert_array_equal(with_mask[:32], rows_draw(Temperature(1.0), logits, keys)[:32])


@pytest.mark.parametrize("p, support", [(0.6, {1, 3}), (0.75, {1, 3, 4}), (0.3, {1}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_samples_only_the_nucleus_in_proportion(p, support):
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    got = freqs(draws(TopP(p=p), np.log(probs).astype(np.float32)), 5)
    assert set(np.nonzero(got)[0]) == support
    kept = np.array([probs[i] if i in support else 0 for i in range(5)])
    np.testing.assert_allclose(got, kept / kept.sum(), atol=0.03)


def test_top_k_samples_only_the_k_best_in_proportion():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=13).astype(np.float32)
    got = freqs(draws(TopK(k=3, temperature=0.7), logits), 13)
    best = np.argsort(-logits)[:3]
    assert set(np.nonzero(got)[0]) == set(best.tolist())
    expected = np.zeros(13)
    expected[best] = softmax(logits[best].astype(np.float64) / 0.7)
    np.testing.assert_allclose(got, expected, atol=0.03)


def test_top_p_after_top_k_cut():
    probs = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    got = freqs(draws(TopP(p=0.99, k=2), np.log(probs).astype(np.float32)), 5)
    assert set(np.nonzero(got)[0]) == {0, 1}


def test_temperature_frequencies_follow_the_tempered_softmax():
    logits = np.array([1.0, 0.2, -0.5, 0.8], np.float32)
    got = freqs(draws(Temperature(0.5), logits), 4)
    np.testing.assert_allclose(got, softmax(logits.astype(np.float64) / 0.5), atol=0.03)


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(64, 211)).astype(np.float32))
    keys = jax.random.split(jax.random.key(5), 64)
    greedy = rows_draw(Greedy(), logits, keys)
    for s in (TopK(k=1), TopK(k=1, temperature=3.0), TopP(p=0.5, k=1)):
        np.testing.assert_array_equal(rows_draw(s, logits, keys), greedy)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))


def test_same_key_same_samples_other_key_other_samples():
    logits = np.zeros(211, np.float32)
    s = TopP(p=0.9)
    a, b, c = draws(s, logits, seed=3, n=64), draws(s, logits, seed=3, n=64), draws(s, logits, seed=4, n=64)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_from_flags():
    assert sampling.from_flags(0.0, top_k=5, top_p=0.5) == Greedy()
    assert sampling.from_flags(0.7) == Temperature(0.7)
    assert sampling.from_flags(0.7, top_k=5) == TopK(k=5, temperature=0.7)
    assert sampling.from_flags(0.7, top_k=5, top_p=0.9) == TopP(p=0.9, temperature=0.7, k=5)
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sampling.from_flags(**{"temperature": 1.0, **bad})


def test_per_row_top_k_mask_keeps_each_rows_k_largest_ties_included():
    """Against the sort definition: keep every logit >= the row's k-th largest (ties at the k-th value
    all kept, -inf counted like any value); k = 0 and k >= V keep the whole row."""
    logits = np.random.RandomState(0).randn(6, 40).astype(np.float32)
    logits[1, :10] = 5.0   # ten ties above the rest: k = 3 keeps all ten
    logits[2, 5] = -np.inf
    logits[5, :] = 0.5     # one value everywhere
    ks = [1, 3, 11, 40, 0, 2]
    got = np.asarray(jax.jit(sampling.top_k_mask_rows)(jnp.asarray(logits), jnp.asarray(ks)))
    for r, k in enumerate(ks):
        kth = np.sort(logits[r])[::-1][min(k, 40) - 1] if k else -np.inf
        np.testing.assert_array_equal(got[r], logits[r] >= kth, err_msg=f"row {r}")
    assert got[1].sum() == 10 and got[5].all()


def test_a_row_draws_the_same_in_a_mixed_batch_as_in_a_batch_of_its_own_knobs():
    """One program, per-row knobs: the top-k / top-p passes and the draw run for the whole batch when
    any row asks for them, and must not change what the other rows draw."""
    strategies = [Greedy(), Temperature(0.7), TopK(5, 0.9), TopP(0.8, 1.2, k=10), TopP(0.5)]
    logits = jnp.asarray(np.random.RandomState(1).randn(len(strategies), 30).astype(np.float32))
    mixed = knobs(strategies)
    f = jax.jit(jax.vmap(lambda keys, t, k, p: sampling.sample_rows(logits, keys, t, k, p),
                         in_axes=(0, None, None, None)))
    keys = jax.random.split(jax.random.key(3), 300 * len(strategies)).reshape(300, len(strategies))
    got = np.asarray(f(keys, *mixed))
    for r, s in enumerate(strategies):
        alone = np.asarray(f(keys, *knobs([s] * len(strategies))))
        np.testing.assert_array_equal(got[:, r], alone[:, r], err_msg=repr(s))
    assert len(set(got[:, 1])) > 3  # it really sampled
