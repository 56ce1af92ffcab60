"""Checksums of checkpoint step directories: a manifest written after a save completes, checked
before a restore, so a truncated, missing or bit-flipped file is found instead of restored.

Orbax's commit (the step directory renamed from its `*.orbax-checkpoint-tmp` name once every item is
written) says a save finished; it says nothing about what happened to the files afterwards (a disk
filling up under a copy, bit rot, a partial rsync, someone "fixing" a file). The manifest
`STEP/llama3_jax_manifest.json` lists every file of the step with its size and sha256:

    {"format": "llama3-jax-manifest", "files": {"params/ocdbt.process_0/d/53dc...": [size, "sha256"], ...}}

It is written atomically (temp + rename) by process 0 once the step is committed, so a step has
either a complete manifest or none. A step without one (saved before manifests existed, or killed
between orbax's commit and the manifest) is trusted on orbax's commit alone. A manifest that is there
but cannot vouch for the step makes it "not intact", exactly as a truncated file does (the reader
takes the previous step; a training run sets the step aside): unreadable or of another format, an
entry that is not `[size, sha256]`, an empty file list (which would vouch for anything), a name that
leaves the step directory (`../secret`, `/etc/passwd`, a backslash, a symlink out: safe_paths.py; it
would be hashed instead of the step's file) and a file of the step that the manifest does not list
(added or swapped in after sealing: orbax would read it unchecked). These are plain checks, not
asserts, so `python -O` keeps them. Hashing runs at about
the disk's read speed (sha256 ~1-2 GB/s per core): seconds for a small model, a minute for an 8B
model with its optimizer state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from .safe_paths import UnsafePath, inside

MANIFEST = "llama3_jax_manifest.json"
FORMAT = "llama3-jax-manifest"
_CHUNK = 8 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PART = re.compile(r"\..+\.part-\d+")  # remote._get's name for a file still downloading


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    """The step's files, less the manifest, its temp file and a download in flight (remote._get's
    `.NAME.part-PID`, renamed into place when whole)."""
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(f".{MANIFEST}") and not _PART.fullmatch(p.name))


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
    """None if the manifest is well-formed, lists every file of the step, and each file is there with
    its size and checksum (or there is no manifest: see the module docstring); else what is wrong,
    naming the manifest entry or the first bad file."""
    step_dir = Path(step_dir)
    if not (step_dir / MANIFEST).is_file():
        return None
    files = _read(step_dir)
    if isinstance(files, str):
        return f"{MANIFEST}: {files}"
    unlisted = sorted({str(p.relative_to(step_dir)) for p in _files(step_dir)} - set(files))
    if unlisted:
        return f"{unlisted[0]}: not in {MANIFEST} (added after the step was sealed, or a manifest that omits it)"
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


def _read(step_dir: Path) -> dict | str:
    """The manifest's {relative path: [size, sha256]}, every entry checked; or why it cannot be trusted.
    Plain checks, not asserts: they must hold under `python -O` too."""
    try:
        data = json.loads((step_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable ({(str(e).splitlines() or [type(e).__name__])[0]})"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"not a manifest (format is not {FORMAT!r})"
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return "lists no files" if files == {} else "its \"files\" is not an object"
    for rel, entry in files.items():
        try:
            inside(step_dir, rel)
        except UnsafePath as e:
            return f"entry {rel!r} {e}: refusing to read it"
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                and not isinstance(entry[0], bool) and entry[0] >= 0 and isinstance(entry[1], str)
                and _SHA256.fullmatch(entry[1])):
            return f"entry {rel!r} is {entry!r}, not [size, sha256]"
    return files
