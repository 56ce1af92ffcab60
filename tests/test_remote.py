"""Remote paths (remote.py) against real fsspec file systems standing in for a bucket: `memory://`
(in this process) and `local://` (fsspec's local file system under a remote-only scheme, so it survives
a subprocess). convert --to jax to a URL and --from jax from it round-trip bit-exact; a training run
with its workdir, init_from and data.path at URLs, stopped and resumed on a "new machine" (empty
staging directory), has the uninterrupted run's losses; a half-uploaded step is ignored and removed;
generate and score read --checkpoint URLs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from safetensors.numpy import load_file

from conftest import make_hf_llama
from llama3_jax.store import checkpoint, integrity, remote
from llama3_jax import cli
from llama3_jax.model.config import ModelConfig
from llama3_jax.convert import convert
from train_helpers import VOCAB, base_overrides, train_losses, write_corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    assert all(x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x)  # bit-exact


def test_upload_order_puts_each_marker_after_what_it_vouches_for():
    rels = ["config.json", "metrics.jsonl", "params.json", "2/llama3_jax_manifest.json", "2/params/_METADATA",
            "2/params/ocdbt.process_0/d/ab", "2/meta/x", "tensorboard/events.1"]
    order = sorted(rels, key=remote.upload_key)
    assert order[-1] == "params.json" and order[-2] == "config.json"
    assert order.index("2/llama3_jax_manifest.json") > max(order.index(r) for r in rels if r.startswith("2/")
                                                          and "manifest" not in r)


def test_fetch_reuses_the_cache_and_takes_the_latest_complete_step(cache, capsys):
    """A cached big file is not fetched again until the remote one changes; of a checkpoint only the
    top-level files and the latest step with its manifest come (a newer step without one is an upload
    that never finished: named and left out); what the remote no longer holds leaves the cache."""
    fs, root = fsspec.filesystem("memory"), f"/cache-test-{os.getpid()}"
    try:
        big = bytes(range(256)) * (remote.SMALL // 256 + 1)
        fs.pipe(f"{root}/data/big.bin", big)
        first = remote.fetch(f"memory://{root}/data/big.bin", "data.path")
        assert Path(first).read_bytes() == big and "remote: fetched" in capsys.readouterr().err
        assert remote.fetch(f"memory://{root}/data/big.bin", "data.path") == first
        assert "remote: fetched" not in capsys.readouterr().err  # reused
        fs.pipe(f"{root}/data/big.bin", big + b"more")
        assert Path(remote.fetch(f"memory://{root}/data/big.bin", "data.path")).read_bytes() == big + b"more"

        ckpt = f"{root}/ckpt"
        for rel in ("config.json", "1/params/x", f"1/{integrity.MANIFEST}", "2/params/x",
                    f"2/{integrity.MANIFEST}", "3/params/x"):
            fs.pipe(f"{ckpt}/{rel}", rel.encode())
        local = Path(remote.fetch(f"memory://{ckpt}", "--checkpoint"))
        got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert got == ["2/llama3_jax_manifest.json", "2/params/x", "config.json"]
        assert f"step 3 has no {integrity.MANIFEST} (an upload that never finished): ignored" in capsys.readouterr().err
        fs.pipe(f"{ckpt}/3/{integrity.MANIFEST}", b"now complete")
        local = Path(remote.fetch(f"memory://{ckpt}", "--checkpoint"))
        got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert got == ["3/llama3_jax_manifest.json", "3/params/x", "config.json"]  # step 2 left the cache

        # a run's model shape (model_config, dry runs) reads config.json alone
        cfg = ModelConfig(vocab_size=211, dim=40, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=10,
                          intermediate_size=72)
        checkpoint.save_config(cache / "cfg", cfg)
        remote.upload(cache / "cfg", f"memory://{root}/other", "test")
        assert checkpoint.load_config(f"memory://{root}/other") == cfg
    finally:
        fs.rm(root, recursive=True)


def test_convert_to_and_from_urls_round_trips_bit_exact(tmp_path, cache):
    src = tmp_path / "hf"
    make_hf_llama(src)
    url = f"memory://bucket-{os.getpid()}/jax"
    fs = fsspec.filesystem("memory")
    try:
        assert cli.main(["convert", "--quiet", "--from", "hf", "--to", "jax", str(src), url]) == 0
        files = remote.listing(fs, f"/bucket-{os.getpid()}/jax")
        assert "config.json" in files and f"0/{integrity.MANIFEST}" in files
        assert not any((cache / "staging").iterdir())  # the staged copy is gone once uploaded
        assert cli.main(["convert", "--quiet", "--from", "hf", "--to", "jax", str(src), url]) == 2  # no overwrite
        # --from jax from the URL, --to hf at a local:// URL (a second fsspec file system)
        out = tmp_path / "bucket" / "hf"
        assert cli.main(["convert", "--quiet", "--from", "jax", "--to", "hf", url, f"local://{out}"]) == 0
        _assert_same_tensors(src, out)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    finally:
        fs.rm(f"/bucket-{os.getpid()}", recursive=True)


def test_gs_without_gcsfs_is_one_line_naming_the_extra(capsys):
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    assert cli.main(["train", "workdir=gs://b/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'llama3-jax[gcs]'" in err and "mount the bucket" in err


def _train(overrides, env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "llama3_jax.cli", "train", *overrides], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_at_urls_resumes_with_the_uninterrupted_losses(tmp_path, cache, capsys):
    """Reference: 4 steps with local paths. Remote: workdir, init_from and data.path at local:// URLs,
    2 steps; then a half upload of step 4 appears (no manifest) and the staging directory is wiped (a
    new machine); the rerun to 4 steps ignores and removes the half upload and logs the same losses.
    generate and score with --checkpoint URL give the reference checkpoint's output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), **{remote.CACHE_ENV: str(cache)})
    corpus = write_corpus(tmp_path / "docs.jsonl", n_docs=40)
    make_hf_llama(tmp_path / "hf", vocab=VOCAB)
    bucket = tmp_path / "bucket"  # local:// URLs under it; the reference reads the same files as local paths
    url = f"local://{bucket}"
    convert(tmp_path / "hf", f"{url}/init", src_format="hf", dst_format="jax", progress=False)
    remote.upload(tmp_path, f"{url}/data", "data.path", ["docs.jsonl"])

    extra = dict(steps=4, checkpoint_every=2, keep_checkpoints=2, **{"data.eval_fraction": 0.1})
    ref = tmp_path / "ref"
    _train(base_overrides(ref, bucket / "data" / "docs.jsonl", bucket / "init", **extra), env)
    remote_run = base_overrides(f"{url}/run", f"{url}/data/docs.jsonl", f"{url}/init", **extra)
    first = _train([o.replace("steps=4", "steps=2") for o in remote_run], env)
    assert "remote: fetched" in first.stderr
    run = bucket / "run"
    assert (run / "2" / integrity.MANIFEST).is_file() and (run / "config.json").is_file()
    shutil.copytree(run / "2", run / "4", ignore=shutil.ignore_patterns(integrity.MANIFEST))  # half an upload
    shutil.rmtree(cache / "staging")  # another machine
    second = _train(remote_run, env)
    assert f"removed {url}/run/4, an upload that never finished" in second.stderr
    assert "resumed " in second.stderr and "at step 2" in second.stderr
    assert train_losses(run) == train_losses(ref)  # every step once, bit-identical losses
    assert sorted(p.name for p in run.iterdir() if p.name.isdigit()) == ["2", "4"]
    manifest = json.loads((run / "4" / integrity.MANIFEST).read_text())["files"]
    assert sorted(manifest) == sorted(r for r in remote.listing(fsspec.filesystem("local"), str(run / "4"))
                                      if r != integrity.MANIFEST)  # nothing of the half upload is left
    assert json.loads((run / "train_config.json").read_text())["workdir"] == f"{url}/run"

    # score from the URL == from the reference workdir (the same weights: the fetch took step 4 whole);
    # generate takes the URL the same way (cli.main fetches --checkpoint for both)
    sc = tmp_path / "sc.jsonl"
    sc.write_text(json.dumps({"id": 1, "prompt_tokens": [5, 6], "completion_tokens": [7, 8]}) + "\n")
    scores = []
    for ckpt in (ref, f"{url}/run"):
        out = tmp_path / f"score-{len(scores)}.jsonl"
        assert cli.main(["score", "--checkpoint", str(ckpt), "--input", str(sc), "--output", str(out),
                         "--dtype", "float32"]) == 0
        scores.append([{k: v for k, v in json.loads(line).items() if k != "seconds"}
                       for line in out.read_text().splitlines()])
    assert scores[0] == scores[1] and "logprobs" in str(scores[0])
    inp, out = tmp_path / "in.jsonl", tmp_path / "gen.jsonl"
    inp.write_text(json.dumps({"id": 1, "tokens": [5, 6, 7]}) + "\n")
    assert cli.main(["generate", "--checkpoint", f"{url}/run", "--input", str(inp), "--output", str(out),
                     "--max-new-tokens", "3", "--ignore-eos"]) == 0
    assert len(json.loads(out.read_text())["tokens"]) == 3
