"""Relative paths written by someone else, joined to a local directory: they must stay inside it.

Three places take a relative path from a file or a listing that llama3-jax did not write and join it
to a local directory: a bucket's object keys (remote.py: every file fetched into a download cache or
pulled into a workdir's staging directory), the shard names of a downloaded
`model.safetensors.index.json` (convert/untrusted.py) and the file names in a checkpoint step's
integrity manifest (integrity.py). What can go wrong: `..` is legal in GCS and S3 keys, so
`model/../../../../home/me/.bashrc` beside a `config.json` would be written over the user's file; a
key `model//x` has the relative part `/x`, and `Path(dest) / "/x"` is `/x`; a backslash is a
separator on Windows (`..\\..\\x`) and no name anyone means on POSIX; and a symlink already inside the
directory can point anywhere. `inside` refuses the first three by their text, before anything is
opened, and the last by resolving the joined path and checking that it is still under the directory;
its UnsafePath (a ValueError) says why in a few words, for the caller to name the file or key at fault
in its one-line error.
"""

from __future__ import annotations

import re
from pathlib import Path

_DRIVE = re.compile(r"^[A-Za-z]:")  # C:x, C:\x: a Windows drive


class UnsafePath(ValueError):
    """A relative path that would leave its directory; the message is the reason (a few words)."""


def problem(rel: object) -> str | None:
    """Why `rel` is not a plain relative POSIX path (None when it is), from its text alone."""
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    if "\x00" in rel:
        return "contains a NUL byte"
    if "\\" in rel:
        return "contains a backslash"
    if rel.startswith("/") or _DRIVE.match(rel):
        return "is an absolute path"
    if ".." in rel.split("/"):
        return "contains '..'"
    return None


def inside(root: str | Path, rel: object) -> Path:
    """`root / rel` when `rel` is a plain relative path that resolves (symlinks followed) inside
    `root`; else UnsafePath saying why."""
    why = problem(rel)
    if why is not None:
        raise UnsafePath(why)
    root = Path(root)
    path = root / str(rel)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafePath(f"resolves outside {root} (through a symlink)")
    return path
