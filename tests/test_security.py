"""Security and data loss (issue 19, items 1, 2, 4): what someone else wrote must not reach outside
its directory, a manifest must vouch for every file of its step or the step is not intact, and no
writer may throw away work that is not saved anywhere else.

  * bucket keys with `..`, an absolute part (`model//x`) or a backslash are refused, naming the key,
    by every remote reader (fetch, a workdir's pull), and nothing is written outside the cache; a
    symlink in the cache does not lead a download out of it; index files go through the same check;
  * a step whose manifest is malformed, empty, escaping, of another format or silent about a file of
    the step is reported, set aside by a writer, and the previous step restored (also under python -O);
  * write_json_atomic fsyncs before its rename and leaves no temp file on error;
  * a conversion leaves another host's temp directory alone (its pid means nothing here);
  * a workdir's pull keeps a step sealed here but never uploaded, metrics lines not pushed, and files
    the remote lacks, and the next push uploads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.convert import atomic, convert
from llama3_jax.convert.tensors import ConvertError
from llama3_jax.convert.untrusted import check_index_entry
from llama3_jax.model.config import ModelConfig
from llama3_jax.store import checkpoint, integrity, remote

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def bucket():
    """A fresh `memory://` root (the stand-in for a bucket), removed afterwards."""
    fs, root = fsspec.filesystem("memory"), f"/sec-{os.getpid()}-{os.urandom(4).hex()}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ------------------------------------------------------------------------ 1. keys leaving the cache

def _escaping_keys(tmp_path: Path) -> dict[str, tuple[str, Path]]:
    """name -> (key below the model's root, where the old code wrote it). The cache directory of a
    fetch is CACHE/remote/SLOT: three `..` from it reach tmp_path."""
    return {"dotdot": ("../../../escaped", tmp_path / "escaped"),
            "absolute": (f"/{tmp_path.as_posix().lstrip('/')}/absolute", tmp_path / "absolute"),
            "backslash": ("..\\..\\..\\backslash", tmp_path / "backslash")}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "backslash"])
def test_a_bucket_key_that_leaves_the_cache_is_refused_naming_it(kind, tmp_path, cache, bucket):
    fs, root = bucket
    key, target = _escaping_keys(tmp_path)[kind]
    fs.pipe(f"{root}/model/config.json", b"{}")
    fs.pipe(f"{root}/model/{key}", b"written by whoever owns the bucket")
    with pytest.raises(ValueError) as e:
        remote.fetch(f"memory://{root}/model", "--checkpoint")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and repr(key)[1:-1] in msg and "refusing" in msg, msg
    assert not target.exists(), f"{target} was written"
    assert not list(cache.rglob("*escaped*")) and not list(cache.rglob("*backslash*"))


def test_a_workdir_pull_refuses_an_escaping_key(tmp_path, cache, bucket):
    fs, root = bucket
    fs.pipe(f"{root}/run/config.json", b"{}")
    fs.pipe(f"{root}/run/../../../escaped-run", b"x")  # staging is CACHE/staging/SLOT
    mirror = remote.WorkdirMirror(f"memory://{root}/run", None)
    with pytest.raises(ValueError, match=r"object key .*\.\./escaped-run.* contains '\.\.'"):
        mirror.pull()
    assert not (tmp_path / "escaped-run").exists()


def test_a_symlink_in_the_cache_does_not_lead_a_download_out(tmp_path, cache, bucket):
    fs, root = bucket
    fs.pipe(f"{root}/model/config.json", b"{}")
    fs.pipe(f"{root}/model/sub/x.bin", b"payload")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = cache / "remote" / remote._slot(f"memory://{root}/model")
    dest.mkdir(parents=True)
    (dest / "sub").symlink_to(outside)
    with pytest.raises(ValueError, match=r"sub/x\.bin: object key resolves outside"):
        remote.fetch(f"memory://{root}/model", "--checkpoint")
    assert not (outside / "x.bin").exists()


@pytest.mark.parametrize("name", ["..\\model.safetensors", "C:\\x.safetensors", "link/x.safetensors"])
def test_index_entries_go_through_the_same_check(name, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (src / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConvertError, match="points outside"):
        check_index_entry(src / "model.safetensors.index.json", src, name)


# ------------------------------------------------------------------- 2. manifests that cannot vouch

CFG = ModelConfig(vocab_size=17, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, intermediate_size=12,
                  dtype="float32", param_dtype="float32")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A checkpoint with sealed steps 0 (every weight 1) and 1 (every weight 2)."""
    wd = tmp_path_factory.mktemp("ckpt") / "wd"
    for step in (0, 1):
        params = jax.tree.map(lambda s, v=step + 1: jnp.full(s.shape, v, s.dtype), checkpoint.abstract_params(CFG))
        checkpoint.save_params(wd, CFG, params, step=step)
    return wd


def _files(step_dir: Path) -> dict:
    return json.loads((step_dir / integrity.MANIFEST).read_text())["files"]


def _write_manifest(step_dir: Path, files, **top) -> None:
    (step_dir / integrity.MANIFEST).write_text(json.dumps({"format": integrity.FORMAT, "files": files} | top))


def _biggest(step_dir: Path) -> str:
    return max(_files(step_dir).items(), key=lambda kv: kv[1][0])[0]


def _malformed(d: Path, tmp: Path):
    files = _files(d)
    files[next(iter(files))] = 10  # an entry that is not [size, sha256]
    _write_manifest(d, files)


def _empty(d: Path, tmp: Path):
    _write_manifest(d, {})


def _escaping(d: Path, tmp: Path):
    secret = tmp / "secret"  # step dir is tmp/wd/1: ../../secret is beside the checkpoint
    secret.write_bytes(b"not the step's")
    _write_manifest(d, _files(d) | {"../../secret": [secret.stat().st_size,
                                                     hashlib.sha256(secret.read_bytes()).hexdigest()]})


def _unlisted(d: Path, tmp: Path):
    """The biggest file left out of the manifest, then changed: nothing would have hashed it."""
    files = _files(d)
    rel = _biggest(d)
    del files[rel]
    _write_manifest(d, files)
    data = bytearray((d / rel).read_bytes())
    data[len(data) // 2] ^= 0x10
    (d / rel).write_bytes(bytes(data))


def _other_format(d: Path, tmp: Path):
    (d / integrity.MANIFEST).write_text(json.dumps({"format": "something-else", "files": _files(d)}))


MANIFESTS = {"malformed": (_malformed, "not [size, sha256]"), "empty": (_empty, "lists no files"),
             "escaping": (_escaping, "'../../secret' contains '..'"),
             "unlisted": (_unlisted, "not in llama3_jax_manifest.json"),
             "other-format": (_other_format, "not a manifest")}


@pytest.mark.parametrize("kind", MANIFESTS)
def test_a_step_whose_manifest_cannot_vouch_for_it_is_set_aside_and_the_previous_restored(
        kind, two_steps, tmp_path, capsys):
    import shutil
    wd = tmp_path / "wd"
    shutil.copytree(two_steps, wd)
    damage, why = MANIFESTS[kind]
    damage(wd / "1", tmp_path)
    assert checkpoint.latest_step(wd) == 1  # orbax sees nothing wrong

    assert checkpoint.latest_intact_step(wd, set_aside=True) == 0  # what train's resume calls
    err = capsys.readouterr().err
    assert "step 1 is corrupt: " in err and why in err and "using step 0" in err, err
    assert (wd / "1.corrupt").is_dir() and not (wd / "1").exists()
    _, params = checkpoint.restore_params(wd)  # every reader: the latest intact step
    assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(params))


def test_the_checks_hold_under_python_O(two_steps, tmp_path):
    """The old format check was an `assert`, gone under -O: a manifest of another format verified."""
    import shutil
    step = tmp_path / "1"
    shutil.copytree(two_steps / "1", step)
    _other_format(step, tmp_path)
    code = "import sys; from llama3_jax.store import integrity; print(integrity.verify(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-O", "-c", code, str(step)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not a manifest" in out.stdout


def test_a_sound_manifest_still_verifies_and_covers_every_file(two_steps):
    for step in (0, 1):
        assert integrity.verify(two_steps / str(step)) is None
        listed = set(_files(two_steps / str(step)))
        on_disk = {p.relative_to(two_steps / str(step)).as_posix() for p in (two_steps / str(step)).rglob("*")
                   if p.is_file() and p.name != integrity.MANIFEST}
        assert listed == on_disk


# ------------------------------------------------------------------------------- 4. losing work

def test_write_json_atomic_fsyncs_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    checkpoint.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert calls == ["fsync", "replace"]
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_write_json_atomic_leaves_no_temp_file_and_the_old_file_on_error(tmp_path):
    path = tmp_path / "x.json"
    checkpoint.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        checkpoint.write_json_atomic(path, {"a": object()})  # not JSON: fails halfway through the dump
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert json.loads(path.read_text()) == {"a": 1}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_convert_leaves_another_hosts_temp_alone_and_removes_its_own_dead_ones(tmp_path, hf_llama, capsys):
    """On a shared file system a temp named after a pid that is dead *here* may be another host's
    live conversion: only this host's dead writers' temps are removed."""
    src, dst = tmp_path / "hf", tmp_path / "out"
    hf_llama(src)
    pid, here = _dead_pid(), re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    other = tmp_path / f".out.tmp-other-host.example-{pid}"  # `.DST.tmp-HOST-PID`
    mine = tmp_path / f".out.tmp-{here}-{pid}"
    for d in (other, mine):
        d.mkdir()
        (d / "part").write_text("half")
    convert(src, dst, src_format="hf", dst_format="hf", progress=False)
    assert (dst / "config.json").is_file()
    assert (other / "part").read_text() == "half", "another host's temp was deleted"
    assert not mine.exists(), "this host's dead writer's temp was left"
    assert f"left {other} alone: written on host other-host.example" in capsys.readouterr().err
    assert atomic.owner() == f"{here}-{os.getpid()}" and atomic.temp_dir(dst, atomic.owner()).parent == tmp_path


def _step(directory: Path, step: int, payload: bytes) -> None:
    (directory / str(step) / "params").mkdir(parents=True, exist_ok=True)
    (directory / str(step) / "params" / "x").write_bytes(payload)
    integrity.seal(directory / str(step))


def _remote_files(fs, root) -> dict[str, bytes]:
    return {rel: fs.cat_file(f"{root}/{rel}") for rel in remote.listing(fs, root)}


def test_pull_keeps_local_work_newer_than_the_remote_and_push_uploads_it(tmp_path, cache, bucket, capsys):
    """Killed after sealing step 4 and logging its metrics, before uploading either: the remote has
    step 2, two metric lines and a half upload of step 6. The pull keeps step 4 and the four lines
    (and a file the remote never had), drops a local step the remote superseded, still takes the
    remote's copy of a file the local one does not extend, and the next push uploads the rest."""
    fs, root = bucket
    url = f"memory://{root}/run"
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "config.json").write_text('{"remote": true}\n')
    (seed / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    _step(seed, 2, b"two")
    remote.upload(seed, url, "workdir")
    fs.pipe(f"{root}/run/6/params/x", b"half an upload")

    mirror = remote.WorkdirMirror(url, None)
    local = mirror.local
    local.mkdir(parents=True)
    (local / "config.json").write_text('{"old": 1}\n')  # not an extension of the remote's: remote wins
    (local / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n')
    (local / "tensorboard").mkdir()
    (local / "tensorboard" / "events.1").write_bytes(b"ev")
    _step(local, 1, b"one")  # older than the remote's latest, which no longer has it: superseded
    _step(local, 2, b"two")
    _step(local, 4, b"four")

    mirror.pull()
    assert (local / "4" / "params" / "x").read_bytes() == b"four" and integrity.verify(local / "4") is None
    assert (local / "metrics.jsonl").read_text().count("\n") == 4
    assert (local / "tensorboard" / "events.1").read_bytes() == b"ev"
    assert (local / "config.json").read_text() == '{"remote": true}\n'
    assert not (local / "1").exists()
    assert not fs.exists(f"{root}/run/6")
    err = capsys.readouterr().err
    assert "removed " in err and "kept 4 file(s)" in err and "the next push uploads them" in err, err

    mirror.push()
    up = _remote_files(fs, f"{root}/run")
    assert up["4/params/x"] == b"four" and f"4/{integrity.MANIFEST}" in up
    assert up["metrics.jsonl"].count(b"\n") == 4 and up["tensorboard/events.1"] == b"ev"


def test_pull_with_only_a_half_uploaded_step_keeps_the_sealed_local_one(tmp_path, cache, bucket):
    """The first upload of step 2 died halfway: the remote has no complete step, this machine has it
    sealed. The pull removes the half upload and keeps the local step instead of refusing the run."""
    fs, root = bucket
    url = f"memory://{root}/run"
    fs.pipe(f"{root}/run/2/params/x", b"tw")
    mirror = remote.WorkdirMirror(url, None)
    mirror.local.mkdir(parents=True)
    _step(mirror.local, 2, b"two")
    mirror.pull()
    assert integrity.verify(mirror.local / "2") is None and not fs.exists(f"{root}/run/2")
    mirror.push()
    assert _remote_files(fs, f"{root}/run")["2/params/x"] == b"two"
