"""Continuous batching and per-request knobs: rows come out as if each ran alone, whatever the batch.

Reuses test_generate's tiny transformers model (the oracle) and its converted checkpoint. Few shapes:
prompts in the 16 and 32 buckets, slot counts 1, 7 and 10 (batch 32 over 10 prompts).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from llama3_jax.serve.offline import run_generate
from llama3_jax.serve.sampling import Temperature, TopK, TopP
from llama3_jax.serve.request import cut_at_stop

from test_generate import ckpt, gen, gen_args, hf_greedy, hf_model, ragged_prompts, read_jsonl  # noqa: F401

LENGTHS = [3, 30, 9, 17, 1, 25, 12, 31, 6, 20]
BUDGETS = [5, 24, 9, 3, 17, 12, 1, 20, 8, 14]  # rows finish at different steps: slots are refilled


def requests(gen, order=None, **kw):
    prompts = ragged_prompts(LENGTHS, seed=2)
    order = range(len(prompts)) if order is None else order
    return [gen.request(prompts[i], BUDGETS[i], row_seed=i, **kw) for i in order], prompts


def run(gen, reqs, batch_size, **kw):
    out = {}
    for batch in gen.generate_requests(reqs, ignore_eos=True, batch_size=batch_size, decode_text=False, **kw):
        for i, c in batch:
            assert i not in out
            out[i] = c
    return [out[i] for i in range(len(reqs))]


def test_greedy_rows_equal_transformers_whatever_the_batch_size_and_arrival_order(gen, hf_model):
    reqs, prompts = requests(gen)
    want = [hf_greedy(hf_model, p, n) for p, n in zip(prompts, BUDGETS)]
    for b in (1, 7, 32):
        got = run(gen, reqs, b)
        assert [c.tokens for c in got] == want, f"batch size {b}"
        assert all(c.finish_reason == "length" for c in got)
    # batch 32: all ten prompts are admitted at once; per width (16 and 32: five rows each) two calls, 4 + 1
    assert gen._scheduler.prefill_calls == 4
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
    shuffled, _ = requests(gen, order)
    got = run(gen, shuffled, 7)
    assert [c.tokens for c in got] == [want[i] for i in order]
    # the static path gives the same tokens
    assert [c.tokens for c in run(gen, reqs, 7, continuous=False)] == want


def test_distinct_knobs_share_one_compile_and_a_seeded_row_ignores_its_batch(gen):
    reqs, _ = requests(gen)
    run(gen, reqs, 7)  # compiles for this shape (if the test above has not)
    compiles = gen._scheduler.compiles()
    samplers = [Temperature(0.7), TopP(0.8, 1.3), TopK(5, 0.9), TopP(0.95, 0.6, k=20), Temperature(1.1)]
    mixed = [gen.request(r.tokens, r.max_new_tokens, samplers[i % len(samplers)], seed=40 + i)
             for i, r in enumerate(reqs)]
    a = run(gen, mixed, 7)
    assert gen._scheduler.compiles() == compiles
    # each row alone (batch size 1) with its own seed: the same tokens
    for i in (1, 7):
        [alone] = run(gen, [mixed[i]], 1)
        assert alone.tokens == a[i].tokens
    # another seed changes the draws; the same seed in another batch position does not
    b = run(gen, mixed[::-1], 7)[::-1]
    assert [c.tokens for c in b] == [c.tokens for c in a]
    other = run(gen, [gen.request(r.tokens, r.max_new_tokens, TopP(0.8, 1.3), seed=99) for r in reqs], 7)
    assert [c.tokens for c in other] != [c.tokens for c in a]


def test_cut_at_stop_spans_tokens_and_keeps_the_completing_token():
    pieces = {1: "ab", 2: "c\n", 3: "\nd", 4: "e"}
    decode = lambda ts: "".join(pieces[t] for t in ts)  # noqa: E731
    assert cut_at_stop([1, 2, 3, 4], ["\n\n"], decode) == (3, "abc")
    assert cut_at_stop([1, 2, 3, 4], ["zz", "bc"], decode) == (2, "a")
    assert cut_at_stop([1, 2, 3, 4], ["q"], decode) is None
    assert cut_at_stop([1, 2, 3, 4], [], decode) is None


def test_per_line_knobs_max_new_tokens_stop_and_seed(gen, ckpt, tmp_path, capsys):
    prompts = ragged_prompts([5, 12, 20, 8], seed=7)
    full = run(gen, [gen.request(p, 12) for p in prompts], 7)
    texts = [[gen.tokenizer.decode([t]) for t in c.tokens] for c in full]
    # a stop string made of the end of token 3's text and the start of token 4's: split across two tokens
    stop = texts[1][3][-1:] + texts[1][4][:1]
    head = gen.tokenizer.decode(full[1].tokens[:5])
    assert stop in head and stop not in gen.tokenizer.decode(full[1].tokens[:4])
    lines = [{"id": "short", "tokens": prompts[0], "max_new_tokens": 3},
             {"id": "stop", "tokens": prompts[1], "stop": ["\u2603never", stop]},
             {"id": "seeded", "tokens": prompts[2], "temperature": 0.9, "top_p": 0.9, "seed": 11},
             {"id": "default", "tokens": prompts[3]},
             {"id": "bad", "tokens": prompts[3], "top_p": 0},
             {"id": "bad2", "tokens": prompts[3], "stop": [3]}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    run_generate(gen_args(ckpt, inp, out, batch_size=2, max_new_tokens=12, ignore_eos=True), generator=gen)
    err = capsys.readouterr().err
    assert "in.jsonl:5: skipped: 'top_p' must be in (0, 1], got 0" in err
    assert "in.jsonl:6: skipped: 'stop' must be a list of non-empty strings" in err
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"short", "stop", "seeded", "default"}
    assert (rows["short"]["tokens"], rows["short"]["finish_reason"]) == (full[0].tokens[:3], "length")
    assert rows["stop"]["tokens"] == full[1].tokens[:5]
    assert rows["stop"]["text"] == head[:head.index(stop)]
    assert rows["stop"]["finish_reason"] == "stop"
    assert rows["default"]["tokens"] == full[3].tokens
    # a line's own seed: its stream is fold_in(key(seed), 0), independent of its id and batch
    [seeded] = run(gen, [gen.request(prompts[2], 12, TopP(0.9, 0.9), seed=11)], 1)
    assert rows["seeded"]["tokens"] == seeded.tokens
    assert seeded.tokens != full[2].tokens


def test_chunked_prefill_equals_one_pass_and_transformers(gen, hf_model):
    """--prefill-chunk: a prompt longer than the chunk gives the one-pass logits (float32, 1e-5) and
    cache, with leading all-padding chunks skipped in a reused cache full of stale rows (the static
    path's case); a continuous run gives transformers' greedy tokens for prompts padded to multiples
    of the chunk instead of powers of two."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama3_jax.serve.engine import Generator
    from llama3_jax.model.kv_cache import KVCache
    from llama3_jax.model.llama import stack_layer_params
    from llama3_jax.serve.slots import open_prefill, prefill, prefill_step, prompt_width

    prompts = ragged_prompts([30, 5, 19], seed=4)
    tokens = np.zeros((3, 32), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, 32 - len(p):] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)

    def run_prefill(params, cache, chunk):
        return prefill(nnx.merge(gen.graphdef, params), jnp.asarray(tokens), lengths, cache, chunk)

    fresh = KVCache.init(gen.cfg, 3, 40, jnp.float32)
    stale = KVCache(k=fresh.k + 1.0, v=fresh.v - 1.0, segment_ids=fresh.segment_ids + 1, index=fresh.index)
    want, want_cache = jax.jit(run_prefill, static_argnums=2)(gen.params, fresh, None)
    got, got_cache = jax.jit(run_prefill, static_argnums=2)(gen.params, stale, 8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    filled = np.asarray(want_cache.segment_ids)[:, :32] != 0
    assert (np.asarray(got_cache.segment_ids)[:, :32] == np.asarray(want_cache.segment_ids)[:, :32]).all()
    for a, b in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
        np.testing.assert_allclose(np.asarray(a)[:, :, :32][:, filled], np.asarray(b)[:, :, :32][:, filled], atol=1e-5)
    assert int(got_cache.index) == 32 and prompt_width(30, 8) == 32 and prompt_width(17, 8) == 24
    # the same chunks run one call at a time from the host (interleaved with decoding): the same logits
    tmp = jax.jit(open_prefill, static_argnums=(0, 1, 4))(gen.cfg, jnp.float32, jnp.asarray(tokens), lengths, 8)
    step = jax.jit(prefill_step, static_argnums=(0, 6))
    for j in range(4):
        piece_logits, tmp = step(gen.graphdef, gen.params, tmp, jnp.asarray(tokens), lengths, jnp.int32(j), 8)
    np.testing.assert_allclose(piece_logits, want, atol=1e-5, rtol=1e-5)
    assert prompt_width(5, 8) == 8 and prompt_width(5, None) == 16

    chunked = Generator(cfg=gen.cfg, params=stack_layer_params(gen.params), dtype="float32", prefill_chunk=8)
    # padded to 32, 24 and 8 slots: the long two are prefilled a chunk per host visit (4 and 3 chunks)
    # while the short row decodes
    budgets = [6, 40, 9]
    reqs = [chunked.request(p, n, row_seed=i) for i, (p, n) in enumerate(zip(prompts, budgets))]
    assert [c.tokens for c in run(chunked, reqs, 3)] == [hf_greedy(hf_model, p, n) for p, n in zip(prompts, budgets)]
    assert chunked._scheduler.interleaved >= 4


def test_paged_cache_equals_the_contiguous_one(gen):
    """A paged KV cache (pages of 8 slots, in a pool too small for every row at once, so rows wait for
    pages) gives the contiguous cache's greedy tokens; decode logits through scattered pages equal the
    contiguous cache's (float32 1e-5), with float32 and with int8 K/V."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama3_jax.serve.engine import Generator
    from llama3_jax.model.kv_cache import KVCache
    from llama3_jax.model.llama import stack_layer_params
    from llama3_jax.model.paged_cache import PagedKVCache, place
    from llama3_jax.serve.slots import decode_step, prefill

    reqs, _ = requests(gen)
    want = [c.tokens for c in run(gen, reqs, 7)]
    paged = Generator(cfg=gen.cfg, params=stack_layer_params(gen.params), dtype="float32", kv_pages=12, page_size=8)
    assert [c.tokens for c in run(paged, reqs, 7)] == want
    assert paged._scheduler.page_waits > 0  # 38 pages asked for in all, 12 in the pool
    paged.kv_pages = 8  # what generate checks per input line
    assert paged.context_error(30, 40) == "prompt of 30 tokens + max_new_tokens 40 needs 9 KV pages of 8 slots; kv_pages is 8"

    prompts = ragged_prompts([30, 5, 19], seed=4)
    tokens = np.zeros((3, 32), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, 32 - len(p):] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    # each row's pages scattered over the pool, out of order; page 0 never used
    pages = jnp.asarray([[9, 2, 14, 5, 11, 0], [7, 0, 0, 0, 0, 0], [3, 12, 1, 8, 0, 0]], jnp.int32)

    def both(params, kv_dtype):
        model = nnx.merge(gen.graphdef, params)
        first, cache = prefill(model, jnp.asarray(tokens), lengths, KVCache.init(gen.cfg, 3, 40, kv_dtype))
        _, tmp = prefill(model, jnp.asarray(tokens), lengths, KVCache.init(gen.cfg, 3, 32, kv_dtype))
        pool = place(PagedKVCache.init(gen.cfg, 15, 8, 3, 6, kv_dtype), tmp, pages)
        pool = dataclasses.replace(pool, table=pages)
        tok, a, b = jnp.argmax(first, -1).astype(jnp.int32), [], []
        for step in range(3):
            la, cache = decode_step(model, tok, lengths + step, cache)
            lb, pool = decode_step(model, tok, lengths + step, pool)
            a.append(la)
            b.append(lb)
            tok = jnp.argmax(la, -1).astype(jnp.int32)
        return jnp.stack(a), jnp.stack(b)

    for kv_dtype in (jnp.float32, jnp.int8):
        a, b = jax.jit(both, static_argnums=1)(gen.params, kv_dtype)
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_contiguous_cache_shifts_and_resizes_without_changing_a_row(gen, hf_model):
    """Two slots, ragged rows timed to drive the contiguous cache through every move (scheduler.py's
    `_make_room` and `_room_for_prompts`, slots.shift / resize): the two long rows end together as the
    write slot nears the end of the 64-slot cache, so the next two reach it with a few tokens each:
    shift them to the front and halve the cache; a prompt wider than the write slot then moves the rows
    up; the sampled row outlives three quarters of the halved cache, which then doubles. Each row
    must give what it gives alone: transformers' greedy tokens, and the sampled row its solo run's."""
    lengths, budgets = [3, 3, 3, 2, 5], [44, 44, 30, 10, 8]
    prompts = ragged_prompts(lengths, seed=3)
    reqs = [gen.request(p, n, row_seed=i) for i, (p, n) in enumerate(zip(prompts, budgets))]
    reqs[2] = gen.request(prompts[2], budgets[2], TopP(0.9, 0.8), seed=5, row_seed=2)
    gen._scheduler = None  # a fresh scheduler: its counters count this run only
    got = run(gen, reqs, 2)
    moves = gen._scheduler
    assert (moves.shifts, moves.shrinks, moves.grows) == (3, 1, 1)
    for i in (0, 1, 3, 4):
        assert got[i].tokens == hf_greedy(hf_model, prompts[i], budgets[i]), f"row {i}"
    [alone] = run(gen, [reqs[2]], 1)
    assert got[2].tokens == alone.tokens and len(alone.tokens) == budgets[2]
