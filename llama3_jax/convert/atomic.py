"""An output directory that appears whole or not at all.

Every conversion writes into a temp directory beside DST (`.DST.tmp-PID`) and renames it to DST only
when everything succeeded, so a failure never leaves a half-written output. A process killed before
its rename leaves its temp behind; the next conversion to the same DST deletes the temps whose
process is gone (`remove_stale_temps`), and leaves a live writer's alone. Several processes writing
one output name the temp after process 0's pid (`main_pid`), so they all agree on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def temp_dir(dst: Path, pid: int) -> Path:
    """Where the writer whose temp is named after process `pid` writes DST before the rename."""
    return dst.parent / f".{dst.name}.tmp-{pid}"


def main_pid() -> int:
    """Process 0's pid, on every process: the temp directory they all write into is named after it."""
    from ..parallel.multihost_io import on_main
    return on_main(os.getpid)


@contextlib.contextmanager
def atomic_dir(dst: Path):
    """A temp directory beside `dst` for one process to write into: renamed to `dst` when the block
    ends without error, deleted when it fails, so `dst` appears whole or not at all (the `--to peft`
    export and `--keep-adapters` import; `convert` itself does the same across processes)."""
    tmp = temp_dir(dst, os.getpid())
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
    """Delete the temp directories of earlier conversions to DST whose process is gone (killed before
    its rename), so a crash leaves no litter after the next run. A live writer's temp is left alone."""
    for old in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
