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

Packed rows (`prepare_data --seq-len N`): a record is one row of N + 1 tokens and its segment ids, as
the raw pipeline packs the train documents in the order `data.seed = --seed` reads its first epoch
(eval: in order). Training then reads by index only this process's rows of each global batch
(`ProcessRows`); its iterator state is the global batch number. Rows read in stored order
(`data.shuffle: false`) are the raw run's batches up to the first epoch's last, padded row.

Fine-tuning records (`prepare_data --objective sft|dpo|reward`): a record is one SFT dialog's rendered
ids and assistant loss mask, or one DPO or reward pair's chosen and rejected ids and masks
(chat.render_sides; a reward pair also its margin, as float32 bits), uncut: `seq_len` is not fixed here
(a reward pair too long for the run's is skipped when read, as from JSONL). Training reads them by index in the raw pipeline's order (shuffle, repeat)
and cuts, shifts and packs them as it does records it renders itself, so it gets the same batches, and
the same losses, as from the JSONL/Parquet records they were made from. (`dpo.precompute_reference`
keys its table by source record, so it still reads JSONL/Parquet.)

What is fixed when preparing (a training run that asks otherwise is refused, naming the key): the
objective's record kind, the tokenizer, `text_field`, `eval_fraction` (the split), `max_documents`
and, packed, `seq_len`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from .chat import RECORD_CHECKS, RenderRecords, margin_of, render_sides
from .sources import DataConfig, Document, list_documents, read_record, split_documents
from .text import ReadAndTokenize, TokenizerHolder

FORMAT = "llama3-jax-prepared"
VERSION = 1
METADATA = "metadata.json"
SUFFIX = ".array_record"
SPLITS = ("train", "eval")
DTYPE = np.dtype("<i4")
READ_BLOCK = 64  # documents read together (BlockReads)
OBJECTIVES = {"text": "lm", "sft": "sft", "dpo": "dpo", "reward": "reward"}  # record kind -> the train objective that reads it
_KEYS = ("tokenizer", "text_field", "eval_fraction", "max_documents", "packed", "splits")
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
    missing = [k for k in _KEYS if k not in meta] or [f"splits.{k}" for k in SPLITS if k not in meta["splits"]]
    if missing:
        raise ValueError(f"{meta_path}: no {missing[0]} (made by another version of tools/prepare_data.py?)")
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            if not (root / shard["file"]).is_file():
                raise ValueError(f"{meta_path}: lists {shard['file']}, which is missing")
    return meta


def check_run(meta: dict, cfg: DataConfig, tok, kind: str, seq_len: int) -> None:
    """Refuse a run that asks for what was fixed when preparing (see the module docstring)."""
    where = f"data.path {cfg.path} (prepared data)"
    made = meta.get("kind", "text")
    if made != kind:
        raise ValueError(f"{where} was prepared for objective {OBJECTIVES[made]}, the run's objective is "
                         f"{OBJECTIVES[kind]} (prepare again with --objective {OBJECTIVES[kind]})")
    if meta["packed"] and meta["packed"]["seq_len"] != seq_len:
        raise ValueError(f"{where} is packed into rows for seq_len {meta['packed']['seq_len']}, the run has "
                         f"seq_len {seq_len} (set it, or prepare again with --seq-len {seq_len})")
    if meta["packed"] and cfg.shuffle_window:
        raise ValueError(f"{where} is packed into rows in a fixed order; data.shuffle_window applies when "
                         f"rows are packed at training time (set it to 0, or prepare without --seq-len)")
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


def decode_row(raw: bytes) -> dict[str, np.ndarray]:
    """A packed row -> the packer's row (packing.text_batch): tokens, segment ids, and positions,
    which restart at 0 at each segment start (a document continued from the previous row included)."""
    tokens, seg = np.frombuffer(raw, DTYPE).reshape(2, -1).astype(np.int32)
    idx = np.arange(seg.size, dtype=np.int32)
    start = np.maximum.accumulate(np.where(np.r_[True, seg[1:] != seg[:-1]], idx, 0))
    return {"tokens": tokens, "tokens_segment_ids": seg, "tokens_positions": np.where(seg > 0, idx - start, 0)}


def encode_sides(sides: list, margin: float | None = None) -> bytes:
    """A fine-tuning record's sides [(ids, mask), ...] -> int32: count, each side's length, then each
    side's ids and mask; then a reward pair's margin (`margin` not None), a float32's bits."""
    head = [len(sides), *(len(ids) for ids, _ in sides)]
    body = np.concatenate([np.asarray(head), *(np.r_[ids, mask] for ids, mask in sides)]).astype(DTYPE).tobytes()
    return body if margin is None else body + np.float32(margin).astype("<f4").tobytes()


def decode_margin(raw: bytes) -> float:
    """The margin `encode_sides` stored after the sides (0 when it stored none)."""
    a = np.frombuffer(raw, DTYPE)
    end = 1 + a[0] + 2 * int(a[1:1 + a[0]].sum())
    return float(np.frombuffer(raw[4 * end:], "<f4")[0]) if len(a) > end else 0.0


def decode_sides(raw: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    a = np.frombuffer(raw, DTYPE).astype(np.int32)
    lengths, at, sides = a[1:1 + a[0]], 1 + a[0], []
    for n in lengths:
        sides.append((a[at:at + n], a[at + n:at + 2 * n]))
        at += 2 * n
    return sides


class RecordExamples:
    """A prepared fine-tuning record -> the example the raw pipeline's RenderRecords makes of its source
    record (cut to seq_len, shifted; DPO: both sides; ``cut`` marking a first read it cut; reward: both
    whole sides and the margin, or None: skipped, named as `where`'s `split` record number)."""

    def __init__(self, render: RenderRecords, where: str, split: str = "train"):
        self.render, self.where, self.split = render, where, split

    def __call__(self, raw: bytes, key: int | None = None, first_read: bool = True) -> dict[str, np.ndarray] | None:
        where = self.where if key is None else f"{self.where}: {self.split} record {key}"
        return self.render.examples(decode_sides(raw), where, first_read, decode_margin(raw))

    def indexed(self, i: int, raw: bytes, key: int | None = None) -> dict[str, np.ndarray] | None:
        """Element `i` (record `key` of the split) of the repeated records (BlockReads with_index): as
        RenderRecords.indexed."""
        per_epoch = self.render.per_epoch
        return self(raw, key, per_epoch is None or i < per_epoch)


def _read(records, keys: list[int]) -> list[bytes]:
    """Records by key, together: ArrayRecord's `__getitems__` reads them in parallel (~0.1 ms a record
    here, against ~2 ms for one `__getitem__`; grain's own source wrapper reads one by one)."""
    return list(records.__getitems__(keys)) if keys else []


class BlockReads(grain.MapDataset):
    """Element i = `decode(records[keys[i]])`, the records read `block` at a time: `keys` is grain's
    index dataset (range -> shuffle -> repeat), so the element index, and the iterator state, are those
    of the raw pipeline (grain's source -> shuffle -> repeat). A consumer walks the indices in order, as
    grain's iterator does; the last few blocks are cached (not part of the state). `with_index`:
    `decode(i, raw, key)`, the element index as grain's map_with_index gives it, and the record's key."""

    def __init__(self, keys: grain.MapDataset, records, decode, block: int = READ_BLOCK, keep: int = 4,
                 with_index: bool = False):
        super().__init__(keys)
        self._records, self._decode, self._block, self._keep = records, decode, block, keep
        self._with_index = with_index
        self._blocks: dict[int, list] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        b = index // self._block
        with self._lock:  # grain's reader threads share the cache
            if b not in self._blocks:
                stop = min((b + 1) * self._block, len(self._parent))
                self._blocks[b] = _read(self._records, [self._parent[j] for j in range(b * self._block, stop)])
                for old in sorted(self._blocks)[:-self._keep]:
                    del self._blocks[old]
            raw = self._blocks[b][index - b * self._block]
        return self._decode(index, raw, self._parent[index]) if self._with_index else self._decode(raw)

    def __getstate__(self):  # worker processes start with an empty cache and their own lock
        return {**self.__dict__, "_blocks": {}, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"BlockReads(block={self._block})"


class ProcessRows(grain.MapDataset):
    """Element b = this process's rows [b * batch_size + start, b * batch_size + stop) of global batch b
    (`keys`: grain's index dataset over the rows), read together, each through `decode`, then
    `batch_fn`. Each process reads only its rows, and the element index (the iterator state) is the
    global batch number whatever the process count: elastic resume holds."""

    def __init__(self, keys: grain.MapDataset, records, batch_size: int, start: int, stop: int, decode, batch_fn):
        super().__init__(keys)
        self._records, self._batch_size, self._start, self._stop = records, batch_size, start, stop
        self._decode, self._batch_fn = decode, batch_fn
        self._length = -(-len(keys) // batch_size)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        base = index * self._batch_size
        stop = min(base + self._stop, len(self._parent))  # a finite split's last batch may be short
        rows = _read(self._records, [self._parent[j] for j in range(base + self._start, stop)])
        return self._batch_fn([self._decode(r) for r in rows])

    def __str__(self) -> str:
        return f"ProcessRows(batch_size={self._batch_size}, rows=[{self._start}, {self._stop}))"


# ------------------------------------------------------------------------------ writing
class _Tokenize(ReadAndTokenize):
    """ReadAndTokenize that keeps a place for an unreadable document (an empty record)."""

    def __call__(self, doc: Document) -> bytes:
        out = super().__call__(doc)
        return b"" if out is None else out["tokens"].astype(DTYPE).tobytes()


def _document_records(docs: list[Document], tok, cfg: DataConfig, read: grain.ReadOptions):
    """(record, tokens) per document, in order."""
    ds = grain.MapDataset.source(docs).map(_Tokenize(tok, cfg.text_field)).to_iter_dataset(read)
    for raw in ds:
        yield raw, len(raw) // DTYPE.itemsize


class _RenderSides(TokenizerHolder):
    """Document -> its fine-tuning record (encode_sides of chat.render_sides; reward: and the margin)."""

    def __init__(self, tokenizer, kind: str):
        super().__init__(tokenizer)
        self._kind = kind

    def __call__(self, doc: Document) -> bytes:
        record = read_record(doc)
        return encode_sides(render_sides(self._tokenizer, self._kind, record),
                            margin_of(record) if self._kind == "reward" else None)


def _side_records(docs: list[Document], tok, kind: str, read: grain.ReadOptions):
    """(record, tokens) per fine-tuning document, in order."""
    for raw in grain.MapDataset.source(docs).map(_RenderSides(tok, kind)).to_iter_dataset(read):
        yield raw, int(sum(len(ids) for ids, _ in decode_sides(raw)))


def _row_records(docs: list[Document], tok, cfg: DataConfig, read: grain.ReadOptions, seq_len: int,
                 seed: int | None):
    """(record, tokens) per packed row of seq_len + 1, as the raw pipeline packs the split's first epoch
    (documents shuffled with `seed`, None: in order): tokens and segment ids, int32."""
    ds = grain.MapDataset.source(docs)
    ds = (ds.shuffle(seed) if seed is not None else ds).map(ReadAndTokenize(tok, cfg.text_field))
    for row in ConcatThenSplitIterDataset(ds.to_iter_dataset(read), length_struct={"tokens": seq_len + 1}):
        seg = row["tokens_segment_ids"]
        yield np.stack([row["tokens"], seg]).astype(DTYPE).tobytes(), int(np.count_nonzero(seg))


def _progress(split: str, count: int, tokens: int, end: str) -> None:
    print(f"\rprepare_data: {split}: {count:,} records, {tokens:,} tokens", end=end, file=sys.stderr, flush=True)


def _write_split(records, out: Path, split: str, shard_bytes: int, progress: bool) -> dict:
    """Write `records` ((bytes, tokens) pairs) into shard files of about `shard_bytes` each."""
    from array_record.python.array_record_module import ArrayRecordWriter

    # progress: first after a second (a quick split prints nothing: the summary says it all), then each
    # second on one line (\r), closed with the split's final counts
    shards, writer, size, count, tokens, last, shown = [], None, 0, 0, 0, time.time(), False
    try:
        for raw, n in records:
            if writer is None or size >= shard_bytes:
                if writer is not None:
                    writer.close()
                shards.append({"file": f"{split}-{len(shards):05d}{SUFFIX}", "records": 0})
                writer, size = ArrayRecordWriter(str(out / shards[-1]["file"]), _WRITER_OPTIONS), 0
            writer.write(raw)
            shards[-1]["records"] += 1
            size, count, tokens = size + len(raw), count + 1, tokens + n
            if progress and time.time() - last > 1:
                last, shown = time.time(), True
                _progress(split, count, tokens, end="")
    finally:
        if writer is not None:
            writer.close()
    if shown:
        _progress(split, count, tokens, end="\n")
    return {"shards": shards, "records": count, "tokens": tokens}


def prepare(cfg: DataConfig, out: str | Path, tok, *, tokenizer_spec: str | None = None, seq_len: int | None = None,
            seed: int | None = 0, shard_bytes: int = 512 << 20, threads: int = 4, progress: bool = True,
            kind: str = "text") -> dict:
    """Tokenize `cfg.path` into prepared shards in `out` (written to a temp dir, renamed when complete):
    one record per document, or with `seq_len` packed rows (train documents shuffled with `seed`, None:
    in order; eval documents in order); `kind` sft/dpo/reward: one rendered record per valid fine-tuning record
    (bad ones reported and skipped as training does). Returns the metadata."""
    out = Path(out).expanduser()
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown record kind {kind!r} (choose from {', '.join(OBJECTIVES)})")
    if out.exists():
        raise ValueError(f"{out}: already exists (refusing to overwrite)")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if seq_len is not None and kind != "text":
        raise ValueError(f"--seq-len packs pretraining text; objective {OBJECTIVES[kind]} records are packed at "
                         f"training time (any seq_len)")
    docs = list_documents(cfg, RECORD_CHECKS[kind])
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
    try:
        splits = {}
        for split in SPLITS:
            part = split_documents(docs, split, cfg.eval_fraction)
            if kind != "text":
                records = _side_records(part, tok, kind, read)
            elif seq_len is None:
                records = _document_records(part, tok, cfg, read)
            else:
                records = _row_records(part, tok, cfg, read, seq_len, seed if split == "train" else None)
            splits[split] = _write_split(records, tmp, split, shard_bytes, progress)
            splits[split].update(documents=documents_fingerprint(part))
        meta = {"format": FORMAT, "version": VERSION, "source": str(cfg.path), "text_field": cfg.text_field,
                "eval_fraction": cfg.eval_fraction, "max_documents": cfg.max_documents, "dtype": DTYPE.str,
                "tokenizer": {"spec": tokenizer_spec, "id": tokenizer_id(tok), "n_words": tok.n_words},
                "packed": None if seq_len is None else {"seq_len": seq_len, "seed": seed}, "kind": kind,
                "splits": splits}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
