"""Rollouts from live parameters (serve/rollout.py) against the engine, transformers and one device.

One tiny random `LlamaForCausalLM` (vocab 262: the byte tokenizer's ids fit; init scaled up so logits
are far from ties) is converted once. The oracles: a separate `Generator` restored from the checkpoint
(not through the rollout's jitted transform) running the same requests, the same rows decoded without
any stop id (a row's draws depend on its key and step only, so its stopped completion is the prefix
before the first stop id of the unstopped row), transformers' greedy `generate`, and a subprocess on 8
fake devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.serve.engine import Generator
from llama3_jax.serve.rollout import Rollout, RolloutConfig, row_stream
from llama3_jax.serve.sampling import TopP
from llama3_jax.store import checkpoint
from llama3_jax.tokenizer import load_tokenizer

from conftest import make_hf_llama

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
N, G, SEED = 12, 4, 7  # max_completion_length, generations per prompt, the run's seed
TEXTS = ["hello world", "abc", "the llama packs rows"]
# a deterministic change of every weight (the "next step's" params), the same source in the subprocess
PERTURB = "lambda p: jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), p)"
perturb = jax.jit(eval(PERTURB))
SAMPLING = dict(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hf model, checkpoint dir, cfg, float32 stacked params, prompts, the reference engine)."""
    from llama3_jax.convert import convert
    d = tmp_path_factory.mktemp("rollout")
    hf = make_hf_llama(d / "hf", vocab=262, init_range=0.2)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    cfg, params = checkpoint.restore_params(d / "jax")
    tok = load_tokenizer("bytes")
    prompts = [tok.encode(t, bos=True, eos=False) for t in TEXTS]
    ref = Generator(d / "jax", dtype="float32", tokenizer=tok)
    return hf, d / "jax", cfg, params, prompts, ref


def requests(gen, prompts, step=0, indices=None):
    """The rollout's rows as engine requests, by the documented rule (row_stream)."""
    indices = range(len(prompts)) if indices is None else indices
    out = []
    for i, p in zip(indices, prompts):
        for k in range(G):
            a, b = row_stream(SEED, step, i, k)
            out.append(gen.request(p, N, TopP(SAMPLING["top_p"], SAMPLING["temperature"]), seed=a, row_seed=b))
    return out


def run(gen, reqs, **kw):
    done = {}
    for part in gen.generate_requests(reqs, decode_text=False, **kw):
        done.update(part)
    return [done[i] for i in range(len(reqs))]


@pytest.fixture(scope="module")
def free_rows(setup):
    """Every row decoded to N tokens with no stop id (the reference engine)."""
    _, _, _, _, prompts, ref = setup
    return [c.tokens for c in run(ref, requests(ref, prompts), ignore_eos=True, batch_size=5)]


@pytest.fixture(scope="module")
def rollout(setup, free_rows):
    """Stop ids taken from the free rows (so some rows stop and some run to N): row 0's 6th token, row
    5's 3rd."""
    _, _, cfg, params, _, _ = setup
    stops = (free_rows[0][5], free_rows[5][2])
    return Rollout(cfg, params, RolloutConfig(max_completion_length=N, stop_ids=stops, batch_size=16, **SAMPLING),
                   tokenizer=load_tokenizer("bytes"), dtype="float32")


def expected(free_rows, stops):
    """(completion, stop token or -1) of each row: the free row cut before its first stop id."""
    out = []
    for row in free_rows:
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        out.append((row, -1) if cut is None else (row[:cut], row[cut]))
    return out


def test_rollout_rows_are_the_engines_rows_cut_at_the_first_stop_id(setup, free_rows, rollout):
    _, _, _, _, prompts, ref = setup
    b = rollout.sample(prompts, G, SEED)
    want = expected(free_rows, rollout.stop_ids)
    assert [(c, int(s)) for c, s in zip(b.completions, b.stop_token)] == want
    assert 0 < int(b.truncated.sum()) < len(want)  # both endings occur
    assert b.lengths.tolist() == [len(c) for c, _ in want]
    assert b.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(G)]
    assert b.generation.tolist() == list(range(G)) * len(prompts)
    assert b.tokens == sum(len(c) + (s >= 0) for c, s in want) and b.rollout_seconds > 0
    assert b.completion_ids() == [c + [s] if s >= 0 else c for c, s in want]
    # the engine itself with the same stop ids (5 decode slots, the rollout's 16: rows do not depend on it)
    got = run(ref, requests(ref, prompts), stop_ids=rollout.stop_ids, batch_size=5)
    assert [c.tokens for c in got] == b.completions
    assert [c.finish_reason == "length" for c in got] == b.truncated.tolist()
    ids, mask = b.padded(N + 1)
    assert ids.shape == (len(want), N + 1) and mask.sum() == b.tokens


def test_same_seed_same_rows_and_each_row_has_its_own_stream(setup, rollout):
    _, _, _, _, prompts, _ = setup
    a = rollout.sample(prompts, G, SEED, step=3)
    assert rollout.sample(prompts, G, SEED, step=3).completions == a.completions
    assert rollout.sample(prompts, G, SEED, step=4).completions != a.completions
    assert rollout.sample(prompts, G, SEED + 1, step=3).completions != a.completions
    assert len({tuple(c) for c in a.completions}) > len(prompts)  # generations of one prompt differ
    # a prompt keeps its rows when it comes alone under its global index (a resume, another process split)
    alone = rollout.sample([prompts[2]], G, SEED, step=3, prompt_indices=[2])
    assert alone.completions == a.completions[2 * G:]
    assert alone.prompt_index.tolist() == [2] * G


def compiles_during(fn) -> int:
    seen = []
    listener = lambda event, duration, **kw: seen.append(event) if event == "/jax/core/compile/backend_compile_duration" else None  # noqa: E731,E501
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(seen)


def test_set_params_swaps_weights_without_recompiling(setup, rollout):
    hf, ckpt, cfg, params, prompts, _ = setup
    new = perturb(params)
    rollout.set_params(new)
    b = rollout.sample(prompts, G, SEED)  # warm: every program of this shape compiled
    fresh = Generator(cfg=cfg, params=new, dtype="float32", tokenizer=load_tokenizer("bytes"))
    got = run(fresh, requests(fresh, prompts), stop_ids=rollout.stop_ids, batch_size=5)
    assert [c.tokens for c in got] == b.completions
    rollout.set_params(params)
    a = rollout.sample(prompts, G, SEED)
    assert a.completions != b.completions

    def two_steps():
        for p in (new, params):
            rollout.set_params(p)
            rollout.sample(prompts, G, SEED)
    assert compiles_during(two_steps) == 0
    assert compiles_during(lambda: jax.jit(lambda x: x * 3)(np.ones(3))) == 1  # the counter does see compiles
    # the engine refuses arrays it did not compile for, naming one
    with pytest.raises(ValueError, match=r"set_params: \['embed'\] is bfloat16"):
        rollout.engine.set_params({**rollout.engine.params, "embed": rollout.engine.params["embed"].astype(jnp.bfloat16)})


def test_greedy_rows_equal_transformers(setup):
    hf, _, cfg, params, prompts, _ = setup
    greedy = Rollout(cfg, params, RolloutConfig(max_completion_length=N, temperature=0.0, batch_size=8),
                     tokenizer=load_tokenizer("bytes"), dtype="float32")
    assert greedy.stop_ids == [2, 257, 260]  # the config's eos_ids, the byte tokenizer's end_of_text and eot_id
    b = greedy.sample(prompts[:2], 2, SEED)
    hf.generation_config.eos_token_id = None
    for i, p in enumerate(prompts[:2]):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=N, pad_token_id=0)[0, len(p):].tolist()
        [(want, stop)] = expected([out], greedy.stop_ids)
        assert b.completions[2 * i] == b.completions[2 * i + 1] == want
        assert int(b.stop_token[2 * i]) == stop


def test_bad_prompts_and_settings_are_refused_in_one_line(setup, rollout):
    _, _, _, _, prompts, _ = setup
    with pytest.raises(ValueError, match=r"^prompt 5: prompt of 120 tokens \+ max_new_tokens 12 exceeds"):
        rollout.sample([prompts[0], [1] * 120], 2, SEED, prompt_indices=[4, 5])
    with pytest.raises(ValueError, match=r"^prompt 1: token id 999 \(position 1\) is outside"):
        rollout.sample([prompts[0], [1, 999]], 2, SEED)
    with pytest.raises(ValueError, match="num_generations must be an integer >= 1"):
        rollout.sample(prompts, 0, SEED)
    with pytest.raises(ValueError, match="'top_p' must be in"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError, match="'max_completion_length' must be an integer >= 1"):
        RolloutConfig(max_completion_length=0)


def test_eight_devices_give_one_devices_rows(setup, rollout, tmp_path):
    """data=2 x fsdp=2 x tensor=2 in a subprocess: the params restored sharded as training holds them,
    rows of the checkpoint's weights and of the perturbed ones, with no compile on a repeated step."""
    _, ckpt, _, params, prompts, _ = setup
    rollout.set_params(params)
    one = rollout.sample(prompts, G, SEED, step=1)
    rollout.set_params(perturb(params))
    two = rollout.sample(prompts, G, SEED, step=2)
    code = textwrap.dedent(f"""
        import json, sys, jax, jax.numpy as jnp
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_rollout import compiles_during
        from llama3_jax.parallel.sharding import make_mesh
        from llama3_jax.serve.rollout import Rollout, RolloutConfig
        from llama3_jax.store import checkpoint
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        cfg, params = checkpoint.restore_params({str(ckpt)!r}, mesh)
        new = jax.jit({PERTURB})(params)
        r = Rollout(cfg, params, RolloutConfig(**{dict(max_completion_length=N, stop_ids=tuple(rollout.stop_ids),
                                                        batch_size=16, **SAMPLING)!r}), mesh=mesh, dtype="float32")
        one = r.sample({prompts!r}, {G}, {SEED}, step=1)
        r.set_params(new)
        two = r.sample({prompts!r}, {G}, {SEED}, step=2)
        def again():
            r.set_params(params); r.sample({prompts!r}, {G}, {SEED}, step=1)
        n = compiles_during(again)
        wq = r.engine.params["layers"][0]["wq"]
        print(json.dumps(dict(one=one.completions, two=two.completions, stops=[one.stop_token.tolist(), two.stop_token.tolist()],
                              compiles=n, sharded=not wq.sharding.is_fully_replicated)))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["one"] == one.completions and got["two"] == two.completions
    assert got["stops"] == [one.stop_token.tolist(), two.stop_token.tolist()]
    assert got["compiles"] == 0 and got["sharded"]


def test_min_prompt_width_one_prefill_for_every_prompt_length(setup, free_rows, rollout):
    """Generator(min_prompt_width=N): prompts of other length buckets (12 and 21 ids: widths 16 and 32)
    share one padded width, so a step with new prompt lengths compiles nothing (an RL run's rollouts,
    train/rl.py), and the rows are the unpadded engine's rows."""
    _, _, cfg, params, prompts, _ = setup
    settings = RolloutConfig(max_completion_length=N, stop_ids=tuple(rollout.stop_ids), batch_size=16, **SAMPLING)
    want = expected(free_rows, rollout.stop_ids)
    for floor, compiles in ((32, 0), (0, 1)):  # without the floor the 16-wide prompt compiles its prefill
        r = Rollout(cfg, params, settings, tokenizer=load_tokenizer("bytes"), dtype="float32", min_prompt_width=floor)
        r.sample([prompts[2]], G, SEED, prompt_indices=[2])  # warm: the 32-wide programs
        got = []
        n = compiles_during(lambda: got.append(r.sample([prompts[0]], G, SEED, prompt_indices=[0])))
        assert (n == 0) if compiles == 0 else (n > 0), (floor, n)
        assert [(c, int(s)) for c, s in zip(got[0].completions, got[0].stop_token)] == want[:G]
    with pytest.raises(ValueError, match="min_prompt_width must be >= 0"):
        Rollout(cfg, params, settings, dtype="float32", min_prompt_width=-1)


def test_a_prompts_generations_are_prefilled_once(setup, rollout):
    """The G requests of one prompt, admitted together, share one prefill (scheduler._group_args: the
    distinct prompts prefilled, their cache rows and logits copied); the rows equal the engine's with
    one request per call, where nothing is shared."""
    _, _, _, params, prompts, ref = setup
    rollout.set_params(params)
    rollout.sample(prompts, G, SEED, step=5)  # the scheduler exists
    before = rollout.engine._scheduler.prefilled_rows
    b = rollout.sample(prompts, G, SEED, step=5)
    assert rollout.engine._scheduler.prefilled_rows - before == len(prompts)  # not len(prompts) * G
    alone = run(ref, requests(ref, prompts, step=5), stop_ids=rollout.stop_ids, batch_size=1)
    assert [c.tokens for c in alone] == b.completions
