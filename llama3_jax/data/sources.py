"""Where records come from: list them (nothing tokenized yet), split train/eval, read one back.

A corpus is ``"stdlib"`` (this Python's standard-library sources), a text file (one document), a
``.jsonl`` file (one record per line), a ``.parquet`` file (one record per row, as `datasets`'
``to_parquet`` writes it), or a directory of such files. Listing validates every JSONL/Parquet record
with the caller's ``check`` (text pipeline: a string ``text_field``; chat pipelines: TRL's formats),
so a malformed record is reported once as ``FILE:LINE: skipped: why`` and never reaches a step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..parallel.distributed import is_main
from ..store.paths import resolve

# Files taken from a directory (a single file path is always taken, whatever its suffix).
TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .tex .html .css "
    ".toml .yaml .yml .json .jsonl .parquet".split()
)
RECORD_SUFFIXES = (".jsonl", ".parquet")
DATA_FORMATS = ("auto", "array_record", "raw")  # data.format
# Standard-library parts that are test data, vendored packages or build-specific.
# Tests, third-party packages, and generated tables (encodings/cp*.py codec maps, pydoc_data's topic
# text): a small model trained on a few hundred thousand tokens would spend them on hex tables.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "encodings",
     "pydoc_data"}
)
_STDLIB_MAX_BYTES = 200_000
_reported: set[str] = set()  # bad-input messages already printed (report each once)
# (file, line) of bad JSONL/Parquet records seen in this process, and (where, 0) of those skipped when read
_skipped_lines: set[tuple[str, int]] = set()

# check(record) -> None if usable, else why it is skipped
Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is read (see the module docstrings).

    ``path``: ``"stdlib"`` (this Python's standard-library sources, no download), a
    ``.jsonl`` or ``.parquet`` file (one record per line/row; plain text in field ``text_field``
    for pretraining, TRL's conversational / prompt-completion / preference records for
    ``objective: sft`` / ``dpo`` / ``reward``), any other text file (one document), or a directory of such
    files (recursive, sorted); or a directory of ArrayRecord shards made by tools/prepare_data.py
    (prepared.py: tokenized once, read by index).

    ``format``: ``auto`` (prepared when ``path`` is a directory holding ``metadata.json`` or
    ``.array_record`` files), ``array_record`` (must be prepared) or ``raw`` (read and tokenize).
    """

    path: str = "stdlib"
    format: str = "auto"
    text_field: str = "text"
    eval_fraction: float = 0.01  # held-out documents, chosen by hash (not by order)
    shuffle: bool = True
    # pretraining: packed rows shuffled within tumbling windows of this many rows (0 = off). Packing cuts
    # each document into consecutive rows, so without it a small batch is a few rows of one file and a
    # short run walks through a handful of files one after another
    shuffle_window: int = 0
    worker_count: int = 0  # grain multiprocessing workers (0 = read in this process)
    prefetch: int = 2  # batches prepared in a background thread ahead of the step
    max_documents: int = 0  # 0 = all
    packing_bins: int = 8  # sft/dpo: first-fit packing bins (more: less padding, more look-ahead)

    def __post_init__(self):
        object.__setattr__(self, "path", resolve(self.path, "data.path"))  # file:///x -> /x; a URL: train fetches it
        if self.format not in DATA_FORMATS:
            raise ValueError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document, not yet read: a whole file (``offset == -1``), one JSONL line (byte offset) or
    one Parquet row (row index).

    ``key`` is its identity across machines: the path relative to the corpus root for
    files, the SHA-1 of the record for JSONL lines and Parquet rows (so duplicates land in
    the same split). ``line`` is the 1-based line (row) number, for messages.
    """

    path: str
    offset: int
    key: str
    line: int = 0


def report(message: str) -> None:
    """Print a bad-input message on stderr, once per process."""
    if message not in _reported:
        _reported.add(message)
        if is_main():  # every process reads the same documents: one report, from process 0
            print(message, file=sys.stderr, flush=True)


def skip_record(where: str, why: str) -> None:
    """A record found unusable when read (not when listed: a reward pair too long for seq_len): reported
    once as ``WHERE: skipped: why`` and counted once per process, whatever the epochs and re-reads."""
    report(f"{where}: skipped: {why}")
    _skipped_lines.add((where, 0))


def skipped_line_count() -> int:
    """Bad JSONL lines / Parquet rows (distinct file:line) skipped by this process so far: `train` logs it."""
    return len(_skipped_lines)


def text_check(text_field: str) -> Check:
    def check(record):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            return f"no string field {text_field!r}"
        return None
    return check


def _stdlib_documents() -> list[Document]:
    """The ``.py`` files of the standard library, sorted by relative path.

    Only ``stat`` is called here (~600 files, milliseconds); files are read lazily. Files
    that turn out not to be UTF-8 are dropped when read, which is deterministic too.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # config-*: the build's Makefile and helper scripts, not library code.
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-"))
        ]
        for name in filenames:
            # _sysconfigdata_* records this machine's build flags: not the same everywhere.
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath, name)
            if path.stat().st_size <= _STDLIB_MAX_BYTES:
                docs.append(Document(str(path), -1, path.relative_to(root).as_posix()))
    return sorted(docs, key=lambda d: d.key)


def _record_key(record) -> str:
    text = record if isinstance(record, str) else json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode()).hexdigest()


def _jsonl_records(path: Path):
    """(line number, byte offset, record or None, why) for every non-blank line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                yield lineno, start, json.loads(line), None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield lineno, start, None, f"invalid JSON ({e})"


@functools.lru_cache(maxsize=4)
def _parquet_table(path: str, mtime_ns: int):
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"{path}: reading Parquet needs pyarrow (pip install 'llama3-jax[parquet]')") from None
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _table(path: str):
    return _parquet_table(path, os.stat(path).st_mtime_ns)


def _parquet_records(path: Path):
    table = _table(str(path))
    for i, record in enumerate(table.to_pylist()):
        yield i + 1, i, record, None


def _record_documents(path: Path, check: Check, limit: int, key_field: str | None) -> list[Document]:
    """One Document per valid record; bad ones are reported (``FILE:LINE: skipped: why``) and skipped."""
    docs = []
    rows = _parquet_records(path) if path.suffix == ".parquet" else _jsonl_records(path)
    for lineno, offset, record, why in rows:
        why = why or check(record)
        if why:
            report(f"{path}:{lineno}: skipped: {why}")
            _skipped_lines.add((str(path), lineno))
            continue
        key = _record_key(record[key_field] if key_field else record)
        docs.append(Document(str(path), offset, key, lineno))
        if limit and len(docs) >= limit:
            break
    return docs


def list_documents(cfg: DataConfig, check: Check | None = None, key_field: str | None = None) -> list[Document]:
    """All documents of ``cfg.path`` in a fixed order (before split and sharding).

    ``check`` validates JSONL/Parquet records (default: a string ``text_field``, whose text is the
    record's identity); ``key_field`` None hashes the whole record.
    """
    limit = cfg.max_documents
    if check is None:
        check, key_field = text_check(cfg.text_field), cfg.text_field
    if cfg.path == "stdlib":
        docs = _stdlib_documents()
    else:
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise ValueError(f"data path not found: {cfg.path}")
        if root.is_dir():
            base = root
            files = sorted(
                (p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                key=lambda p: p.relative_to(root).as_posix(),
            )
            files = [p for p in files if not _hidden(p.relative_to(root))]
        else:
            base, files = root.parent, [root]
        docs = []
        for file in files:
            if file.suffix in RECORD_SUFFIXES:
                docs.extend(_record_documents(file, check, limit and limit - len(docs), key_field))
            else:
                docs.append(Document(str(file), -1, file.relative_to(base).as_posix()))
            if limit and len(docs) >= limit:
                break
    docs = docs[:limit] if limit else docs
    if not docs:
        raise ValueError(f"no documents found in data path {cfg.path}")
    return docs


def read_record(doc: Document):
    """The parsed JSONL line or Parquet row of ``doc`` (validated when listed)."""
    if doc.path.endswith(".parquet"):
        return _table(doc.path).slice(doc.offset, 1).to_pylist()[0]
    with open(doc.path, "rb") as f:
        f.seek(doc.offset)
        return json.loads(f.readline())


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _hash01(key: str) -> float:
    """A document's place in [0, 1), from its key only (same on every machine)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(docs: list[Document], split: str, eval_fraction: float) -> list[Document]:
    """The ``"train"`` or ``"eval"`` documents: eval = hash below ``eval_fraction``.

    A threshold on the hash (rather than "the last 1%") keeps a document in its split
    when the corpus is reordered or grows. If the threshold catches nothing but a
    held-out set was asked for, the single lowest-hash document is held out.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    h = [_hash01(d.key) for d in docs]
    held_out = [x < eval_fraction for x in h]
    if eval_fraction > 0 and not any(held_out) and len(docs) >= 2:
        held_out[int(np.argmin(h))] = True
    return [d for d, e in zip(docs, held_out) if e == (split == "eval")]
