"""A live `llama3-jax serve` for the tests that talk to it over a real socket (test_serve,
test_batch_file, test_lm_eval): one way to start it, wait for /health and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(checkpoint, *flags: str, key: str | None = None):
    """(process, url): `llama3-jax serve` on a free port, not waited for (a test may build what it
    compares with meanwhile). `key` None: no API key (LLAMA3_JAX_API_KEY unset)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LLAMA3_JAX_API_KEY"}
    if key is not None:
        env["LLAMA3_JAX_API_KEY"] = key
    proc = subprocess.Popen([sys.executable, "-m", "llama3_jax.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), *flags], stderr=subprocess.PIPE, text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url: str, timeout: float = 120) -> list[int]:
    """The /health statuses the server answered until its first 200 (a failed start: the test fails
    with the server's stderr)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            seen.append(httpx.get(url + "/health", timeout=2).status_code)
            if seen[-1] == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    if not seen or seen[-1] != 200:
        proc.kill()
        pytest.fail(f"the server did not become ready: {proc.communicate()[1]}")
    return seen


def start_server(checkpoint, *flags: str, key: str | None = None):
    """(process, url, seen): launch_server, then wait_ready."""
    proc, url = launch_server(checkpoint, *flags, key=key)
    return proc, url, wait_ready(proc, url)


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
