"""Full disks and read-only paths: a checkpoint that cannot be written ends `train` with a one-line
error naming the path (exit status 2), and the previous checkpoint stays intact and restorable.

Real failures, no mocks: a tiny tmpfs (ENOSPC; needs `mount`, skipped where it is not allowed), a
per-process file size limit (RLIMIT_FSIZE: EFBIG, works anywhere), and a read-only directory for a
root process without CAP_DAC_OVERRIDE (tests run as root, where chmod alone blocks nothing).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from llama3_jax.store import checkpoint, integrity

from faults_helpers import cli, cli_env, run_ok
from train_helpers import base_overrides, write_corpus


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory):
    """A workdir with one sealed checkpoint (step 5) of a 10-step job."""
    corpus = write_corpus(tmp_path_factory.mktemp("c") / "docs.jsonl")
    wd = tmp_path_factory.mktemp("five") / "wd"
    run_ok(train_cmd(wd, corpus, steps=5), cli_env())
    assert checkpoint.latest_step(wd) == 5 and integrity.is_sealed(wd / "5")
    return wd, corpus


def train_cmd(wd, corpus, steps=10):
    return cli("train", *base_overrides(wd, corpus, steps=steps, checkpoint_every=5))


def run_failing(cmd) -> str:
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("llama3-jax train: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def assert_step_5_intact(wd):
    assert checkpoint.latest_intact_step(wd) == 5
    assert integrity.verify(wd / "5") is None
    checkpoint.restore_params(wd)


def test_disk_full_during_a_save(five_steps, tmp_path):
    src, corpus = five_steps
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 150_000}", "tmpfs", str(mnt)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        wd = mnt / "wd"
        shutil.copytree(src, wd)
        line = run_failing(train_cmd(wd, corpus))
        assert str(wd) in line and "No space left on device" in line
        assert_step_5_intact(wd)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# at most 100 KB per file written (checkpoint data files are bigger); CPython ignores SIGXFSZ, so the
# write fails with EFBIG instead of killing the process
FILE_SIZE_LIMIT = ["prlimit", "--fsize=100000", "--"]


def test_file_size_limit_during_a_save(five_steps, tmp_path):
    src, corpus = five_steps
    wd = tmp_path / "wd"
    shutil.copytree(src, wd)
    if shutil.which("prlimit") is None:
        pytest.skip("no prlimit (util-linux)")
    line = run_failing([*FILE_SIZE_LIMIT, *train_cmd(wd, corpus)])
    assert "checkpoint step 10 not written" in line and str(wd) in line and "File too large" in line
    assert_step_5_intact(wd)
    assert not (wd / "10").exists()


# CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH out of the bounding set: gone after exec, even for root
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_read_only_workdir(five_steps, tmp_path):
    src, corpus = five_steps
    wd = tmp_path / "wd"
    shutil.copytree(src, wd)
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux)")
    check = subprocess.run([*NO_DAC, "touch", str(probe / uuid.uuid4().hex)], capture_output=True)
    if check.returncode == 0:
        pytest.skip("cannot make a read-only directory bite here (CAP_DAC_OVERRIDE cannot be dropped)")
    wd.chmod(0o555)
    try:
        line = run_failing([*NO_DAC, *train_cmd(wd, corpus)])
        assert "Permission denied" in line and str(wd) in line
    finally:
        wd.chmod(0o755)
    assert_step_5_intact(wd)
    assert sorted(p.name for p in wd.iterdir()) == sorted(p.name for p in src.iterdir())
