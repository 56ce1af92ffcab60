"""One run at a time per workdir / output file (llama3_jax/store/lock.py), and its wiring into `train`,
`generate` and `score`.

Unit tests drive real lock files with short leases: a second taker is refused in one line naming the
holder; a dead holder on this host and an expired foreign lease are taken over; a live foreign holder
that renews is not; of many simultaneous takers of a stale lock exactly one wins. End to end: two real
`train` processes on one workdir (the second refused, the first's records intact) and generate/score
refused on an output file another process holds.

The lock module is imported inside the tests, so the end-to-end tests also run (and fail) on a tree
without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from train_helpers import base_overrides, read_metrics, write_corpus

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
HOLDER = """
import sys, time
from llama3_jax.store.lock import Lock
lock = Lock(sys.argv[1], "workdir x").acquire()
print("held", flush=True)
time.sleep(120)
"""


def lock_module():
    from llama3_jax.store import lock
    return lock


def start_holder(path, **env) -> subprocess.Popen:
    """A real process holding the lock at `path` (renewing per $LLAMA3_JAX_LOCK_RENEW) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=dict(ENV, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def write_record(path: Path, **fields) -> None:
    now = time.time()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 4242, "start_time": now - 60, "start_ticks": None,
                                "created": now - 60, "renewed": now, "token": "theirs", **fields}))


# ------------------------------------------------------------------------------------------ unit


def test_second_taker_gets_one_line_naming_the_holder(tmp_path):
    lock = lock_module()
    path = tmp_path / "run" / ".lock"
    first = lock.Lock(path, "workdir run").acquire()
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid() and record["host"] == lock.host_identity()
    with pytest.raises(lock.Locked) as e:
        lock.Lock(path, "workdir run").acquire()  # the same live process counts as a holder too
    msg = str(e.value)
    assert isinstance(e.value, OSError) and "\n" not in msg
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["start_time"]))
    assert f"workdir run is in use by another run (host {record['host']}, pid {os.getpid()}, started {started})" in msg
    assert json.loads(path.read_text())["token"] == record["token"]  # the refused taker changed nothing
    first.release()
    assert not path.exists()
    with lock.Lock(path, "workdir run"):  # free again
        assert path.exists()
    assert not path.exists()


def test_a_refused_lock_leaves_no_directory_and_release_keeps_another_holders_file(tmp_path):
    lock = lock_module()
    path = tmp_path / "a" / "b" / ".lock"
    held = lock.Lock(path, "x").acquire()
    held.release()
    assert not (tmp_path / "a").exists()  # the directories the lock made are gone again, being empty
    mine = lock.Lock(path, "x").acquire()
    write_record(path)  # taken over behind our back (e.g. our host froze past the lease)
    mine.release()
    assert json.loads(path.read_text())["token"] == "theirs"


def test_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    lock = lock_module()
    path = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_record(path, host=lock.host_identity(), pid=int(dead.stdout), renewed=time.time())
    with lock.Lock(path, "workdir w", lease=600):  # no waiting for a lease: the pid is gone
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over the lock of host {lock.host_identity()}, pid {int(dead.stdout)}" in capsys.readouterr().err
    # a pid that is alive but now another process (its start time differs): taken over too
    ticks = lock._proc_start_ticks(os.getpid())
    if ticks is None:
        pytest.skip("no /proc: pid reuse cannot be told")
    write_record(path, host=lock.host_identity(), pid=os.getpid(), start_ticks=ticks - 1)
    with lock.Lock(path, "w"):
        assert json.loads(path.read_text())["start_ticks"] == ticks


def test_a_foreign_lease_is_taken_over_only_once_expired(tmp_path):
    lock = lock_module()
    path = tmp_path / ".lock"
    write_record(path, renewed=time.time() - 3)
    with pytest.raises(lock.Locked, match="host elsewhere, pid 4242"):
        lock.Lock(path, "w", lease=5, renew=1).acquire()
    write_record(path, renewed=time.time() - 6)
    with lock.Lock(path, "w", lease=5, renew=1):
        assert json.loads(path.read_text())["host"] == lock.host_identity()


def test_a_live_foreign_holder_that_renews_is_not_taken_over(tmp_path):
    """A real holder process renewing every 0.2 s, seen from "another host" with a 1 s lease: refused for
    well past the lease; once the holder is killed (a crashed host), taken over after one lease."""
    lock = lock_module()
    path = tmp_path / ".lock"
    holder = start_holder(path, LLAMA3_JAX_LOCK_RENEW="0.2", LLAMA3_JAX_LOCK_LEASE="1")
    try:
        first = json.loads(path.read_text())["renewed"]
        deadline = time.time() + 2.5
        while time.time() < deadline:
            with pytest.raises(lock.Locked, match=f"pid {holder.pid}"):
                lock.Lock(path, "w", lease=1, renew=0.5, host="another-host").acquire()
            time.sleep(0.25)
        assert json.loads(path.read_text())["renewed"] > first + 1.5  # it did renew
    finally:
        stop(holder)
    with pytest.raises(lock.Locked):  # just crashed: its lease still runs
        lock.Lock(path, "w", lease=1, renew=0.5, host="another-host").acquire()
    time.sleep(1.3)
    with lock.Lock(path, "w", lease=1, renew=0.5, host="another-host"):
        assert json.loads(path.read_text())["host"] == "another-host"


def test_of_many_takers_of_a_stale_lock_exactly_one_wins(tmp_path):
    """Eight takers (threads, each its own host so none can vouch for another's pid) start together on an
    expired lock, fifty times: each time one holds it and seven are refused naming that one."""
    lock = lock_module()
    path = tmp_path / ".lock"
    for _ in range(50):  # a taker that deletes the stale file instead of moving it aside loses ~1 round in 10
        write_record(path, renewed=time.time() - 100)
        barrier, results = threading.Barrier(8), {}

        def take(i):
            taker = lock.Lock(path, "w", lease=10, renew=5, host=f"taker-{i}")
            barrier.wait()
            try:
                results[i] = taker.acquire()
            except lock.Locked as e:
                results[i] = e

        threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, r in results.items() if isinstance(r, lock.Lock)]
        assert len(winners) == 1, results
        assert json.loads(path.read_text())["host"] == f"taker-{winners[0]}"
        assert all(f"host taker-{winners[0]}," in str(r) for r in results.values() if isinstance(r, OSError))
        results[winners[0]].release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp or set-aside files left


# ------------------------------------------------------------------------------------------ end to end


def test_a_second_train_into_a_running_workdir_is_refused(tmp_path):
    """Two real `train` processes on one workdir: the second (another lr) exits 2 with one line naming
    the first; the first goes on, its metrics have every step once and train_config.json its own lr."""
    corpus = write_corpus(tmp_path / "docs.jsonl", n_docs=40)
    wd = tmp_path / "run"
    env = dict(ENV, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "llama3_jax.cli", "train"]
    first = subprocess.Popen(cmd + base_overrides(wd, corpus, steps=2000, checkpoint_every=3, log_every=1),
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((wd / "metrics.jsonl").exists() and len(read_metrics(wd)) >= 3):
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        second = subprocess.run(cmd + base_overrides(wd, corpus, steps=2000, **{"optim.lr": 0.5}), env=env,
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip()
        assert "\n" not in line and f"{wd}/.lock: workdir {wd} is in use by another run" in line, line
        assert f"pid {first.pid}, started 20" in line and "host " in line
        n_before = len(read_metrics(wd))
        deadline = time.time() + 60
        while len(read_metrics(wd)) < n_before + 2:  # the first run goes on writing
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0 and "preempted (SIGTERM)" in err, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [r["step"] for r in read_metrics(wd) if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1))  # every step once, none lost, none doubled
    assert json.loads((wd / "train_config.json").read_text())["optim"]["lr"] == 3e-3
    assert not (wd / ".lock").exists()


@pytest.mark.parametrize("command", ["generate", "score"])
def test_generate_and_score_are_refused_on_an_output_another_process_holds(tmp_path, capsys, command):
    """The output's lock is held by another live process: the command exits 2 with one line naming it,
    before reading the checkpoint or touching the output."""
    from llama3_jax import cli
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": 1, "tokens": [1, 2, 3], "prompt_tokens": [1], "completion_tokens": [2]}) + "\n")
    out.write_text('{"id": 0, "text": "x", "tokens": [5], "finish_reason": "length"}\n{"id": 9, "tex')  # torn
    before = out.read_bytes()
    holder = start_holder(tmp_path / "out.jsonl.lock")
    try:
        rc = cli.main([command, "--checkpoint", str(tmp_path / "no-checkpoint"), "--input", str(inp),
                       "--output", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{tmp_path}/out.jsonl.lock: output {out} is in use by another run (host " in err
        assert f"pid {holder.pid}, started " in err
        assert out.read_bytes() == before  # the torn line is the holder's to cut, not ours
    finally:
        stop(holder)


def test_a_dry_run_takes_no_lock(tmp_path, capsys):
    """`train --dry-run` writes nothing into the workdir, so it runs beside a live run (a held lock) and
    leaves that lock and the workdir as they were."""
    from llama3_jax import cli
    lock = lock_module()
    wd = tmp_path / "run"
    with lock.Lock(wd / ".lock", f"workdir {wd}"):
        def holder():  # the lock's record but `renewed`, which our own holder's thread moves on as it should
            return {k: v for k, v in json.loads((wd / ".lock").read_bytes()).items() if k != "renewed"}
        before = holder()
        assert cli.main(["train", f"workdir={wd}", "model={preset: test-small, vocab_size: 262}", "tokenizer=bytes",
                         "batch_size=2", "seq_len=16", "compute_dtype=float32", "--dry-run"]) == 0, \
            capsys.readouterr().err
        assert holder() == before and [p.name for p in wd.iterdir()] == [".lock"]
