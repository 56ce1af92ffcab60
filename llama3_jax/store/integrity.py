"""Checksums of checkpoint step directories: a manifest written after a save completes, checked
before a restore, so a truncated, missing or bit-flipped file is found instead of restored.

Orbax's commit (the step directory renamed from its `*.orbax-checkpoint-tmp` name once every item is
written) says a save finished; it says nothing about what happened to the files afterwards (a disk
filling up under a copy, bit rot, a partial rsync, someone "fixing" a file). The manifest
`STEP/llama3_jax_manifest.json` lists every file of the step with its size and sha256:

    {"format": "llama3-jax-manifest", "files": {"params/ocdbt.process_0/d/53dc...": [size, "sha256"], ...}}

It is written atomically (temp + rename) by process 0 once the step is committed, so a step has
either a complete manifest or none. A step without one (saved before manifests existed, or killed
between orbax's commit and the manifest) is trusted on orbax's commit alone. Hashing runs at about
the disk's read speed (sha256 ~1-2 GB/s per core): seconds for a small model, a minute for an 8B
model with its optimizer state.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MANIFEST = "llama3_jax_manifest.json"
FORMAT = "llama3-jax-manifest"
_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(f".{MANIFEST}"))


def seal(step_dir: str | Path) -> None:
    """Write the manifest of a committed step directory (every file's size and sha256)."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _sha256(p)] for p in _files(step_dir)}
    fd, tmp = tempfile.mkstemp(dir=step_dir, prefix=f".{MANIFEST}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "files": files}, f, indent=0)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, step_dir / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_sealed(step_dir: str | Path) -> bool:
    return (Path(step_dir) / MANIFEST).is_file()


def verify(step_dir: str | Path) -> str | None:
    """None if every file listed in the manifest is there with its size and checksum (or there is no
    manifest: see the module docstring); else what is wrong, naming the first bad file."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        assert data.get("format") == FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST}: unreadable"
    for rel, (size, digest) in sorted(files.items()):
        p = step_dir / rel
        if not p.is_file():
            return f"{rel}: missing"
        actual = p.stat().st_size
        if actual != size:
            return f"{rel}: {actual} bytes, {size} were written" + (" (truncated)" if actual < size else "")
        if _sha256(p) != digest:
            return f"{rel}: checksum mismatch (the file changed after it was written)"
    return None
