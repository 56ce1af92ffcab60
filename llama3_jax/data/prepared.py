"""Prepared data: a corpus tokenized once (tools/prepare_data.py) into ArrayRecord shards read by index.

    DIR/metadata.json                          what was prepared: tokenizer, counts, split, shards
    DIR/train-00000-of-00004.array_record ...  one record per train document
    DIR/eval-00000-of-00001.array_record       one record per held-out document

A record is one document's tokens exactly as the raw pipeline makes them (text.py: BOS text EOS),
little-endian int32; a document the raw pipeline cannot read (a file that is not UTF-8) is an empty
record, so record i is raw document i. Each split's records are in the order `list_documents` +
`split_documents` give them, and its fingerprint (document count + hash of the keys) is the raw one.
So grain over DIR, shuffled with the same seed, reads the same documents in the same order as grain
over the corpus: training from DIR has the per-step losses of training from the corpus it was made
from, and a checkpoint's iterator state continues on either.

Why no O(corpus) work at start-up or eval: metadata.json holds every shard's record count, the split
and its fingerprint, so opening DIR reads one small JSON and no record (shards are handed to grain as
`file[0:n]` read instructions, which do not even open the file); grain reads a record when the shuffled
index reaches it, and an eval reads the held-out records it uses.

What is fixed when preparing (a training run that asks otherwise is refused, naming the key): the
tokenizer, `text_field`, `eval_fraction` (the split) and `max_documents`. Pretraining text only:
fine-tuning records (sft/dpo) keep their JSONL/Parquet form.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import grain
import numpy as np

from .sources import DataConfig, Document, list_documents, split_documents
from .text import ReadAndTokenize

FORMAT = "llama3-jax-prepared"
VERSION = 1
METADATA = "metadata.json"
SUFFIX = ".array_record"
SPLITS = ("train", "eval")
DTYPE = np.dtype("<i4")
# one record per chunk (what grain's random access wants); zstd level 1 with a 64 KiB window read a
# random record in ~0.18 ms against ~0.31 ms for ArrayRecord's default zstd:3 (2^20 window), same size
_WRITER_OPTIONS = "group_size:1,zstd:1,window_log:16"


# ------------------------------------------------------------------------------ identity checks
def documents_fingerprint(docs: list[Document]) -> str:
    """A split's identity in iterator states (iterator.py): count + hash of the document keys."""
    keys = hashlib.sha1("\n".join(d.key for d in docs).encode()).hexdigest()
    return f"{len(docs)}:{keys}"


def tokenizer_id(tok) -> str:
    """What makes two tokenizers give the same ids: "bytes", or the hash of the tiktoken model file."""
    from ..tokenizer import ByteTokenizer, Tokenizer
    if isinstance(tok, ByteTokenizer):
        return "bytes"
    if isinstance(tok, Tokenizer):
        return "tiktoken:" + hashlib.sha256(Path(tok.model_path).read_bytes()).hexdigest()[:16]
    return f"{type(tok).__name__}:{tok.n_words}"


def is_prepared(path: str) -> bool:
    """Whether `data.path` (with `data.format: auto`) is a prepared directory."""
    root = Path(path).expanduser()
    return root.is_dir() and ((root / METADATA).is_file() or any(root.glob(f"*{SUFFIX}")))


def load_metadata(path: str) -> dict:
    """DIR/metadata.json, checked: one-line errors naming the file."""
    root = Path(path).expanduser()
    meta_path = root / METADATA
    if not meta_path.is_file():
        raise ValueError(f"{path}: no {METADATA} (a directory of {SUFFIX} shards made by tools/prepare_data.py)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a prepared-data metadata file (format={meta.get('format')!r})"
                         if isinstance(meta, dict) else f"{meta_path}: not a JSON object")
    if meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: version {meta.get('version')!r}, this llama3-jax reads {VERSION}")
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            if not (root / shard["file"]).is_file():
                raise ValueError(f"{meta_path}: lists {shard['file']}, which is missing")
    return meta


def check_run(meta: dict, cfg: DataConfig, tok, kind: str) -> None:
    """Refuse a run that asks for what was fixed when preparing (see the module docstring)."""
    where = f"data.path {cfg.path} (prepared data)"
    if kind != "text":
        raise ValueError(f"{where} holds pretraining text; objective sft/dpo reads JSONL or Parquet records")
    if meta["tokenizer"]["id"] != tokenizer_id(tok):
        raise ValueError(f"{where} was tokenized with {meta['tokenizer']['spec'] or 'Llama 3'} "
                         f"({meta['tokenizer']['id']}), this run's tokenizer is {tokenizer_id(tok)}: prepare it again")
    for key in ("eval_fraction", "text_field", "max_documents"):
        if getattr(cfg, key) != meta[key]:
            raise ValueError(f"{where} was prepared with {key}={meta[key]!r}, the run asks data.{key}="
                             f"{getattr(cfg, key)!r} (set it to {meta[key]!r}, or prepare again)")


# ------------------------------------------------------------------------------ reading
def source(path: str, meta: dict, split: str) -> grain.sources.ArrayRecordDataSource | list:
    """The split's records as a grain random-access source (an empty list for an empty split)."""
    shards = meta["splits"][split]["shards"]
    root = Path(path).expanduser()
    files = [f"{root / s['file']}[0:{s['records']}]" for s in shards if s["records"]]
    return grain.sources.ArrayRecordDataSource(files) if files else []


def decode(raw: bytes) -> dict[str, np.ndarray] | None:
    """A record -> ``{"tokens": int32[n]}`` as text.ReadAndTokenize gives it (None: an unreadable document)."""
    if not raw:
        return None
    return {"tokens": np.frombuffer(raw, DTYPE).astype(np.int32)}


# ------------------------------------------------------------------------------ writing
class _Tokenize(ReadAndTokenize):
    """ReadAndTokenize that keeps a place for an unreadable document (an empty record)."""

    def __call__(self, doc: Document) -> bytes:
        out = super().__call__(doc)
        return b"" if out is None else out["tokens"].astype(DTYPE).tobytes()


def _write_split(docs: list[Document], tok, cfg: DataConfig, out: Path, split: str, num_shards: int,
                 threads: int, progress: bool) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    n = len(docs)
    shards = max(1, min(num_shards, n))
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    tokenized = iter(grain.MapDataset.source(docs).map(_Tokenize(tok, cfg.text_field)).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)))
    listed, tokens, done, last = [], 0, 0, 0.0
    for s in range(shards):
        name = f"{split}-{s:05d}-of-{shards:05d}{SUFFIX}"
        writer = ArrayRecordWriter(str(out / name), _WRITER_OPTIONS)
        for _ in range(bounds[s], bounds[s + 1]):
            raw = next(tokenized)
            writer.write(raw)
            tokens += len(raw) // DTYPE.itemsize
            done += 1
            if progress and (time.time() - last > 1 or done == n):
                last = time.time()
                print(f"\rprepare_data: {split}: {done}/{n} documents, {tokens:,} tokens", end="",
                      file=sys.stderr, flush=True)
        writer.close()
        listed.append({"file": name, "records": bounds[s + 1] - bounds[s]})
    if progress and n:
        print(file=sys.stderr)
    return {"shards": listed if n else [], "records": n, "tokens": tokens, "documents": documents_fingerprint(docs)}


def prepare(cfg: DataConfig, out: str | Path, tok, *, tokenizer_spec: str | None = None,
            shard_bytes: int = 512 << 20, threads: int = 4, progress: bool = True) -> dict:
    """Tokenize `cfg.path` into prepared shards in `out` (written to a temp dir, renamed when complete).

    Returns the metadata. `shard_bytes`: about how many token bytes go in one shard file."""
    out = Path(out).expanduser()
    if out.exists():
        raise ValueError(f"{out}: already exists (refusing to overwrite)")
    docs = list_documents(cfg)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits = {}
        # shard count from the source's size: BPE makes ~4 bytes of text one token, stored in 4 bytes
        src_bytes = sum(os.stat(f).st_size for f in {d.path for d in docs})
        for split in SPLITS:
            part = split_documents(docs, split, cfg.eval_fraction)
            shards = max(1, math.ceil(src_bytes * len(part) / len(docs) / shard_bytes))
            splits[split] = _write_split(part, tok, cfg, tmp, split, shards, threads, progress)
        meta = {"format": FORMAT, "version": VERSION, "source": str(cfg.path), "text_field": cfg.text_field,
                "eval_fraction": cfg.eval_fraction, "max_documents": cfg.max_documents, "dtype": DTYPE.str,
                "tokenizer": {"spec": tokenizer_spec, "id": tokenizer_id(tok), "n_words": tok.n_words},
                "splits": splits}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
