#!/usr/bin/env python
"""Start N processes of one llama3-jax command on this machine, as a pod would start one per host.

    python tools/launch_local.py -n 2 --cpu-devices 4 -- llama3-jax train --config configs/tiny.yaml
    python tools/launch_local.py -n 2 -- llama3-jax generate --checkpoint ckpt --input in.jsonl --output out.jsonl

Every process gets the same command line plus its place in the job: `distributed.coordinator_address=
127.0.0.1:PORT distributed.num_processes=N distributed.process_id=I` for `train`, the flags
`--coordinator-address --num-processes --process-id` for the other commands. `--cpu-devices K` gives each
process K fake CPU devices (what the tests use). The launcher exits with the first non-zero status of
any process; once one has failed, the others get `--grace` seconds to stop by themselves (a dead peer
makes them fail within the heartbeat timeout) before they are killed. SIGTERM / Ctrl-C is passed on.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_command(command: list[str], address: str, n: int, i: int) -> list[str]:
    """`command` with process i's distributed keys (train) or flags (generate, score, convert)."""
    if "train" in command:
        return [*command, f"distributed.coordinator_address={address}", f"distributed.num_processes={n}",
                f"distributed.process_id={i}"]
    return [*command, "--coordinator-address", address, "--num-processes", str(n), "--process-id", str(i)]


def launch(command: list[str], n: int, *, cpu_devices: int | None = None, port: int | None = None,
           env: dict | None = None, popen_kwargs: dict | None = None) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{port or free_port()}"
    env = dict(os.environ if env is None else env)
    if cpu_devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
    return [subprocess.Popen(process_command(command, address, n, i), env=env, **(popen_kwargs or {}))
            for i in range(n)]


def wait(procs: list[subprocess.Popen], grace: float = 90.0) -> int:
    """The first non-zero exit status (0 if all succeed); kills stragglers `grace` s after a failure."""
    failed_at, rc = None, 0
    while any(p.poll() is None for p in procs):
        for p in procs:
            if p.returncode not in (None, 0) and failed_at is None:
                failed_at, rc = time.monotonic(), p.returncode
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    print(f"launch_local: killing process {i} ({grace:.0f}s after a peer failed)", file=sys.stderr)
                    p.kill()
        time.sleep(0.2)
    return rc or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices per process (JAX_PLATFORMS=cpu)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds the others get to stop after one process failed (default: %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")
    if args.num_processes < 1:
        p.error("-n must be >= 1")
    procs = launch(command, args.num_processes, cpu_devices=args.cpu_devices, port=args.port)

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return wait(procs, args.grace)


if __name__ == "__main__":
    sys.exit(main())
