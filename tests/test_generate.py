"""The engine and the generate / score commands against transformers on the same converted weights.

One tiny random `LlamaForCausalLM` (vocab 211, init scaled up so the logits are far from ties) is
converted once per module; the tests share one Generator so compiles are few (one per batch shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama3_jax.store import checkpoint
from llama3_jax.serve import engine, slots, static_batch
from llama3_jax.serve.engine import Generator
from llama3_jax.model.kv_cache import KVCache
from llama3_jax.model.llama import Llama, abstract_model, stack_layer_params
from llama3_jax.serve.sampling import TopP

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, EOS, N_NEW = 211, 7, 16
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    c = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=10, rms_norm_eps=1e-5, max_position_embeddings=128,
        initializer_range=0.2, bos_token_id=1, eos_token_id=EOS, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})
    return transformers.LlamaForCausalLM(c).eval()


@pytest.fixture(scope="module")
def ckpt(hf_model, tmp_path_factory):
    from llama3_jax.convert import convert
    d = tmp_path_factory.mktemp("gen")
    hf_model.save_pretrained(d / "hf")
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return d / "jax"


@pytest.fixture(scope="module")
def gen(ckpt):
    return Generator(ckpt, dtype="float32")


def ragged_prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, VOCAB, n).tolist() for n in lengths]


LENGTHS = [1, 3, 8, 15, 17, 24, 33, 40]  # one batch of 8, padded to the 64 bucket


def hf_greedy(model, prompt, n):
    """transformers' greedy continuation of one unpadded prompt, never stopping early."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_on_a_ragged_batch(gen, hf_model):
    prompts = ragged_prompts(LENGTHS)
    got = gen.generate(prompts, max_new_tokens=N_NEW, ignore_eos=True, batch_size=8, decode_text=False)
    for p, c in zip(prompts, got):
        assert c.tokens == hf_greedy(hf_model, p, N_NEW), f"prompt of {len(p)} tokens"
        assert c.finish_reason == "length"


def test_prompt_lengths_in_one_bucket_share_one_compile(gen):
    assert [slots.bucket(n) for n in (1, 16, 17, 32, 33, 64, 65)] == [16, 16, 32, 32, 64, 64, 128]
    gen.generate(ragged_prompts(LENGTHS), N_NEW, ignore_eos=True, batch_size=8, decode_text=False, continuous=False)
    compiles = gen._generate._cache_size()
    other = ragged_prompts([2, 4, 6, 9, 34, 35, 50, 63], seed=9)  # also pads to 64
    gen.generate(other, N_NEW, ignore_eos=True, batch_size=8, decode_text=False, continuous=False)
    gen.generate(other[::-1], N_NEW, stop_ids=[1, 2, 3], batch_size=8, decode_text=False, continuous=False)
    assert gen._generate._cache_size() == compiles


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(gen):
    prompts = ragged_prompts(LENGTHS)
    batch = gen.generate(prompts, max_new_tokens=N_NEW, ignore_eos=True, batch_size=8, decode_text=False)
    alone = gen.generate([prompts[5]], max_new_tokens=N_NEW, ignore_eos=True, batch_size=1, decode_text=False)
    assert alone[0].tokens == batch[5].tokens
    # sampled: each row's random stream depends on its row seed only, not on its neighbours
    sampler = TopP(p=0.9, temperature=1.0)
    batched = dict(x for b in gen.generate_batches(prompts, N_NEW, sampler, seed=3, row_seeds=range(100, 108),
                                                     batch_size=8, ignore_eos=True, decode_text=False) for x in b)
    [[(_, single)]] = list(gen.generate_batches([prompts[5]], N_NEW, sampler, seed=3, row_seeds=[105],
                                                batch_size=1, ignore_eos=True, decode_text=False))
    assert single.tokens == batched[5].tokens


def test_sampling_is_reproducible_per_seed(gen):
    prompts = ragged_prompts(LENGTHS)
    sampler = TopP(p=0.9, temperature=1.0)

    def run(seed):
        out = gen.generate(prompts, N_NEW, sampler, seed=seed, ignore_eos=True, batch_size=8, decode_text=False)
        return [c.tokens for c in out]

    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert a != c
    greedy = [c.tokens for c in gen.generate(prompts, N_NEW, ignore_eos=True, batch_size=8, decode_text=False)]
    assert a != greedy  # it really sampled


@pytest.mark.parametrize("layers", ["scan", "unroll", "split"])
def test_prefill_then_decode_equals_a_full_forward_pass(gen, layers):
    """Ragged left-padded prefill + step-by-step decode give the logits of one uncached forward pass,
    with the layers scanned, unrolled, or held as separate per-layer arrays."""
    cfg = gen.cfg
    graphdef, _ = nnx.split(abstract_model(cfg, scan_layers=layers == "scan", split_layers=layers == "split"))
    params = gen.params if layers == "split" else stack_layer_params(gen.params)
    lengths, p, steps = [3, 11, 16], 16, 5
    rng = np.random.RandomState(1)
    seqs = [rng.randint(0, VOCAB, n + steps).tolist() for n in lengths]
    tokens = np.zeros((3, p), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, p - n:] = seqs[r][:n]
    lengths_a = jnp.asarray(lengths, jnp.int32)

    @jax.jit
    def prefill(params, tokens, cache):
        return slots.prefill(nnx.merge(graphdef, params), tokens, lengths_a, cache)

    @jax.jit
    def step(params, tok, pos, cache):
        return slots.decode_step(nnx.merge(graphdef, params), tok, pos, cache)

    @jax.jit
    def full(params, tokens, seg):  # right-padded rows, positions from 0
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return nnx.merge(graphdef, params)(tokens, pos, seg)[0]

    cache = KVCache.init(cfg, 3, p + steps, jnp.float32)
    logits, cache = prefill(params, jnp.asarray(tokens), cache)
    cached = [np.asarray(logits)]
    for s in range(steps - 1):
        tok = jnp.asarray([seq[n + s] for seq, n in zip(seqs, lengths)], jnp.int32)
        logits, cache = step(params, tok, lengths_a + s, cache)
        cached.append(np.asarray(logits))
    width = max(lengths) + steps
    right = np.zeros((3, width), np.int32)
    seg = np.zeros((3, width), np.int32)
    for r, seq in enumerate(seqs):
        right[r, :len(seq)], seg[r, :len(seq)] = seq, 1
    ref = np.asarray(full(params, jnp.asarray(right), jnp.asarray(seg)))
    for s in range(steps):
        expected = np.stack([ref[r, n - 1 + s] for r, n in enumerate(lengths)])
        np.testing.assert_allclose(cached[s], expected, atol=1e-5, rtol=0)


def test_stacked_scanned_engine_gives_the_split_engine_tokens(gen, ckpt):
    """The default on CPU holds per-layer arrays; the stacked, scanned engine (the default elsewhere)
    must generate the same tokens."""
    assert gen.params["layers"].keys() == set(range(gen.cfg.n_layers))
    stacked = Generator(ckpt, dtype="float32", split_layers=False)
    assert stacked.params["layers"]["wq"].shape[0] == gen.cfg.n_layers
    prompts = ragged_prompts([1, 9, 23])
    want = [c.tokens for c in gen.generate(prompts, 6, ignore_eos=True, batch_size=4, decode_text=False)]
    got = [c.tokens for c in stacked.generate(prompts, 6, ignore_eos=True, batch_size=4, decode_text=False)]
    assert got == want


def test_a_stop_token_ends_only_its_row(gen):
    prompts = ragged_prompts(LENGTHS)
    full = [c.tokens for c in gen.generate(prompts, N_NEW, ignore_eos=True, batch_size=8, decode_text=False)]
    # a token that some row generates after its first step but that at least one other row never generates
    stop = next(t for row in full for t in row[1:] if t not in row[:1] and any(t not in r for r in full))
    got = gen.generate(prompts, N_NEW, stop_ids=[stop], batch_size=8, decode_text=False)
    for row, c in zip(full, got):
        if stop in row:
            assert (c.tokens, c.finish_reason) == (row[:row.index(stop)], "stop")
        else:
            assert (c.tokens, c.finish_reason) == (row, "length")
    assert {c.finish_reason for c in got} == {"stop", "length"}


def test_the_cache_is_donated_and_updated_in_place(gen):
    """The decode loop writes the cache with in-place dynamic_update_slice: no cache-sized copy or
    broadcast appears in the compiled program, and the caller's cache buffers are donated."""
    b, p, n = 8, 64, N_NEW
    cache = gen._cache_for(b, p + n)
    args = dict(params=gen.params, tokens=jnp.zeros((b, p), jnp.int32), lengths=jnp.ones((b,), jnp.int32),
                active=jnp.ones((b,), bool), row_seeds=jnp.zeros((b,), jnp.int32), seeds=jnp.zeros((b,), jnp.int32),
                stop_ids=jnp.full((engine.STOP_SLOTS,), -1, jnp.int32),
                knobs=(jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.float32)),
                max_new=n, limits=jnp.full((b,), n, jnp.int32))
    hlo = gen._generate.lower(cache=cache, **args).compile().as_text()
    shape = "f32[" + ",".join(map(str, cache.k.shape)) + "]"
    assert shape in hlo
    cache_sized = [line for line in hlo.splitlines()
                   if re.search(re.escape(shape) + r"\{[\d,]*\} (copy|broadcast)\(", line)]
    assert not cache_sized, cache_sized[:3]
    *_, new_cache = gen._generate(cache=cache, **args)
    assert cache.k.is_deleted() and cache.v.is_deleted()
    assert new_cache.k.shape == cache.k.shape
    gen._cache = new_cache


def test_bfloat16_casts_parameters_once_float32_keeps_them(ckpt, gen):
    g16 = Generator(ckpt, dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(g16.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(gen.params)} == {jnp.dtype(jnp.float32)}
    [c] = g16.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True, batch_size=1, decode_text=False)
    assert len(c.tokens) == 4 and g16._cache.k.dtype == jnp.bfloat16


def test_score_equals_transformers_log_softmax(gen, hf_model):
    rng = np.random.RandomState(2)
    pairs = [(rng.randint(0, VOCAB, a).tolist(), rng.randint(0, VOCAB, b).tolist())
             for a, b in [(1, 5), (7, 1), (12, 20), (30, 9), (3, 0)]]
    got = gen.score(pairs, batch_size=4)
    for (prompt, completion), s in zip(pairs, got):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + completion])).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        expected = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(completion)]
        assert s.tokens == completion
        np.testing.assert_allclose(s.logprobs, expected, atol=1e-5, rtol=0)
        assert s.sum_logprob == pytest.approx(sum(expected), abs=1e-4)


# ------------------------------------------------------------------------------------------ the CLI


def gen_args(ckpt, inp, out, **kw):
    base = dict(checkpoint=str(ckpt), input=str(inp), output=str(out), batch_size=8, dtype="float32",
                tokenizer=None, max_new_tokens=N_NEW, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                ignore_eos=False)
    return argparse.Namespace(**{**base, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_bad_lines_are_reported_and_skipped(gen, ckpt, tmp_path, capsys):
    from llama3_jax.serve.offline import run_generate
    good = ragged_prompts([5, 20, 40])
    lines = [
        json.dumps({"id": "a", "tokens": good[0]}),
        '{"id": "broken", "tokens": [1, 2',                        # 2: invalid JSON
        json.dumps({"tokens": [1, 2, 3]}),                         # 3: no id
        json.dumps({"id": "nothing"}),                             # 4: no prompt / messages / tokens
        json.dumps({"id": "oov", "tokens": [1, VOCAB]}),           # 5: token outside the vocabulary
        json.dumps({"id": "a", "tokens": [1, 2]}),                 # 6: duplicate id
        json.dumps({"id": "long", "tokens": [1] * 120}),           # 7: 120 + 16 > 128 context
        json.dumps({"id": 7, "tokens": good[1]}),
        "",
        json.dumps({"id": "c", "tokens": good[2]}),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    summary = run_generate(gen_args(ckpt, inp, out), generator=gen)
    err = capsys.readouterr().err
    unfinished = len(lines[1]) + 1  # the error is at the end of line 2 itself, not at column 1 of line 3
    for lineno, what in [(2, f"invalid JSON .*at column {unfinished}\\)"), (3, "missing 'id'"), (4, "exactly one of"),
                         (5, "'tokens': token id 211 .*outside the model's vocab"), (6, "duplicate id"), (7, "context")]:
        assert re.search(rf"in\.jsonl:{lineno}: .*{what}", err), (lineno, err)
    rows = {json.dumps(r["id"]): r for r in read_jsonl(out)}
    assert set(rows) == {'"a"', "7", '"c"', '"long"'}
    assert "context" in rows['"long"']["error"]
    expected = gen.generate(good, N_NEW, batch_size=8)
    for key, c in zip(['"a"', "7", '"c"'], expected):
        assert rows[key]["tokens"] == c.tokens and rows[key]["finish_reason"] == c.finish_reason
        assert rows[key]["text"] == gen.tokenizer.decode(c.tokens)
    assert (summary["prompts"], summary["skipped_lines"], summary["errors"]) == (3, 5, 1)
    assert re.search(r"generate: 3 prompts, \d+ tokens generated .* tokens/s.*5 bad lines skipped", err)


def test_the_input_is_read_a_piece_at_a_time(gen, ckpt, tmp_path, capsys):
    """--read-lines 1: one line to run per piece, each run and written before the next is read (so the
    output is in input order), with the reports and counts of one piece: a bad line, a duplicate id
    found in a later piece, an id already done. Prompts of one bucket at batch 1: one set of programs
    compiled for all three pieces."""
    from llama3_jax.serve.offline import run_generate
    good = ragged_prompts([20, 24, 30], seed=7)
    lines = [json.dumps({"id": "a", "tokens": good[0]}), '{"id": "broken"',
             json.dumps({"id": "done", "tokens": good[0]}), json.dumps({"id": "b", "tokens": good[1]}),
             json.dumps({"id": "a", "tokens": [1, 2]}), json.dumps({"id": "c", "tokens": good[2]})]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out.write_text(json.dumps({"id": "done", "text": "", "tokens": [], "finish_reason": "stop"}) + "\n")
    summary = run_generate(gen_args(ckpt, inp, out, batch_size=1, read_lines=1), generator=gen)
    err = capsys.readouterr().err
    assert err.count(": skipped:") == 2 and "in.jsonl:2: skipped: invalid JSON" in err
    assert "in.jsonl:5: skipped: duplicate id 'a' (first on line 1)" in err
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["done", "a", "b", "c"]
    for r, p in zip(rows[1:], good):
        assert r["tokens"] == gen.generate([p], N_NEW, batch_size=1)[0].tokens
    assert (summary["prompts"], summary["skipped_lines"], summary["already_done"]) == (3, 2, 1)


def test_resume_after_sigkill_gives_every_id_once_with_the_same_tokens(gen, ckpt, tmp_path):
    from llama3_jax.serve.offline import run_generate
    lengths = [3, 5, 9, 12, 14, 20, 23, 28, 31, 10, 7, 2]  # two prompt buckets (16, 32) at batch 2
    prompts = ragged_prompts(lengths, seed=4)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "tokens": p}) + "\n" for i, p in enumerate(prompts)))
    ref_out = tmp_path / "ref.jsonl"
    run_generate(gen_args(ckpt, inp, ref_out, batch_size=2), generator=gen)
    reference = {r["id"]: r for r in read_jsonl(ref_out)}

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "llama3_jax.cli", "generate", "--checkpoint", str(ckpt), "--input", str(inp),
           "--output", str(out), "--batch-size", "2", "--dtype", "float32", "--max-new-tokens", str(N_NEW)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    n_before = out.read_bytes().count(b"\n")
    assert 2 <= n_before < len(prompts), "the run finished before it could be killed"
    with open(out, "ab") as f:  # as if the crash had also torn the line being written
        f.write(b'{"id": "p0", "text": "tor')

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert "torn last line" in rerun.stderr
    assert f"already in {out}" in rerun.stderr and f"{n_before} already" in rerun.stderr
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(reference)
    assert {r["id"]: r for r in rows} == reference


def test_mesh_on_eight_devices_equals_one_device(gen, ckpt, tmp_path):
    """One process, 8 fake devices: generate on data=2 x tensor=4 (the cache and the weights sharded by
    the rules) and with a paged cache on data=4 x tensor=2 (the pool's heads split), score on --mesh data=2,fsdp=2,tensor=2 and convert --to jax on the default mesh (the model
    split over all 8) give the tokens, log-probs and stored weights of one device."""
    from llama3_jax.serve.offline import run_generate, run_score
    rng = np.random.RandomState(2)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "tokens": p, "prompt_tokens": p, "completion_tokens":
                                       rng.randint(0, VOCAB, 5).tolist()}) + "\n"
                           for i, p in enumerate(ragged_prompts(LENGTHS[:4]))))
    run_generate(gen_args(ckpt, inp, tmp_path / "gen1.jsonl", batch_size=4), generator=gen)
    run_score(gen_args(ckpt, inp, tmp_path / "score1.jsonl", batch_size=4), generator=gen)
    code = textwrap.dedent(f"""
        import argparse, json, jax
        from llama3_jax.parallel import sharding
        from llama3_jax.cli import main
        from llama3_jax.serve.engine import Generator
        from llama3_jax.serve.offline import run_generate
        from llama3_jax.model.kv_cache import CACHE_AXES
        mesh = sharding.inference_mesh(sharding.parse_mesh("data=2,fsdp=1,tensor=4"))
        g = Generator({str(ckpt)!r}, dtype="float32", mesh=mesh)
        args = {vars(gen_args(ckpt, inp, tmp_path / "gen8.jsonl", batch_size=4))!r}
        run_generate(argparse.Namespace(**args), generator=g)
        k = g._cache.k
        want = sharding.named_sharding(mesh, CACHE_AXES, k.shape)
        print(json.dumps({{"sharded": k.sharding.is_equivalent_to(want, k.ndim), "replicated": k.sharding.is_fully_replicated,
                           "params_sharded": not g.params["layers"][0]["wq"].sharding.is_fully_replicated}}))
        # the paged cache on data=4 x tensor=2: the pool's 2 kv heads split over tensor
        mesh = sharding.inference_mesh(sharding.parse_mesh("data=4,fsdp=1,tensor=2"))
        g = Generator({str(ckpt)!r}, dtype="float32", mesh=mesh, kv_pages=12, page_size=8)
        args["output"] = {str(tmp_path / "gen8paged.jsonl")!r}
        run_generate(argparse.Namespace(**args), generator=g)
        pool = g._pool.kv  # (layers, K|V, pages, page, kv heads, head_dim)
        print(json.dumps({{"pool": pool.sharding.is_equivalent_to(sharding.named_sharding(mesh, g._pool.axes, pool.shape), pool.ndim),
                           "pool_split": pool.sharding.shard_shape(pool.shape)[4] == 1}}))
        common = ["--checkpoint", {str(ckpt)!r}, "--input", {str(inp)!r}, "--dtype", "float32", "--batch-size", "4"]
        assert main(["score", *common, "--output", {str(tmp_path / "score8.jsonl")!r}, "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
        assert main(["convert", "--from", "hf", "--to", "jax", "--quiet", {str(ckpt.parent / "hf")!r}, {str(tmp_path / "jax8")!r}]) == 0
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res, paged = (json.loads(line) for line in r.stdout.strip().splitlines()[-2:])
    assert res == {"sharded": True, "replicated": False, "params_sharded": True}
    assert paged == {"pool": True, "pool_split": True}
    assert read_jsonl(tmp_path / "gen8.jsonl") == read_jsonl(tmp_path / "gen1.jsonl")
    assert read_jsonl(tmp_path / "gen8paged.jsonl") == read_jsonl(tmp_path / "gen1.jsonl")
    one = {x["id"]: x for x in read_jsonl(tmp_path / "score1.jsonl")}
    for x in read_jsonl(tmp_path / "score8.jsonl"):
        np.testing.assert_allclose(x["logprobs"], one[x["id"]]["logprobs"], rtol=1e-5, atol=1e-5)
    assert len(one) == 4
    want = checkpoint.restore_params(ckpt)[1]
    got = checkpoint.restore_params(tmp_path / "jax8")[1]
    jax.tree.map(np.testing.assert_array_equal, got, want)


# ------------------------------------------------------------------- text and chat with the real vocab


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A dim-16 model with the real 128K vocabulary (random weights): text, chat and score plumbing."""
    from llama3_jax.model.config import ModelConfig
    cfg = ModelConfig(vocab_size=128256, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                      intermediate_size=32, max_seq_len=64, dtype="float32")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda a: a * 20 if a.ndim > 1 else a, params)  # far from ties
    d = tmp_path_factory.mktemp("big") / "ckpt"
    checkpoint.save_params(d, dataclasses.replace(cfg), params)
    return d, Generator(d, dtype="float32")


def test_text_and_chat_prompts_and_text_scoring(big_vocab, tmp_path, capsys):
    from llama3_jax.serve.offline import run_generate, run_score
    d, g = big_vocab
    tok = g.tokenizer
    text = "The capital of France is"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    lines = [{"id": "p", "prompt": text}, {"id": "p_ids", "tokens": tok.encode(text, bos=True, eos=False)},
             {"id": "m", "messages": messages}, {"id": "m_ids", "tokens": tok.encode_dialog(messages)},
             {"id": "bad_role", "messages": [{"role": "robot", "content": "x"}]}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_generate(gen_args(d, inp, out, batch_size=4, max_new_tokens=8, ignore_eos=True), generator=g)
    assert re.search(r"in\.jsonl:5: skipped: .*role", capsys.readouterr().err)
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"p", "p_ids", "m", "m_ids"}
    assert rows["p"] == {**rows["p_ids"], "id": "p"} and rows["m"] == {**rows["m_ids"], "id": "m"}
    assert rows["p"]["text"] == tok.decode(rows["p"]["tokens"]) and len(rows["p"]["tokens"]) == 8

    completion = " Paris, of course."
    score_in, score_out = tmp_path / "score.jsonl", tmp_path / "score_out.jsonl"
    score_in.write_text("".join(json.dumps(x) + "\n" for x in [
        {"id": 1, "prompt": text, "completion": completion},
        {"id": 2, "prompt_tokens": tok.encode(text, bos=True, eos=False),
         "completion_tokens": tok.encode(completion, bos=False, eos=False)},
        {"id": 3, "prompt": text},
    ]))
    run_score(gen_args(d, score_in, score_out, batch_size=2), generator=g)
    assert re.search(r"score\.jsonl:3: skipped", capsys.readouterr().err)
    rows = {r["id"]: r for r in read_jsonl(score_out)}
    assert set(rows) == {1, 2}
    assert rows[1]["tokens"] == tok.encode(completion, bos=False, eos=False)
    assert rows[1]["logprobs"] == rows[2]["logprobs"] and len(rows[1]["logprobs"]) == len(rows[1]["tokens"])
    assert rows[1]["sum_logprob"] == pytest.approx(sum(rows[1]["logprobs"]))
    summary = run_score(gen_args(d, score_in, score_out, batch_size=2), generator=g)  # resume: nothing left
    assert (summary["sequences"], summary["already_done"]) == (0, 2) and len(read_jsonl(score_out)) == 2

    # default stop tokens: the tokenizer's <|end_of_text|>, <|eom_id|>, <|eot_id|> and the config's eos_ids
    assert set(g.default_stop_ids()) == {tok.eos_id, tok.eom_id, tok.eot_id} | set(g.cfg.eos_ids)


# ------------------------------------------------------- no max_new_tokens: to a stop or the context's end


def test_without_max_new_tokens_rows_run_to_the_end_of_the_context(gen, monkeypatch):
    """Each row may generate max_seq_len - its length tokens. The cache starts at FIRST_CHUNK new slots
    (lowered here so the 128-token context takes two doublings) and grows while a row has room: the
    tokens equal one uninterrupted run, sampled rows included (their keys fold in the step), and a stop
    token in a later chunk still ends its row."""
    monkeypatch.setattr(slots, "FIRST_CHUNK", 32)  # both batching paths read it
    ctx, sampler = gen.cfg.max_seq_len, TopP(p=0.9)
    prompts = ragged_prompts([3, 20, 40], seed=6)

    def run(max_new, stop_ids=None):
        return dict(x for b in gen.generate_batches(prompts, max_new, sampler, seed=5, ignore_eos=stop_ids is None,
                                                      stop_ids=stop_ids, batch_size=4, decode_text=False) for x in b)

    full = run(ctx - min(map(len, prompts)))  # one chunk; longer rows just run past their budget
    room = {i: ctx - len(p) for i, p in enumerate(prompts)}
    got = run(None)
    for i in room:
        assert (got[i].tokens, got[i].finish_reason) == (full[i].tokens[:room[i]], "length"), i
    stop = next(t for t in full[0].tokens[40:room[0]] if t not in full[0].tokens[:40])
    got = run(None, stop_ids=[stop])
    for i in room:
        want = full[i].tokens[:room[i]]
        want, reason = (want[:want.index(stop)], "stop") if stop in want else (want, "length")
        assert (got[i].tokens, got[i].finish_reason) == (want, reason), i
    assert got[0].finish_reason == "stop"


def test_generate_defaults_fit_the_context_and_error_lines_are_tried_again(gen, ckpt, tmp_path, capsys):
    """The default --max-new-tokens is "to the end of the context", not a number that may not fit; an
    error line from an earlier run (here: an explicit budget too large) is retried on a rerun and
    replaced, so every id ends up once, with a result."""
    from llama3_jax import cli
    from llama3_jax.serve.offline import run_generate
    ctx = gen.cfg.max_seq_len
    prompts = ragged_prompts([100, 120], seed=7)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "tokens": p}) + "\n" for i, p in enumerate(prompts)))
    argv = ["generate", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out), "--dtype", "float32",
            "--ignore-eos"]
    first = run_generate(cli.build_parser().parse_args(argv + ["--max-new-tokens", "20"]), generator=gen)
    assert (first["prompts"], first["errors"], first["all_failed"]) == (1, 1, False)
    assert "error" in {r["id"]: r for r in read_jsonl(out)}["p1"]
    args = cli.build_parser().parse_args(argv)
    assert args.max_new_tokens is None
    capsys.readouterr()
    again = run_generate(args, generator=gen)
    assert "trying again 1 ids" in capsys.readouterr().err
    assert (again["prompts"], again["errors"], again["already_done"]) == (1, 0, 1)
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == ["p0", "p1"]
    p1 = {r["id"]: r for r in rows}["p1"]
    assert (len(p1["tokens"]), p1["finish_reason"]) == (ctx - 120, "length")


def test_every_line_failing_is_said_and_exits_1(ckpt, tmp_path, capsys):
    from llama3_jax import cli
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": 1, "tokens": [1] * 120}) + "\n" + '{"id": 2\n')
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
                   "--max-new-tokens", "16"])
    err = capsys.readouterr().err
    assert rc == 1 and "generate: every line failed: 0 prompts" in err, err
    # (some lines failing is not all: test_generate_defaults_fit_the_context_... sees all_failed False)


def test_score_errors_name_the_field_and_the_part_too_long(gen, ckpt, tmp_path, capsys):
    from llama3_jax.serve.offline import run_score
    lines = [{"id": 1, "messages": [{"role": "user", "content": "hi"}]},
             {"id": 2, "prompt_tokens": [1, 2], "completion_tokens": [3, VOCAB]},
             {"id": 3, "prompt_tokens": [1] * 10, "completion_tokens": [2] * 130},
             {"id": 4, "prompt_tokens": [1] * 130, "completion_tokens": [2]}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run_score(gen_args(ckpt, inp, out), generator=gen)
    err = capsys.readouterr().err
    for lineno, what in [(1, "score takes 'prompt' \\+ 'completion' .* not 'messages'"),
                         (2, f"'completion_tokens': token id {VOCAB} \\(position 1\\) is outside"),
                         (3, "completion of 130 tokens after a prompt of 10 tokens exceeds the model's context of "
                             "128 tokens \\(at most 118 completion tokens fit\\)"),
                         (4, "prompt of 130 tokens is longer than the model's context of 128")]:
        assert re.search(rf"in\.jsonl:{lineno}: .*{what}", err), (lineno, err)
    assert summary["all_failed"] and "score: every line failed" in err


def test_generate_and_score_help_give_every_default():
    from llama3_jax import cli
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("generate", "score", "convert"):
        for action in subs[name]._actions:
            if action.option_strings and not action.required and not isinstance(action, argparse._HelpAction):
                assert "(default: " in (action.help or ""), (name, action.option_strings)
    assert "(default: 8)" in " ".join(subs["score"].format_help().split())  # %(default)s is filled in


def test_messages_for_a_tokenizer_without_chat_format_are_skipped_in_one_line(gen, ckpt, tmp_path, capsys):
    from llama3_jax.serve.offline import run_generate
    from llama3_jax.tokenizer import ByteTokenizer
    g = Generator(cfg=gen.cfg, params=stack_layer_params(gen.params), dtype="float32", split_layers=False,
                  tokenizer=ByteTokenizer())
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": 1, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    summary = run_generate(gen_args(ckpt, inp, out), generator=g)
    assert re.search(r"in\.jsonl:1: skipped: 'messages' needs Llama 3's chat format.*ByteTokenizer",
                     capsys.readouterr().err)
    assert summary["all_failed"]


def test_num_samples_lines_are_independent_of_batching(gen, ckpt, tmp_path):
    """--num-samples 3 at temperature 1: one line per (id, sample); the same tokens at batch size 8 and
    2; sample 0 is what a single-sample run draws; a rerun finds everything done. A line's "n" does the
    same for that line alone, and resumes per sample."""
    from llama3_jax.serve.offline import run_generate
    prompts = ragged_prompts([4, 9, 17], seed=8)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "tokens": p}) + "\n" for i, p in enumerate(prompts)))
    runs = {}
    for bs in (8, 2):
        out = tmp_path / f"out{bs}.jsonl"
        run_generate(gen_args(ckpt, inp, out, batch_size=bs, temperature=1.0, num_samples=3), generator=gen)
        runs[bs] = {(r["id"], r["sample"]): r["tokens"] for r in read_jsonl(out)}
    assert sorted(runs[8]) == [(f"q{i}", k) for i in range(3) for k in range(3)]
    assert runs[8] == runs[2]
    assert len({tuple(runs[8][("q2", k)]) for k in range(3)}) > 1  # different random streams
    single = tmp_path / "single.jsonl"
    run_generate(gen_args(ckpt, inp, single, temperature=1.0), generator=gen)
    assert {r["id"]: r["tokens"] for r in read_jsonl(single)} == {f"q{i}": runs[8][(f"q{i}", 0)] for i in range(3)}
    again = run_generate(gen_args(ckpt, inp, tmp_path / "out8.jsonl", temperature=1.0, num_samples=3), generator=gen)
    assert again["already_done"] == 3 and len(read_jsonl(tmp_path / "out8.jsonl")) == 9
    # a line's own "n" overrides --num-samples; its samples are the same draws; a bad n skips the line.
    # 16 rows, and 8 on the resume: the batch-8 programs compiled above serve both runs
    lines = [{"id": "q0", "tokens": prompts[0], "n": 6}, {"id": "q1", "tokens": prompts[1]},
             {"id": "q2", "tokens": prompts[2], "n": 9}, {"id": "bad", "tokens": prompts[0], "n": 0}]
    per_line = tmp_path / "per_line.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run_generate(gen_args(ckpt, inp, per_line, temperature=1.0), generator=gen)
    assert summary["skipped_lines"] == 1
    got = {(r["id"], r.get("sample")): r["tokens"] for r in read_jsonl(per_line)}
    assert sorted(got, key=str) == sorted([("q0", k) for k in range(6)] + [("q1", None)]
                                          + [("q2", k) for k in range(9)], key=str)
    assert got[("q1", None)] == runs[8][("q1", 0)]
    assert all(got[(i, k)] == runs[8][(i, k)] for i in ("q0", "q2") for k in range(3))
    # resume: only the missing samples are generated again, with the same draws
    rows = [x for x in read_jsonl(per_line) if x["id"] != "q2" or x["sample"] == 0]
    per_line.write_text("".join(json.dumps(x) + "\n" for x in rows))
    again = run_generate(gen_args(ckpt, inp, per_line, temperature=1.0), generator=gen)
    assert again["already_done"] == 2 and again["prompts"] == 1
    assert {(r["id"], r.get("sample")): r["tokens"] for r in read_jsonl(per_line)} == got
