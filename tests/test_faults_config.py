"""Layouts that cannot work are refused with one clear line before anything is compiled or allocated:
mesh sizes that do not multiply to the device count, q heads that do not split over the tensor axis,
batch rows that do not split over the data axes.

One subprocess with 4 fake CPU devices runs each bad `llama3-jax train` and counts XLA compilations
with jax.monitoring (the backend-compile event): zero for every refused run, and more than zero for
the good control run, so the counter is live.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from faults_helpers import cli_env
from train_helpers import base_overrides, write_corpus

SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    import jax
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None)
    from llama3_jax import cli
    results = []
    for args in json.loads(sys.argv[1]):
        del compiles[:]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(["train", *args])
        results.append({"rc": rc, "err": err.getvalue(), "compiles": len(compiles)})
    print(json.dumps(results))
""")

CASES = {
    "mesh": ({"mesh.data": 3, "mesh.fsdp": 1, "mesh.tensor": 1},
             "mesh: data*fsdp*tensor = 3*1*1 = 3, but there are 4 devices"),
    "heads": ({"mesh.fsdp": 1, "mesh.tensor": 4, "model": "{preset: test-small, vocab_size: 262, n_heads: 6}"},
              "the model's n_heads = 6 does not split evenly over mesh.tensor = 4"),
    "batch": ({"mesh.data": 2, "mesh.fsdp": 2, "batch_size": 6},
              "batch_size/grad_accum = 6 sequences do not split over the 4 batch shards"),
}


def test_bad_layouts_are_refused_before_any_compile(tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl")
    runs = [base_overrides(tmp_path / name, corpus, steps=1, **extra) for name, (extra, _) in CASES.items()]
    runs.append(base_overrides(tmp_path / "good", corpus, steps=1, **{"mesh.fsdp": 2, "mesh.tensor": 2}))
    env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.pop("JAX_COMPILATION_CACHE_DIR")  # a cache hit would not count as a compile in the control run
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (name, (_, message)), r in zip(CASES.items(), results):
        lines = r["err"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1 and message in lines[0], (name, r["err"])
        assert r["compiles"] == 0, name
        assert not (tmp_path / name).exists(), name
    good = results[-1]
    assert good["rc"] == 0 and good["compiles"] > 0, good["err"][-2000:]
