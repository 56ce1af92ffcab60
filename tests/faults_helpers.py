"""The kill-anywhere harness of tests/test_faults_kill.py: run a CLI command, SIGKILL it at a chosen
moment, run the very same command again, and so on until it finishes.

A kill moment is either a named kill point (llama3_jax/failpoints.py: the process kills itself at an
exact place, e.g. while an async checkpoint is being written) or "when `ready()` turns true, plus a
random delay" (from outside, like a preempted host).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# one persistent compilation cache for every subprocess of the fault tests in this pytest session
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="llama3_jax_faults_cache_"))
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "llama3_jax.cli", *map(str, args)]


def cli_env(cache_dir: Path = SESSION_CACHE, **extra) -> dict:
    """CPU, this checkout first on the path, a shared persistent compilation cache (a rerun does not
    recompile, as a user's would not)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache_dir))
    env.pop("LLAMA3_JAX_KILL_AT", None)
    env.update(extra)
    return env


def run_killed_at(cmd: list[str], env: dict, point: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd` armed to SIGKILL itself at kill point `point` ("name" or "name:N"); it must die there."""
    proc = subprocess.run(cmd, env=dict(env, LLAMA3_JAX_KILL_AT=point), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == -9, f"not killed at {point} (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def run_killed_when(cmd: list[str], env: dict, ready: Callable[[], bool], delay: float,
                    timeout: float = 300) -> int | None:
    """Start `cmd`, wait until `ready()` (or the process ends), sleep `delay` seconds, SIGKILL it.
    Returns the exit status when the run ended by itself first, else None (it was killed)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while not ready() and proc.poll() is None:
            assert time.time() < deadline, "timed out waiting for the kill moment"
            time.sleep(0.005)
        if proc.poll() is None:
            time.sleep(delay)
        if proc.poll() is not None:
            err = proc.stderr.read().decode()
            assert proc.returncode == 0, f"rc {proc.returncode}:\n{err[-3000:]}"
            return proc.returncode
        proc.kill()
        proc.wait()
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def run_ok(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_killed_then_rerun(cmd: list[str], workdir: Path, point: str, env: dict | None = None) -> int:
    """Run a `train` command armed to SIGKILL itself at `point`, then the same command to the end; it
    must say it resumed from the latest checkpoint the killed run left. Returns that step."""
    from llama3_jax.store import checkpoint
    env = env or cli_env()
    run_killed_at(cmd, env, point)
    resumed_from = checkpoint.latest_step(workdir)
    done = run_ok(cmd, env)
    assert resumed_from is not None and f"resumed {workdir} at step {resumed_from}" in done.stderr, \
        done.stderr[-2000:]
    return resumed_from


def count_lines(path: Path) -> int:
    try:
        return Path(path).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0
