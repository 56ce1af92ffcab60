"""Pods: process start-up (jax.distributed from keys, flags or the cluster), the local launcher, the
hybrid ICI x DCN mesh, generate's --num-shards with tools/merge_outputs.py, and generate / score /
the checkpoint integrity check across processes.

The multi-process tests start real processes on 127.0.0.1 (gloo, fake CPU devices per process) through
tools/launch_local.py, the way a pod starts one process per host."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama3_jax.parallel import distributed
from llama3_jax.cli import main as cli_main
from llama3_jax.parallel.distributed import DistributedConfig
from llama3_jax.parallel.sharding import hybrid_device_array

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import launch_local  # noqa: E402
import merge_outputs  # noqa: E402
from test_generate import ckpt, gen, gen_args, hf_model, ragged_prompts, read_jsonl  # noqa: E402,F401 (fixtures)
from train_helpers import base_overrides, train_losses, write_corpus  # noqa: E402

CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX", distributed.AUTO_ENV)


@pytest.fixture
def no_cluster(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_a_cluster_is_detected_only_when_it_has_several_processes(no_cluster):
    assert distributed.detect_cluster() is None
    assert distributed.initialize(DistributedConfig()) is False  # a plain run starts nothing, never waits
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        no_cluster.setenv(k, v)
    no_cluster.setenv("SLURM_NTASKS", "1")
    assert distributed.detect_cluster() is None
    no_cluster.setenv("SLURM_NTASKS", "2")
    assert distributed.detect_cluster() == "slurm"
    no_cluster.setenv(distributed.AUTO_ENV, "0")
    assert distributed.detect_cluster() is None
    no_cluster.delenv(distributed.AUTO_ENV)
    for k in [*slurm, "SLURM_NTASKS"]:
        no_cluster.delenv(k)
    no_cluster.setenv("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.0.0.1:1")
    no_cluster.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.detect_cluster() == "openmpi"


def test_bad_distributed_settings_are_one_line_errors(no_cluster, tmp_path, capsys):
    with pytest.raises(ValueError, match="HOST:PORT"):
        DistributedConfig(coordinator_address="10.0.0.2")
    with pytest.raises(ValueError, match="process_id 2 is not below .*num_processes 2"):
        DistributedConfig("10.0.0.2:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes, process_id missing"):
        distributed.initialize(DistributedConfig(coordinator_address="127.0.0.1:1234"))
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    rc = cli_main(["generate", "--checkpoint", str(tmp_path), "--input", str(inp), "--output", str(tmp_path / "o"),
                   "--coordinator-address", "127.0.0.1:1234", "--process-id", "0"])
    assert rc == 2 and "num_processes missing" in capsys.readouterr().err
    rc = cli_main(["train", "distributed.num_processes=2", "distributed.process_id=5"])
    assert rc == 2 and "distributed.process_id 5 is not below" in capsys.readouterr().err


def test_bad_mesh_flags_are_one_line_errors(tmp_path, capsys):
    import jax
    from llama3_jax.parallel.sharding import inference_mesh, parse_mesh
    assert parse_mesh("data=1, fsdp=1,tensor=-1") == {"data": 1, "fsdp": 1, "tensor": -1} and parse_mesh(None) == {}
    assert dict(inference_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": len(jax.devices())}
    for text, why in [("data=x", "data='x' is not an integer"), ("pipe=2", "'pipe=2' is not AXIS=SIZE"),
                      ("tensor=2,tensor=2", "tensor given twice"), ("dcn_data=-1", "dcn_data must be >= 1")]:
        with pytest.raises(ValueError, match=why):
            parse_mesh(text)
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    rc = cli_main(["score", "--checkpoint", str(tmp_path), "--input", str(inp), "--output", str(tmp_path / "o"),
                   "--mesh", "tensor=two"])
    assert rc == 2 and "error: --mesh 'tensor=two': tensor='two' is not an integer" in capsys.readouterr().err
    rc = cli_main(["convert", "--from", "jax", "--to", "hf", str(tmp_path), str(tmp_path / "hf"), "--mesh", "tensor=1"])
    assert rc == 2 and "--mesh applies only to --to jax output, not --to hf" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int = 0
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


@pytest.mark.parametrize("ici,dcn", [((1, 2, 2), (2, 1, 1)), ((2, 1, 1), (2, 2, 1)), ((1, 1, 2), (1, 3, 1))])
def test_hybrid_mesh_without_slice_info_lays_out_devices_as_mesh_utils_does(ici, dcn):
    """A slice is a process's devices, or with one process a run of consecutive devices; either way the
    layout is the one create_hybrid_device_mesh gives devices that carry that slice_index."""
    from jax.experimental import mesh_utils
    n_slices, per = int(np.prod(dcn)), int(np.prod(ici))
    order = np.random.default_rng(0).permutation(n_slices * per)  # device ids in no particular order
    ids = lambda arr: np.vectorize(lambda d: d.id)(arr)  # noqa: E731
    tagged = [FakeDevice(int(i), slice_index=k // per) for k, i in enumerate(order)]
    expected = ids(mesh_utils.create_hybrid_device_mesh(ici, dcn, tagged))
    one_process = [FakeDevice(d.id) for d in tagged]
    by_process = [FakeDevice(d.id, process_index=d.slice_index) for d in reversed(tagged)][::-1]
    for devices in (one_process, by_process):
        arr = hybrid_device_array(devices, ici, dcn)
        assert arr.shape == tuple(a * b for a, b in zip(ici, dcn))
        np.testing.assert_array_equal(ids(arr), expected)
    with pytest.raises(ValueError, match="processes"):
        hybrid_device_array([FakeDevice(i, process_index=i % (n_slices + 1)) for i in range(n_slices * per)], ici, dcn)


def test_num_shards_over_three_runs_plus_the_merge_equals_one_run(gen, ckpt, tmp_path, capsys):
    from llama3_jax.serve.offline import run_generate

    prompts = ragged_prompts([3, 9, 5, 12, 2, 7, 4], seed=3)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}" if i % 2 else i, "tokens": p}) + "\n"
                           for i, p in enumerate(prompts)))
    sampled = dict(temperature=1.0, max_new_tokens=6, ignore_eos=True)
    run_generate(gen_args(ckpt, inp, tmp_path / "one.jsonl", batch_size=4, **sampled), generator=gen)
    out = tmp_path / "out.jsonl"
    for i in range(3):  # three "machines", each with its own batches
        run_generate(gen_args(ckpt, inp, out, batch_size=2, num_shards=3, shard_index=i, **sampled), generator=gen)
    shards = sorted(tmp_path.glob("out-*-of-00003.jsonl"))
    assert [len(read_jsonl(s)) for s in shards] == [3, 2, 2]  # lines 1,4,7 / 2,5 / 3,6
    assert merge_outputs.main(["--input", str(inp), "--output", str(out), "--num-shards", "3"]) == 0
    one = {json.dumps(r["id"]): r for r in read_jsonl(tmp_path / "one.jsonl")}
    ids = [json.loads(line)["id"] for line in inp.read_text().splitlines()]
    assert read_jsonl(out) == [one[json.dumps(i)] for i in ids]  # input order, each id once, same tokens

    lines = shards[1].read_text().splitlines()  # a shard that lost an answer: the merge names the id
    shards[1].write_text(lines[0] + "\n")
    capsys.readouterr()
    assert merge_outputs.main(["--input", str(inp), "--output", str(out), "--num-shards", "3"]) == 1
    missing = json.loads(lines[1])["id"]
    assert f"1 input ids have no output in any shard: {json.dumps(missing)}" in capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(out)] == [i for i in ids if i != missing]


def test_merge_keeps_every_sample_of_num_samples_runs_and_names_a_missing_one(gen, ckpt, tmp_path, capsys):
    """--num-samples 2 over two shards, merged: each id's lines in sample order, equal to one run; a
    sample lost from a shard is named (exit status 1), the id's other sample kept."""
    from llama3_jax.serve.offline import run_generate

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"s{i}", "tokens": p}) + "\n"
                           for i, p in enumerate(ragged_prompts([5, 2, 8], seed=4))))
    sampled = dict(temperature=1.0, max_new_tokens=4, ignore_eos=True, num_samples=2)
    run_generate(gen_args(ckpt, inp, tmp_path / "one.jsonl", batch_size=2, **sampled), generator=gen)
    out = tmp_path / "out.jsonl"
    for i in range(2):
        run_generate(gen_args(ckpt, inp, out, batch_size=2, num_shards=2, shard_index=i, **sampled), generator=gen)
    assert merge_outputs.main(["--input", str(inp), "--output", str(out), "--num-shards", "2"]) == 0
    one = {(r["id"], r["sample"]): r for r in read_jsonl(tmp_path / "one.jsonl")}
    assert read_jsonl(out) == [one[(f"s{i}", k)] for i in range(3) for k in range(2)]

    shard = tmp_path / "out-00001-of-00002.jsonl"  # lines 2: s1's two samples; lose sample 1
    kept = [line for line in shard.read_text().splitlines() if json.loads(line)["sample"] == 0]
    shard.write_text("".join(line + "\n" for line in kept))
    capsys.readouterr()
    assert merge_outputs.main(["--input", str(inp), "--output", str(out), "--num-shards", "2"]) == 1
    assert '1 samples are in no shard: "s1" sample 1' in capsys.readouterr().err
    assert read_jsonl(out) == [one[key] for key in [("s0", 0), ("s0", 1), ("s1", 0), ("s2", 0), ("s2", 1)]]


# ------------------------------------------------------------------ several processes (slow: real processes)


def _launch(n: int, devices: int, command: list[str], env_extra: dict | None = None, **popen) -> subprocess.Popen:
    """`llama3-jax COMMAND...` on n local processes x `devices` fake CPU devices, through the launcher."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="", **(env_extra or {}))
    cmd = [sys.executable, str(ROOT / "tools" / "launch_local.py"), "-n", str(n), "--cpu-devices", str(devices),
           "--", sys.executable, "-m", "llama3_jax.cli", *command]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, **popen)


def _run(n: int, devices: int, command: list[str]) -> str:
    """Run to the end; returns stderr (every process's), asserting exit status 0."""
    proc = _launch(n, devices, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    return err


def _train(n: int, devices: int, overrides: list[str], **env: str) -> None:
    proc = _launch(n, devices, ["train", *overrides], env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pods") / "corpus.jsonl")


def test_two_by_four_processes_train_as_one_by_eight_and_resume_on_either(corpus, tmp_path):
    """One mesh shape (two "slices" of 2x2 over the data-center axis: dcn_data=2, data=1, fsdp=2,
    tensor=2) on 1 process x 8 devices and on 2 processes x 4: the same losses, step by step; and a
    checkpoint written by either process count continues on the other with the losses of the
    uninterrupted run (the data order does not depend on the process count). The 2 -> 1 run's workdir
    is a local:// URL (remote.py): 2 processes stage in a shared LLAMA3_JAX_STAGING and process 0
    uploads; the 1-process run pulls the latest complete step into its own staging directory."""
    mesh = {"mesh.dcn_data": 2, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "checkpoint_every": 3,
            "keep_checkpoints": 5, "data.eval_fraction": 0.0}
    ref = tmp_path / "ref"
    _train(1, 8, base_overrides(ref, corpus, steps=5, **mesh))  # the uninterrupted 1 x 8 run
    expected = train_losses(ref)
    assert sorted(expected) == [1, 2, 3, 4, 5]

    two_then_one = tmp_path / "bucket" / "two_then_one"
    url, cache = f"local://{two_then_one}", {"LLAMA3_JAX_CACHE": str(tmp_path / "cache")}
    _train(2, 4, base_overrides(url, corpus, steps=3, **mesh), LLAMA3_JAX_STAGING=str(tmp_path / "staging"), **cache)
    _train(1, 8, base_overrides(url, corpus, steps=5, **mesh), **cache)

    one_then_two = tmp_path / "one_then_two"  # the reference's step-3 checkpoint, continued on 2 x 4
    one_then_two.mkdir()
    for name in ("config.json", "train_config.json", "3"):
        copy = shutil.copytree if (ref / name).is_dir() else shutil.copy
        copy(ref / name, one_then_two / name)
    _train(2, 4, base_overrides(one_then_two, corpus, steps=5, **mesh))

    got = train_losses(two_then_one)
    assert sorted(got) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([got[s] for s in range(1, 6)], [expected[s] for s in range(1, 6)], rtol=1e-4)
    got = train_losses(one_then_two)
    np.testing.assert_allclose([got[4], got[5]], [expected[4], expected[5]], rtol=1e-4)


def _last_step(workdir: Path) -> int:
    """The last step in metrics.jsonl (complete lines only: the file is being written)."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if '"loss"' in line), default=0)


def _start_two(overrides: list[str], workdir: Path, after_step: int, logs: Path) -> list[subprocess.Popen]:
    """Two training processes (1 fake device each, stderr to logs/I.txt), once step `after_step` is logged."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    logs.mkdir(exist_ok=True)
    procs = [subprocess.Popen(launch_local.process_command(
                 [sys.executable, "-m", "llama3_jax.cli", "train", *overrides], address, 2, i),
                 cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, stdout=subprocess.DEVNULL,
                 stderr=open(logs / f"{i}.txt", "w"))
             for address in [f"127.0.0.1:{launch_local.free_port()}"] for i in range(2)]
    deadline = time.monotonic() + 300
    while _last_step(workdir) < after_step:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.2)
    return procs


def test_sigterm_to_one_process_stops_all_and_a_killed_one_fails_the_other_within_60s(corpus, tmp_path):
    from llama3_jax.store import checkpoint
    workdir = tmp_path / "run"
    overrides = base_overrides(workdir, corpus, steps=100_000, checkpoint_every=100_000,
                               **{"mesh.data": 2, "mesh.fsdp": 1, "distributed.heartbeat_timeout": 10})
    procs = _start_two(overrides, workdir, 1, tmp_path / "logs")
    try:
        procs[1].send_signal(signal.SIGTERM)  # one process only: both stop at one step, one checkpoint
        rcs = [p.wait(timeout=120) for p in procs]
        errs = [(tmp_path / "logs" / f"{i}.txt").read_text() for i in range(2)]
        assert rcs == [0, 0], errs[0][-2000:] + errs[1][-2000:]
        saved = checkpoint.latest_step(workdir)
        assert saved == _last_step(workdir) and "train: preempted (SIGTERM), saved" in errs[0]

        procs = _start_two(overrides, workdir, saved + 1, tmp_path / "logs")  # resumed; now one process dies
        procs[1].kill()
        killed = time.monotonic()
        rc = procs[0].wait(timeout=60)
        assert rc != 0 and time.monotonic() - killed < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_each_process_prints_its_own_errors_with_its_id(tmp_path):
    """generate on two processes (started with the flags): process 0 finds the input missing, and every
    process reports it (with its id) and exits 2, none waiting for the others."""
    proc = _launch(2, 1, ["generate", "--checkpoint", str(tmp_path), "--input", str(tmp_path / "in.jsonl"),
                          "--output", str(tmp_path / "out.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    for i in range(2):
        assert f"[process {i}] llama3-jax generate: error: input file not found: {tmp_path / 'in.jsonl'}" in err
    assert not (tmp_path / "out.jsonl").exists()


def _lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_on_two_by_four_processes_gives_the_tokens_of_one_process_and_resumes(gen, ckpt, tmp_path):
    """One global batch over 2 processes x 4 devices (default mesh: data 2 x tensor 4), continuous
    batching with refills (batch 2, ragged budgets, some rows sampled): the lines of a one-process run.
    Process 0 alone reads the input, 2 lines to run at a time (--read-lines: three pieces, the last
    one empty but for the bad line, reported once), resumes (two ids already in the output are not run
    again) and writes; the one-process run read it as one piece."""
    from llama3_jax.serve.offline import run_generate

    prompts = ragged_prompts([3, 9, 5, 12, 2, 7], seed=5)
    rows = [{"id": i if i % 2 else f"g{i}", "tokens": p, "max_new_tokens": 3 + i, **({"temperature": 1.0} if i % 3 == 0 else {})}
            for i, p in enumerate(prompts)]
    inp = _lines(tmp_path / "in.jsonl", rows)
    with open(inp, "a") as f:
        f.write('{"id": "broken", "tokens": [1, 2\n')
    run_generate(gen_args(ckpt, inp, tmp_path / "one.jsonl", batch_size=2), generator=gen)
    one = read_jsonl(tmp_path / "one.jsonl")
    out = _lines(tmp_path / "out.jsonl", one[:2])
    err = _run(2, 4, ["generate", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
                      "--dtype", "float32", "--batch-size", "2", "--max-new-tokens", "16", "--read-lines", "2"])
    got = read_jsonl(out)
    key = lambda r: json.dumps(r["id"])  # noqa: E731
    assert len(got) == len(one) and got[:2] == one[:2]
    assert sorted(got, key=key) == sorted(one, key=key)
    assert err.count("skipped: invalid JSON") == 1 and "4 prompts" in err and "2 already in" in err


def test_score_on_two_by_four_processes_gives_the_log_probs_of_one_process(gen, ckpt, tmp_path):
    """--mesh data=2,fsdp=2,tensor=2 over 2 processes x 4 devices, the input sent 2 lines at a time
    (--read-lines): every row's log-probs as one process computes them from one piece (float32; the
    sharded sums round differently, 1e-5)."""
    from llama3_jax.serve.offline import run_score

    rng = np.random.RandomState(6)
    inp = _lines(tmp_path / "in.jsonl", [{"id": i, "prompt_tokens": rng.randint(0, 211, n).tolist(),
                                          "completion_tokens": rng.randint(0, 211, 9 - n).tolist()}
                                         for i, n in enumerate([3, 1, 5, 7, 2])])
    run_score(gen_args(ckpt, inp, tmp_path / "one.jsonl", batch_size=4), generator=gen)
    _run(2, 4, ["score", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                "--dtype", "float32", "--batch-size", "4", "--mesh", "data=2,fsdp=2,tensor=2", "--read-lines", "2"])
    one = {r["id"]: r for r in read_jsonl(tmp_path / "one.jsonl")}
    got = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert sorted(got) == sorted(one) == list(range(5))
    for i, r in got.items():
        assert r["tokens"] == one[i]["tokens"]
        np.testing.assert_allclose(r["logprobs"], one[i]["logprobs"], rtol=1e-5, atol=1e-5)


CORRUPT_CHILD = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60)
from llama3_jax.store import checkpoint
print("STEP", checkpoint.latest_intact_step(workdir, set_aside=True))
"""


def test_a_corrupt_step_is_found_and_set_aside_by_process_0_alone(ckpt, tmp_path):
    """Two processes resume from a workdir whose newest step has a flipped byte: process 0 checks the
    files, reports and renames the step to STEP.corrupt; both take the older step."""
    from llama3_jax.store import checkpoint
    workdir = tmp_path / "run"
    shutil.copytree(ckpt, workdir)
    cfg, params = checkpoint.restore_params(ckpt)
    checkpoint.save_params(workdir, cfg, params, step=1)
    victim = max((p for p in (workdir / "1").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    port = str(launch_local.free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, "-c", CORRUPT_CHILD, str(i), port, str(workdir)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert ["STEP 0" in out for out, _ in outs] == [True, True]
    assert ["step 1 is corrupt" in err for _, err in outs] == [True, False]
    assert (workdir / "1.corrupt").is_dir() and not (workdir / "1").exists() and checkpoint.all_steps(workdir) == [0]
