"""One run at a time per workdir (WORKDIR/.lock) or output file (OUTPUT.lock).

What goes wrong without it: a second `train` into a workdir that a first run is still writing resumes
from the first run's checkpoint, fails on "checkpoint step N already exists", rewrites
train_config.json with its own settings and interleaves metrics.jsonl, and both exit as if fine; two
`generate` runs on one output file run every row twice and tear each other's lines. So whatever
writes there takes this lock first, before it reads or writes anything, and a second comer gets a
one-line error (`Locked`, an OSError: the CLI prints it as its one line, exit status 2) naming the
holder: host, pid, the time that process started.

How the design keeps that true:
  * the lock is a file of JSON {host, pid, start_time, start_ticks, created, renewed, token} that
    appears whole or not at all: written to a temporary file, then hard-linked to its name (the link
    fails when the name exists: an atomic O_EXCL create that NFS honours too); where hard links are
    not supported, O_CREAT|O_EXCL and then the write;
  * a lock left by a process that died (kill -9, a crash, a lost container) must not block forever.
    On the same host (the same host name AND the same pid namespace) the holder is asked directly:
    a pid that is gone, or a pid now used by another process (its start time in /proc/PID/stat
    differs from the recorded one), means the lock is taken over at once;
  * another host (a shared file system, or a container on this host with its own pid namespace)
    cannot be asked: the holder renews `renewed` every `renew` seconds from a daemon thread, and the
    lock is taken over once it has not been renewed for `lease` seconds. A crashed host blocks its
    workdir for at most one lease. This assumes the hosts' clocks agree to well within
    lease - renew (NTP does); a holder paused longer than a lease (a frozen VM) loses the lock, and
    its renewer says so on stderr when it wakes;
  * taking over is race-safe: a taker first claims the very stale lock it judged, by creating (as
    above, exclusively) a claim file named after a hash of that lock's bytes; the one taker holding
    the claim checks that the lock still has those bytes and replaces it with its own in one rename
    (there is never a moment without a lock file for a third taker to slip into), then drops the
    claim. The others wait for it and then find a live lock: of several takers one wins, the others
    get `Locked`. A claim left by a taker that died in those microseconds is judged as a lock is;
  * `release` (also at interpreter exit) removes the file only while it is still this holder's (its
    token), and removes again the directories it had to create when they are empty, so a run refused
    after taking the lock leaves nothing behind.

Settings: `lease` and `renew` (seconds) as arguments, else $LLAMA3_JAX_LOCK_LEASE (default 120) and
$LLAMA3_JAX_LOCK_RENEW (default lease / 6). Multi-process jobs hold one lock, process 0's (the callers
take it through `multihost_io.on_main`, so every process hears of a refusal).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

LEASE_ENV, RENEW_ENV = "LLAMA3_JAX_LOCK_LEASE", "LLAMA3_JAX_LOCK_RENEW"
DEFAULT_LEASE = 120.0
_IMPORTED = time.time()  # where /proc is missing: the best guess of this process's start time


class Locked(OSError):
    """Another live process holds the lock; the message is one line naming it."""


def _proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # after "(comm)": field 3 is index 0


def _process_start(ticks: int | None) -> float:
    """Wall-clock start of this process: boot time + its start ticks, else the time of this import."""
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK") if ticks is not None else _IMPORTED
    except (OSError, StopIteration, ValueError):
        return _IMPORTED


def host_identity() -> str:
    """This host's name, and its pid namespace where there is one: containers that share a host name
    but not their processes are different hosts here (their pids cannot be checked from each other)."""
    try:
        return f"{socket.gethostname()}/pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "?"


def describe(held: dict) -> str:
    """'host H, pid P, started T' of a lock record."""
    if "host" not in held:
        return "an unreadable lock file (delete it if no run uses this)"
    return f"host {held.get('host', '?')}, pid {held.get('pid', '?')}, started {_when(held.get('start_time'))}"


def _alive(pid, ticks) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    now = _proc_start_ticks(pid)
    return not (isinstance(ticks, int) and now is not None and now != ticks)  # else the pid was reused


class Lock:
    """The lock at `path` for `what` ("workdir runs/x", "output out.jsonl"): `acquire()`, `release()`,
    or `with Lock(...):`. `host`: this process's host identity (default `host_identity()`)."""

    def __init__(self, path, what: str, *, lease: float | None = None, renew: float | None = None,
                 host: str | None = None):
        self.path, self.what = Path(path), what
        self.lease = float(lease if lease is not None else os.environ.get(LEASE_ENV, DEFAULT_LEASE))
        self.renew = float(renew if renew is not None else os.environ.get(RENEW_ENV, self.lease / 6))
        if not 0 < self.renew < self.lease:
            raise ValueError(f"lock {self.path}: need 0 < renew < lease, got renew {self.renew}s, lease {self.lease}s "
                             f"(${RENEW_ENV}, ${LEASE_ENV})")
        self.host = host or host_identity()
        self.token: str | None = None
        self.record: dict = {}
        self._made: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "Lock":
        """Take the lock, or raise `Locked` naming the holder. A stale lock is taken over (one line on stderr)."""
        if self.token is not None:
            raise RuntimeError(f"lock {self.path} is already held by this Lock")
        self._make_parents()
        token, ticks = uuid.uuid4().hex, _proc_start_ticks(os.getpid())
        now = time.time()
        self.record = {"host": self.host, "pid": os.getpid(), "start_time": _process_start(ticks),
                       "start_ticks": ticks, "created": now, "renewed": now, "token": token}
        try:
            deadline = time.time() + 30  # another taker's takeover in progress is waited for this long
            while time.time() < deadline:  # each pass: create, else judge the holder; a lost race goes round
                if self._create(self.path, self.record):
                    return self._held(token)
                raw = self._read()
                if raw is None:
                    continue  # released between our create and our read
                held = _parse(raw, self.path)
                reason = self._stale(held)
                if reason is None:
                    raise Locked(f"{self.path}: {self.what} is in use by another run ({describe(held)}); "
                                 f"wait for it to finish or stop it")
                if self._take_over(raw, held, reason):
                    return self._held(token)
            raise Locked(f"{self.path}: {self.what}: could not take the lock, other processes keep taking it")
        except BaseException:
            self._remove_made()
            raise

    def release(self) -> None:
        """Stop renewing; remove the lock file if it is still ours, and the directories `acquire` made if empty."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.token is not None:
            raw = self._read()
            if raw is not None and _parse(raw, self.path).get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.token = None
            atexit.unregister(self.release)
        self._remove_made()

    # ----------------------------------------------------------------------------------------- steps

    def _held(self, token: str) -> "Lock":
        self.token = token
        atexit.register(self.release)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lock-renew {self.path}", daemon=True)
        self._thread.start()
        return self

    def _make_parents(self) -> None:
        missing = []
        for d in [self.path.parent, *self.path.parent.parents]:
            if d.exists():
                break
            missing.append(d)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing  # deepest first

    def _remove_made(self) -> None:
        for d in self._made:
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
        self._made = []

    def _tmp(self, kind: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def _create(self, path: Path, record: dict) -> bool:
        """Create the file `path` (the lock, or a takeover claim) whole with `record`; False when it exists."""
        data = json.dumps(record).encode()
        tmp = self._tmp("new")
        try:
            _write(tmp, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE, SMB mounts): O_EXCL, then the write
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _stale(self, held: dict) -> str | None:
        """Why the holder no longer holds the lock, or None while it does."""
        if held.get("host") == self.host:
            if _alive(held.get("pid"), held.get("start_ticks")):
                return None
            return f"its process (pid {held.get('pid')}) is no longer running"
        renewed = held.get("renewed")
        if not isinstance(renewed, (int, float)):
            renewed = held.get("mtime", 0.0)  # unreadable: judged by the file's age
        age = time.time() - renewed
        return f"not renewed for {age:.0f}s (lease {self.lease:g}s)" if age > self.lease else None

    def _take_over(self, raw: bytes, held: dict, reason: str) -> bool:
        """Replace the stale lock `raw` by ours under a claim on exactly those bytes; False when another
        taker holds the claim (it is waited for), or the lock changed (go round again)."""
        claim = self.path.with_name(f".{self.path.name}.takeover-{hashlib.sha256(raw).hexdigest()[:16]}")
        self.record["created"] = self.record["renewed"] = time.time()
        if not self._create(claim, self.record):
            try:
                claimed = claim.read_bytes()
            except FileNotFoundError:
                return False
            if self._stale(_parse(claimed, claim)) is not None:
                claim.unlink(missing_ok=True)  # its taker died between claiming and replacing
            else:
                time.sleep(0.02)  # another taker is replacing the lock now
            return False
        try:
            if self._read() != raw:  # renewed, released or replaced since we judged it
                return False
            tmp = self._tmp("new")
            _write(tmp, json.dumps(self.record).encode())
            os.replace(tmp, self.path)
        finally:
            claim.unlink(missing_ok=True)
        print(f"{self.path}: took over the lock of {describe(held)}: {reason}", file=sys.stderr, flush=True)
        return True

    def _renew_loop(self) -> None:
        """Every `renew` seconds: `renewed` = now, while the file is still ours; else one warning, and stop."""
        while not self._stop.wait(self.renew):
            raw = self._read()
            held = _parse(raw, self.path) if raw is not None else {}
            if held.get("token") != self.token:
                by = f" by {describe(held)}" if held else ""
                print(f"{self.path}: warning: this run lost its lock on {self.what} (taken over{by}); another "
                      f"run may write there now", file=sys.stderr, flush=True)
                return
            self.record["renewed"] = time.time()
            tmp = self._tmp("renew")
            try:
                _write(tmp, json.dumps(self.record).encode())
                os.replace(tmp, self.path)
            except OSError:  # a passing file-system hiccup: the next renewal tries again
                tmp.unlink(missing_ok=True)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _parse(raw: bytes, path: Path) -> dict:
    """A lock record; an unreadable one (written by hand, cut by a disk fault) as {"mtime": its age's start}."""
    try:
        held = json.loads(raw)
        if isinstance(held, dict):
            return held
    except ValueError:
        pass
    try:
        return {"mtime": path.stat().st_mtime}
    except OSError:
        return {"mtime": 0.0}
