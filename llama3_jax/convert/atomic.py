"""An output directory that appears whole or not at all.

Every conversion writes into a temp directory beside DST (`.DST.tmp-HOST-PID`) and renames it to DST
only when everything succeeded, so a failure never leaves a half-written output. A process killed
before its rename leaves its temp behind; the next conversion to the same DST deletes the temps whose
process is gone (`remove_stale_temps`), and leaves a live writer's alone. Several processes writing
one output name the temp after process 0 (`main_owner`), so they all agree on it.

What can go wrong in deciding "gone": a pid means something only on the host that gave it. On a
shared file system (NFS, Lustre, a gcsfuse mount) the temp may be another host's live conversion, and
its pid, looked up here, is dead or someone else's: deleting on that evidence would pull the directory
from under a running writer. So the temp's name records the host with the pid, and only a temp of
this host whose pid no longer runs is deleted; another host's temp (or one named by an older version,
with no host) is left in place and named on stderr, for whoever knows that it is dead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import sys
from pathlib import Path


def host() -> str:
    """This machine's name as it appears in a temp directory's name (characters a file name keeps)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def owner() -> str:
    """This process as the owner of a temp directory: `HOST-PID`."""
    return f"{host()}-{os.getpid()}"


def temp_dir(dst: Path, owner: str) -> Path:
    """Where the writer `owner` (`HOST-PID`: `owner()`, `main_owner()`) writes DST before the rename."""
    return dst.parent / f".{dst.name}.tmp-{owner}"


def main_owner() -> str:
    """Process 0's `owner()`, on every process: the temp directory they all write into is named after it."""
    from ..parallel.multihost_io import on_main
    return on_main(owner)


@contextlib.contextmanager
def atomic_dir(dst: Path):
    """A temp directory beside `dst` for one process to write into: renamed to `dst` when the block
    ends without error, deleted when it fails, so `dst` appears whole or not at all (the `--to peft`
    export and `--keep-adapters` import; `convert` itself does the same across processes)."""
    tmp = temp_dir(dst, owner())
    remove_stale_temps(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(dst: Path) -> None:
    """Delete the temp directories of earlier conversions to DST that this host wrote and whose process
    is gone (killed before its rename), so a crash leaves no litter after the next run. A live writer's
    temp is left alone, and so is another host's (its pid means nothing here): named on stderr."""
    prefix, here = f".{dst.name}.tmp-", host()
    for old in sorted(dst.parent.glob(f"{glob.escape(prefix)}*")):
        where, _, pid = old.name[len(prefix):].rpartition("-")
        if not pid.isdigit() or (where == here and int(pid) == os.getpid()):
            continue
        if where != here:
            print(f"convert: left {old} alone: written on host {where or '(not recorded)'}, whose processes "
                  f"this host cannot see (delete it once no conversion to {dst} runs there)", file=sys.stderr)
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
