"""The persistent compile cache (parallel/compile_cache.py) across real `generate` processes.

Each run is a fresh Python process (an in-process rerun would only hit JAX's in-memory cache) that
counts JAX's own monitoring events: `compile_requests_use_cache` (a program to compile), `cache_hits`
(one read back from disk instead) and `cache_misses` (one compiled and written). Runs: the default directory (under $XDG_CACHE_HOME), the same
directory again, `none`, a directory that cannot be made, and a cache whose entries were all
corrupted. (JAX's cache keys hold the directory's path: an entry is read back from where it was
written.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_hf_llama

REPO = Path(__file__).resolve().parents[1]
COUNT = """
import json, sys
import jax.monitoring
counts = {"requests": 0, "hits": 0, "writes": 0}
names = {"/jax/compilation_cache/compile_requests_use_cache": "requests", "/jax/compilation_cache/cache_hits": "hits",
         "/jax/compilation_cache/cache_misses": "writes"}
def on(event, **kwargs):
    if event in names:
        counts[names[event]] += 1
jax.monitoring.register_event_listener(on)
from llama3_jax.cli import main
rc = main(sys.argv[2:])
open(sys.argv[1], "w").write(json.dumps(counts))
sys.exit(rc)
"""
LINES = [{"id": 1, "prompt": "Hello there"}, {"id": 2, "prompt": "The capital of France is", "max_new_tokens": 6}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llama3_jax.convert import convert
    d = tmp_path_factory.mktemp("cc")
    make_hf_llama(d / "hf", vocab=128256, dim=16, layers=1, heads=2, kv_heads=1, head_dim=8, ffn=32, max_pos=256,
                  init_range=0.5)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    (d / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return d


def generate(d: Path, name: str, *flags) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """One `generate` process: (process, its cache event counts, its output by id). The environment
    names no cache: only the flag, or the default under $XDG_CACHE_HOME = d/xdg."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA3_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(d / "xdg"))
    out = d / f"{name}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", COUNT, str(d / f"{name}.counts"), "generate", "--checkpoint", str(d / "jax"),
           "--input", str(d / "in.jsonl"), "--output", str(out), "--max-new-tokens", "10", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return proc, json.loads((d / f"{name}.counts").read_text()), rows


def entries(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in path.iterdir()}


def warnings(proc) -> list[str]:
    return [x for x in proc.stderr.splitlines() if "warning" in x]


@pytest.fixture(scope="module")
def cold_warm(setup):
    """The default directory filled by a first run, then read back by a second."""
    cache = setup / "xdg" / "llama3-jax" / "xla"
    _, cold, want = generate(setup, "cold")
    first = entries(cache)
    warm_proc, warm, got = generate(setup, "warm", "--compile-cache", str(cache))
    return cache, first, cold, want, warm_proc, warm, got


def test_a_second_run_compiles_nothing_new_and_gives_the_same_output(cold_warm):
    cache, first, cold, want, warm_proc, warm, got = cold_warm
    # every program the first run compiled is written (however fast it compiled), one file each
    assert cold["writes"] > 0 and cold["writes"] + cold["hits"] == cold["requests"] and len(first) == cold["writes"]
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)
    assert warm["writes"] == 0 and warm["hits"] == warm["requests"] >= len(first), warm  # nothing compiled
    assert entries(cache) == first  # nothing added, nothing rewritten
    assert got == want and not warnings(warm_proc)


def test_none_writes_nothing(setup, cold_warm):
    before = {p: p.stat().st_mtime_ns for p in (setup / "xdg").rglob("*")}
    _, counts, got = generate(setup, "off", "--compile-cache", "none")
    assert counts == {"requests": 0, "hits": 0, "writes": 0}
    assert {p: p.stat().st_mtime_ns for p in (setup / "xdg").rglob("*")} == before
    assert got == cold_warm[3]


def test_an_unusable_directory_warns_in_one_line_and_the_run_goes_on(setup, cold_warm):
    (setup / "a_file").write_text("not a directory")
    proc, counts, got = generate(setup, "unusable", "--compile-cache", str(setup / "a_file" / "xla"))
    [line] = warnings(proc)
    assert f"--compile-cache {setup / 'a_file' / 'xla'} cannot be used" in line and "without a compile cache" in line
    assert counts == {"requests": 0, "hits": 0, "writes": 0} and got == cold_warm[3]


def test_corrupt_entries_warn_once_are_compiled_again_and_replaced(setup, cold_warm):
    """Last: it tears every entry of the shared directory (in place: the keys name the directory)."""
    from llama3_jax.parallel.compile_cache import FileCache
    cache, first = cold_warm[0], cold_warm[1]
    for name in first:
        data = (cache / name).read_bytes()
        (cache / name).write_bytes(data[:len(data) // 2])  # torn: a crash mid-write
    proc, counts, got = generate(setup, "corrupt", "--compile-cache", str(cache))
    [line] = warnings(proc)
    assert f"compile cache {cache}: entry" in line and "is corrupt" in line
    assert counts["hits"] == 0 and counts["writes"] == len(first) and got == cold_warm[3]
    fresh = FileCache(cache)
    assert set(entries(cache)) == set(first) and all(fresh.get(name[:-len(".bin")]) for name in first)
