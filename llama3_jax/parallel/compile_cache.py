"""JAX's persistent compilation cache, on by default for every command that compiles a model.

Why: a restarted job (train after a preemption, every `generate`, a `serve` restart) otherwise pays
the XLA compile of the same programs again: seconds on the tiny models, minutes on large ones. With
the cache, a program compiled once by any run is read back from disk by the next.

Where (the first that is set): `--compile-cache DIR` (train: the `compile_cache` key), JAX's own
$JAX_COMPILATION_CACHE_DIR, $LLAMA3_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/llama3-jax/xla
(~/.cache/llama3-jax/xla). `none` turns it off.

What can go wrong, and what this file does about it:
  * several processes write the same entry (the processes of one job: JAX writes from process 0
    only; independent jobs sharing a directory: any of them): each entry is written to a temp file
    and renamed into place, so a reader finds a whole entry or none, never a half-written one (JAX's
    own writer truncates and writes in place);
  * a torn or corrupt entry (a crash on a filesystem without atomic rename, a bad disk, a stray
    edit): each entry carries its length and crc32; one that does not match is a miss (one warning
    line), and the program compiled again replaces it;
  * a directory that cannot be made or written (read-only, a file in the way, a full disk): one
    warning line, and the run goes on compiling without the cache (writes stop after the first
    failure);
  * the cache holds code: whoever can write it can run code in our processes (JAX's own warning),
    so the directory is made readable by its owner only.
Every program is cached, however fast it compiled (JAX's default skips those under a second, which
are all of a tiny model's, and on a CPU many of a large one's add up to seconds).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
import tempfile
import zlib
from pathlib import Path

ENV = "LLAMA3_JAX_COMPILE_CACHE"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
_MAGIC = b"L3JXCC1\n"
_HEADER = struct.Struct("<QI")  # payload length, crc32
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama3-jax" / "xla"


def resolve(value: str | None) -> Path | None:
    """The directory a run uses (None: off), from the flag / key `value`, the environment, the default."""
    for v in (value, os.environ.get(JAX_ENV), os.environ.get(ENV)):
        if v:
            return None if v.strip().lower() == "none" else Path(v).expanduser()
    return default_dir()


def warn(msg: str) -> None:
    print(f"llama3-jax: warning: {msg}", file=sys.stderr, flush=True)


def _base():
    """JAX's private cache interface; `object` where a JAX release has moved it (then `enable` leaves
    JAX's own writer in place rather than breaking every command at import)."""
    try:
        from jax._src.compilation_cache_interface import CacheInterface
    except ImportError:
        return object
    return CacheInterface


class FileCache(_base()):
    """One file per entry: magic, length, crc32, the payload (JAX's compressed executable)."""

    def __init__(self, path: Path):
        self.path = self._path = Path(path)
        self.writable, self.warned = True, set()

    def _file(self, key: str) -> Path:
        name = key if _SAFE_NAME.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()
        return self.path / (name + ".bin")

    def _warn_once(self, kind: str, msg: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warn(msg)

    def get(self, key: str) -> bytes | None:
        f = self._file(key)
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once("read", f"compile cache {self.path}: cannot read an entry ({e.strerror or e}); "
                                    "compiling it again")
            return None
        head = len(_MAGIC) + _HEADER.size
        if data[:len(_MAGIC)] == _MAGIC and len(data) >= head:
            n, crc = _HEADER.unpack_from(data, len(_MAGIC))
            payload = data[head:]
            if len(payload) == n and zlib.crc32(payload) == crc:
                return payload
        self._warn_once("corrupt", f"compile cache {self.path}: entry {f.name} is corrupt; compiling it again "
                                   "(the new entry replaces it)")
        return None

    def put(self, key: str, value: bytes) -> None:
        if not self.writable:
            return
        data = _MAGIC + _HEADER.pack(len(value), zlib.crc32(value)) + value
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-", suffix=".bin")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self._file(key))
        except OSError as e:
            self.writable = False
            warn(f"compile cache {self.path}: cannot write ({e.strerror or e}); going on without saving programs")
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def clear(self) -> None:  # JAX's interface; never called by JAX itself
        for f in self.path.glob("*.bin"):
            f.unlink(missing_ok=True)


def _usable(path: Path) -> str | None:
    """None when `path` is a directory we can write (made if missing, 0700), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def enable(value: str | None = None, where: str = "--compile-cache") -> Path | None:
    """Point this process's JAX at the cache `value` resolves to (see the module docstring), before
    its first compile. Returns the directory, or None when off or unusable (warned in one line)."""
    import jax
    from jax._src import compilation_cache as cc
    path = resolve(value)
    if path is not None:
        why = _usable(path)
        if why is not None:
            warn(f"{where} {path} cannot be used ({why}); compiling without a compile cache")
            path = None
    cc.reset_cache()  # forget what an earlier call (tests, notebooks) or JAX's first compile decided
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is None:
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if FileCache.__mro__[1] is not object and hasattr(cc, "_cache_initialized_mutex"):
        with cc._cache_initialized_mutex:
            cc._cache, cc._cache_initialized = FileCache(path), True
    return path
