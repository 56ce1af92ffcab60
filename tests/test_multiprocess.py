"""Two local processes under jax.distributed (gloo on 127.0.0.1), one CPU device each, one mesh:
each process keeps its rows of one global data order, and a run resumed from a checkpoint continues
exactly, because the data-iterator state is in the checkpoint."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from llama3_jax.store import checkpoint
from train_helpers import base_overrides, read_metrics, train_losses, write_corpus

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60)
    from llama3_jax import train
    summary = train.run_train(None, overrides)
    print("SUMMARY " + json.dumps({"process": pid, "devices": jax.device_count(), "step": summary["step"]}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(overrides: list[str]) -> list[dict]:
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(pid), port, *overrides], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("SUMMARY "))[8:]))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("mp") / "corpus.jsonl")


def test_two_processes_resume_exactly(corpus, tmp_path):
    # one held-out document: one process's eval share is empty, and it feeds padding batches while
    # the other evaluates (every eval step is a collective both must run)
    common = dict(checkpoint_every=3, eval_every=3, eval_batches=2,
                  **{"mesh.data": 2, "mesh.fsdp": 1, "data.eval_fraction": 1e-9})
    full = tmp_path / "full"
    summaries = run_two_processes(base_overrides(full, corpus, steps=6, **common))
    assert [s["devices"] for s in summaries] == [2, 2] and [s["step"] for s in summaries] == [6, 6]

    # every process's iterator state is saved; they agree (each reads the same global order)
    with checkpoint.manager(full) as m:
        data = m.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    assert data["process_count"] == 2 and len(data["states"]) == 2 and data["states"][0] == data["states"][1]

    split = tmp_path / "split"
    run_two_processes(base_overrides(split, corpus, steps=3, **common))
    run_two_processes(base_overrides(split, corpus, steps=6, **common))
    assert train_losses(split) == train_losses(full)
    assert sorted(train_losses(full)) == list(range(1, 7))
    evals = [r for r in read_metrics(full) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval_tokens"] > 0 for r in evals)
