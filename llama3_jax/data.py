"""Training input pipeline on grain: documents -> Llama 3 tokens -> packed rows -> batches.

    list documents (paths / JSONL line offsets; nothing is read yet)
      -> train/eval split by a hash of each document's identity (stable when the corpus grows)
      -> shard: this process keeps documents i % process_count == process_index
      -> shuffle (seed + epoch) and repeat               [grain MapDataset]
      -> read + tokenize: BOS text EOS, in reader threads (or worker processes)
      -> pack to seq_len + 1 tokens with segment ids     [grain ConcatThenSplitIterDataset]
      -> shift into tokens/targets, batch, prefetch      [grain batch / ThreadPrefetch]

Why seq_len + 1: the row is cut into ``tokens = row[:-1]`` and ``targets = row[1:]``, so
the last input of a row still gets its true next token when that token belongs to the
same document. Long documents continue on the next row as a new segment whose positions
restart at 0; RoPE only sees position differences inside a row, so nothing is lost but
the one token pair that straddles the two rows.

The iterator state is grain's own (a few integers: document index, epoch, split offset
inside the current document), so it is small, JSON-serialisable, and restores exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags as absl_flags
from grain.experimental import ConcatThenSplitIterDataset, ThreadPrefetchIterDataset

from llama3_jax.tokenizer import Tokenizer

__all__ = [
    "BATCH_KEYS",
    "BatchIterator",
    "DataConfig",
    "Document",
    "list_documents",
    "make_iterator",
    "split_documents",
]

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
# Files taken from a directory (a single file path is always taken, whatever its suffix).
TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .tex .html .css "
    ".toml .yaml .yml .json .jsonl".split()
)
# Standard-library parts that are test data, vendored packages or build-specific.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
)
_STDLIB_MAX_BYTES = 200_000
# In-process reading: threads that read + tokenize, and documents read ahead of the packer.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
_reported: set[str] = set()  # bad-input messages already printed (report each once)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is read (see module docstring).

    ``path``: ``"stdlib"`` (this Python's standard-library sources, no download), a
    ``.jsonl`` file (one document per line, in field ``text_field``), any other text
    file (one document), or a directory of such files (recursive, sorted).
    """

    path: str = "stdlib"
    text_field: str = "text"
    eval_fraction: float = 0.01  # held-out documents, chosen by hash (not by order)
    shuffle: bool = True
    worker_count: int = 0  # grain multiprocessing workers (0 = read in this process)
    prefetch: int = 2  # batches prepared in a background thread ahead of the step
    max_documents: int = 0  # 0 = all


@dataclasses.dataclass(frozen=True)
class Document:
    """One document, not yet read: a whole file (``offset == -1``) or one JSONL line.

    ``key`` is its identity across machines: the path relative to the corpus root for
    files, the SHA-1 of the text for JSONL lines (so duplicates land in the same split).
    """

    path: str
    offset: int
    key: str


# ------------------------------------------------------------------------ sources
def _report(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        print(message, file=sys.stderr, flush=True)


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


def _jsonl_documents(path: Path, text_field: str, limit: int) -> list[Document]:
    """One Document per valid line; bad lines are reported (file:line) and skipped."""
    docs, offset = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                _report(f"{path}:{lineno}: skipped line: invalid JSON ({e})")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                _report(f"{path}:{lineno}: skipped line: no string field {text_field!r}")
                continue
            docs.append(Document(str(path), start, hashlib.sha1(text.encode()).hexdigest()))
            if limit and len(docs) >= limit:
                break
    return docs


def list_documents(cfg: DataConfig) -> list[Document]:
    """All documents of ``cfg.path`` in a fixed order (before split and sharding)."""
    limit = cfg.max_documents
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
            if file.suffix == ".jsonl":
                docs.extend(_jsonl_documents(file, cfg.text_field, limit and limit - len(docs)))
            else:
                docs.append(Document(str(file), -1, file.relative_to(base).as_posix()))
            if limit and len(docs) >= limit:
                break
    docs = docs[:limit] if limit else docs
    if not docs:
        raise ValueError(f"no documents found in data path {cfg.path}")
    return docs


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


_REPORTED_NOT_TEXT: set[str] = set()


def _read_text(doc: Document, text_field: str) -> str | None:
    if doc.offset < 0:
        try:
            return Path(doc.path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # not text: dropped the same way on every run, reported once
            if doc.path not in _REPORTED_NOT_TEXT:
                _REPORTED_NOT_TEXT.add(doc.path)
                print(f"data: {doc.path}: not UTF-8 text, skipped", file=sys.stderr, flush=True)
            return None
    with open(doc.path, "rb") as f:
        f.seek(doc.offset)
        return json.loads(f.readline())[text_field]


class _ReadAndTokenize:
    """Document -> ``{"tokens": int32[n]}`` = BOS, text, EOS (None if unreadable)."""

    def __init__(self, tokenizer, text_field: str):
        self._tokenizer, self._text_field = tokenizer, text_field

    def __getstate__(self):
        # Worker processes rebuild our tokenizer from its file rather than unpickling it.
        tok = self._tokenizer
        tok = ("path", str(tok.model_path)) if isinstance(tok, Tokenizer) else ("obj", tok)
        return {"tokenizer": tok, "text_field": self._text_field}

    def __setstate__(self, state):
        kind, tok = state["tokenizer"]
        self._tokenizer = Tokenizer(tok) if kind == "path" else tok
        self._text_field = state["text_field"]

    def __call__(self, doc: Document) -> dict[str, np.ndarray] | None:
        text = _read_text(doc, self._text_field)
        if text is None:
            return None
        return {"tokens": np.asarray(self._tokenizer.encode(text, bos=True, eos=True), np.int32)}


# ------------------------------------------------------------------------ batches
def _to_batch(rows: list[dict[str, np.ndarray]], *, n_rows: int, seq_len: int) -> dict:
    """Packed rows of seq_len + 1 -> the model's (n_rows, seq_len) int32 arrays.

    A short final batch (finite iterators only) is filled with padding rows (segment 0,
    loss_mask 0) so every batch has the same shape and jit compiles once.
    """
    tok, seg, pos = (np.zeros((n_rows, seq_len + 1), np.int32) for _ in range(3))
    for i, row in enumerate(rows):
        tok[i], seg[i], pos[i] = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    # Learn x[t] -> x[t+1] only inside one document: never across a document boundary
    # (EOS -> next BOS) and never on padding.
    loss_mask = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    return {
        "tokens": tok[:, :-1],
        "targets": tok[:, 1:],
        "positions": pos[:, :-1],
        "segment_ids": seg[:, :-1],
        "loss_mask": loss_mask.astype(np.int32),
    }


def _jsonable(x: Any) -> Any:
    """grain's state as plain JSON types (its packer keeps tuples and numpy ints)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"grain iterator state holds a {type(x).__name__}, not JSON-serialisable")


def _from_json(x: Any, key: str = "") -> Any:
    """Undo what JSON did to grain's state: its packer compares slices with tuples."""
    if isinstance(x, dict):
        if key == "remainder_slices":
            return {k: tuple(v) for k, v in x.items()}
        if key == "future_states":  # keyed by shard index
            return {int(k): _from_json(v) for k, v in x.items()}
        return {k: _from_json(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


class BatchIterator:
    """Yields this process's rows of each global batch: dict of int32 (rows, seq_len).

    Keys ``BATCH_KEYS``: ``tokens``, ``targets`` (next token), ``positions`` (0 at each
    segment start), ``segment_ids`` (1, 2, ... per document piece in a row; 0 = padding),
    ``loss_mask`` (1 where ``targets`` is the next token of the same document).
    ``get_state()`` describes what the caller has consumed (not what the prefetch
    thread read ahead); ``set_state`` on a fresh iterator with the same arguments
    continues with exactly the batches the saved one would have produced.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        *,
        documents: list[Document],
        rows: int,
        seq_len: int,
        process_count: int,
        fingerprint: dict[str, Any],
    ):
        self._it = dataset.__iter__()
        self.documents = documents  # this process's documents (after split + sharding)
        self.rows, self.seq_len, self.process_count = rows, seq_len, process_count
        self._fingerprint = fingerprint

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    @property
    def tokens_per_batch(self) -> int:
        """Token slots per batch in this process (padding included)."""
        return self.rows * self.seq_len

    @property
    def global_tokens_per_batch(self) -> int:
        return self.rows * self.seq_len * self.process_count

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"fingerprint": dict(self._fingerprint), "grain": _jsonable(self._it.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("fingerprint", {})
        for name, now in self._fingerprint.items():
            if saved.get(name) != now:
                raise ValueError(
                    f"data iterator state is for another pipeline: {name} was "
                    f"{saved.get(name)!r}, now {now!r}"
                )
        self._it.set_state(_from_json(state["grain"]))

    def close(self) -> None:
        """Stop prefetch threads and worker processes."""
        self._it.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_iterator(
    cfg: DataConfig,
    *,
    tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> BatchIterator:
    """Build the batch iterator for one process (see module docstring for the steps).

    ``batch_size`` is global; this process gets ``batch_size // process_count`` rows.
    Train loops forever (reshuffled each epoch with ``seed + epoch``) unless
    ``num_epochs`` is set; eval is one pass in file order.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if not 0 <= process_index < process_count or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must divide over process_count {process_count} "
            f"and 0 <= process_index {process_index} < process_count"
        )
    if cfg.worker_count < 0 or cfg.prefetch < 0:
        raise ValueError(f"worker_count and prefetch must be >= 0: {cfg}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    rows = batch_size // process_count
    shuffle = cfg.shuffle and split == "train"
    if split == "eval":
        num_epochs = num_epochs or 1
    docs = split_documents(list_documents(cfg), split, cfg.eval_fraction)[
        process_index::process_count
    ]
    # An eval share may be empty (few held-out documents, several processes): that iterator simply
    # ends at once, and the caller feeds padding batches so every process runs the same collectives.
    if not docs and split == "train":
        raise ValueError(
            f"no {split} documents for process {process_index}/{process_count} in data "
            f"path {cfg.path} (eval_fraction={cfg.eval_fraction})"
        )

    ds = grain.MapDataset.source(docs)
    if shuffle:
        ds = ds.shuffle(seed)  # grain reshuffles each epoch with seed + epoch
    ds = ds.repeat(num_epochs).map(_ReadAndTokenize(tokenizer, cfg.text_field))
    packed = ConcatThenSplitIterDataset(
        ds.to_iter_dataset(_READ_OPTIONS), length_struct={"tokens": seq_len + 1}
    )
    batches = packed.batch(
        rows, batch_fn=functools.partial(_to_batch, n_rows=rows, seq_len=seq_len)
    )
    if cfg.worker_count:
        # grain reads an absl flag when starting workers; outside absl.app it is unparsed.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    if cfg.prefetch:
        batches = ThreadPrefetchIterDataset(batches, prefetch_buffer_size=cfg.prefetch)

    keys = hashlib.sha1("\n".join(d.key for d in docs).encode()).hexdigest()
    # A restored state only makes sense for the same documents read the same way.
    fingerprint = {
        "documents": f"{len(docs)}:{keys}",
        "split": split,
        "seq_len": seq_len,
        "rows": rows,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "process": f"{process_index}/{process_count}",
        "worker_count": cfg.worker_count,
    }
    return BatchIterator(
        batches,
        documents=docs,
        rows=rows,
        seq_len=seq_len,
        process_count=process_count,
        fingerprint=fingerprint,
    )
