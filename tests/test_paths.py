"""Paths given as URLs (paths.py): `file://` URLs work wherever a path is given as local paths; other
URLs go to remote.py (tests/test_remote.py), and one whose fsspec backend is missing (gs:// without
gcsfs, s3:// without s3fs) is refused in one line that names the key and a way in (the package, or a
mounted bucket). convert with file:// URLs on one and two processes: tests/test_convert_multiprocess.py."""

from __future__ import annotations

import pytest

from llama3_jax import cli
from llama3_jax.model.config import load_yaml_config
from llama3_jax.store.paths import local_path
from llama3_jax.train import TrainConfig


def test_file_urls_are_local_paths_and_local_path_refuses_object_stores():
    assert local_path("file:///tmp/a%20b/run", "workdir") == "/tmp/a b/run"
    assert local_path("file://localhost/tmp/x", "workdir") == "/tmp/x"
    assert local_path("runs/x", "workdir") == "runs/x" and local_path(None, "init_from") is None
    with pytest.raises(ValueError, match=r"workdir gs://bucket/run: gs:// paths .* mount the bucket"):
        local_path("gs://bucket/run", "workdir")
    with pytest.raises(ValueError, match="not otherhost's"):
        local_path("file://otherhost/tmp/x", "data.path")


def test_train_keys_take_file_urls(tmp_path):
    cfg = load_yaml_config(TrainConfig, None, [f"workdir=file://{tmp_path}/run", f"init_from=file://{tmp_path}/ckpt",
                                               f"data.path=file://{tmp_path}/docs.jsonl"])
    got = (cfg.workdir, cfg.init_from, cfg.data.path)
    assert got == (f"{tmp_path}/run", f"{tmp_path}/ckpt", f"{tmp_path}/docs.jsonl")


@pytest.mark.parametrize("argv", [["train", "workdir=gs://b/run"], ["train", "data.path=s3://b/docs.jsonl"],
                                  ["generate", "--checkpoint", "gs://b/ckpt", "--input", "i", "--output", "o"],
                                  ["convert", "--from", "hf", "--to", "jax", "/x", "gs://b/ckpt"]])
def test_object_store_urls_are_one_line_errors(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mount the bucket" in err
