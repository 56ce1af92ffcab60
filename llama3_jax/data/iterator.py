"""The batch iterator: documents -> shuffled, sharded, tokenized, packed, batched, prefetched, with
grain's small JSON iterator state for checkpoints (see the package docstring for the steps).

What can go wrong with a saved state, and what catches it:
  * resuming with another pipeline (another data.path, batch_size, seed, ...): the state's fingerprint
    is compared entry by entry, and a difference is refused in one line naming the run's key, its
    value in the checkpoint and now, and the way out (a new workdir, or the key set back). The state
    also records the keys that decide the documents (``source``: data.path -- for prepared data the
    corpus it was prepared from, so raw and prepared states stay interchangeable --, max_documents,
    eval_fraction, text_field), so a changed document list names the key that changed it; a state
    without them (older checkpoints) still resumes, and its message names the candidates.
  * a truncation count that restarts at 0 on resume, or counts read-ahead or re-reads: the count
    (``truncated``) rides in the batches (packing.TRUNCATED_KEY, first reads only) and is added when
    the caller takes a batch, and saved in the state, so a resumed run reports what an uninterrupted
    one does; a state without it resumes at 0.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags as absl_flags
from grain.experimental import (ConcatThenSplitIterDataset, FirstFitPackIterDataset, ThreadPrefetchIterDataset,
                                WindowShuffleIterDataset)

from . import prepared
from .prepared import OBJECTIVES
from .chat import RECORD_CHECKS, RenderRecords
from .packing import EXAMPLE_KEYS, TRUNCATED_KEY, example_batch, text_batch
from .sources import DataConfig, Document, list_documents, split_documents
from .text import ReadAndTokenize

KINDS = ("text", "sft", "dpo", "reward")
# In-process reading: threads that read + tokenize, and documents read ahead of the packer.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
# Prepared rows are read a batch (this process's rows) at a time: a couple of batches ahead.
_ROW_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


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


def record_check(kind: str):
    """The validation `list_documents` applies to JSONL/Parquet records of a pipeline kind (None: text)."""
    return RECORD_CHECKS[kind]


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
        documents: list[Document] | None,
        num_documents: int,
        rows: int,
        seq_len: int,
        process_count: int,
        fingerprint: dict[str, Any],
        source: dict[str, Any] | None = None,
    ):
        self._it = dataset.__iter__()
        self.documents = documents  # the split's documents (every process reads them all); None: prepared data
        self.num_documents = num_documents
        self.rows, self.seq_len, self.process_count = rows, seq_len, process_count
        self._fingerprint = fingerprint
        self._source = source or {}
        self._truncated = 0

    @property
    def truncated(self) -> int:
        """Fine-tuning records cut to fit seq_len in the batches taken so far, over every (re)start: each
        record once (its first epoch's read), in every process the count of the global batches."""
        return self._truncated

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
        batch = next(self._it)
        cut = batch.pop(TRUNCATED_KEY, None)
        if cut is not None:
            self._truncated += int(cut)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"fingerprint": dict(self._fingerprint), "source": dict(self._source),
                "truncated": self._truncated, "grain": _jsonable(self._it.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        why = mismatch(state, self._fingerprint, self._source)
        if why:
            raise ValueError(f"data iterator state is for another pipeline: {why}")
        self._it.set_state(_from_json(state["grain"]))
        self._truncated = int(state.get("truncated", 0))  # states saved before the count was kept: 0

    def close(self) -> None:
        """Stop prefetch threads and worker processes."""
        self._it.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# fingerprint entry -> the run's key that sets it (None: set by the caller, not by a key)
_KEY_OF = {"seq_len": "seq_len", "rows": "batch_size", "seed": "seed", "shuffle": "data.shuffle",
           "worker_count": "data.worker_count", "kind": "objective", "packing_bins": "data.packing_bins",
           "packed_rows": "data.path (its packed rows)", "split": None, "num_epochs": None}
_SOURCE_KEYS = ("data.path", "data.max_documents", "data.eval_fraction", "data.text_field")


def mismatch(state: dict[str, Any], fingerprint: dict[str, Any], source: dict[str, Any]) -> str | None:
    """Why a saved iterator state cannot continue in the pipeline of `fingerprint` (and `source`, the
    run's keys that decide its documents), naming the run's key, its old and new value, and the way out;
    None when it can."""
    saved = state.get("fingerprint", {})
    name = next((n for n in fingerprint if saved.get(n) != fingerprint[n]), None)
    if name is None:
        return None
    old, now = saved.get(name), fingerprint[name]
    if name == "documents":
        return _documents_mismatch(old, now, state.get("source") or {}, source)
    if name == "kind":  # the text pipeline has no "kind" entry
        old, now = (OBJECTIVES[v or "text"] for v in (old, now))
    key = _KEY_OF.get(name) or f"the iterator's {name}"
    return f"{key} was {old!r}, now {now!r}; use a new workdir, or set {key} back to {old!r}"


def _documents_mismatch(old: str | None, now: str, saved: dict, source: dict) -> str:
    """The documents differ: name the keys that changed them, else say what else can have."""
    def count(docs_id):
        if docs_id is None:
            return "none recorded"
        n, _, digest = docs_id.partition(":")
        return f"{n} documents (keys' sha1 {digest[:10]})"

    what = f"the split's documents were {count(old)}, now {count(now)}"
    changed = [k for k in _SOURCE_KEYS if k in saved and k in source and saved[k] != source[k]]
    if changed:
        was = "; ".join(f"{k} was {saved[k]!r}, now {source[k]!r}" for k in changed)
        back = " and ".join(f"{k} back to {saved[k]!r}" for k in changed)
        return f"{was} ({what}); use a new workdir, or set {back}"
    if saved:
        return (f"{what}: the records of data.path {source.get('data.path')!r} changed since the checkpoint; "
                f"use a new workdir, or put back the data it was trained on")
    return (f"{what}: data.path ({source.get('data.path')!r} now), data.max_documents, data.eval_fraction or "
            f"the records changed (this checkpoint does not record which); use a new workdir, or set them back")


def uses_prepared(cfg: DataConfig) -> bool:
    """Whether `cfg.path` is read as prepared ArrayRecord shards (data.format, else detected)."""
    if cfg.format == "auto":
        return cfg.path != "stdlib" and prepared.is_prepared(cfg.path)
    return cfg.format == "array_record"


def corpus_documents(cfg: DataConfig, kind: str = "text") -> list[Document] | None:
    """Every document of a raw corpus (make_iterator's ``documents``), for a run to list once rather
    than at every eval; None for prepared data, which is never listed."""
    return None if uses_prepared(cfg) else list_documents(cfg, record_check(kind))


def split_sizes(cfg: DataConfig, documents: list[Document] | None) -> dict[str, int]:
    """Documents per split, {"train": n, "eval": m}: from metadata.json for prepared data (no record
    read), else from `documents` (corpus_documents)."""
    if documents is None:
        meta = prepared.load_metadata(cfg.path)
        return {split: meta["splits"][split]["records"] for split in prepared.SPLITS}
    return {split: len(split_documents(documents, split, cfg.eval_fraction)) for split in prepared.SPLITS}


def _rows_of(batch: dict, *, start: int, stop: int) -> dict:
    """This process's rows of a global batch; a 0-d entry (the batch's truncation count) is the batch's."""
    return {k: np.ascontiguousarray(v[start:stop]) if v.ndim else v for k, v in batch.items()}


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
    kind: str = "text",
    reference: dict | None = None,
    pair_index: bool = False,
    documents: list[Document] | None = None,
) -> BatchIterator:
    """Build the batch iterator for one process (see module docstring for the steps).

    ``batch_size`` is global; this process gets ``batch_size // process_count`` rows.
    Train loops forever (reshuffled each epoch with ``seed + epoch``) unless
    ``num_epochs`` is set; eval is one pass in file order. ``kind``: ``text`` (pretraining),
    ``sft``, ``dpo`` or ``reward`` (fine-tuning records, chat.py; reward adds the float32 key ``margin``). DPO only: ``reference`` (document key ->
    (chosen, rejected) reference log-probs) adds the float32 batch key ``ref_logps``; ``pair_index``
    adds ``pair`` (each token's index into ``.documents``) for the pass that computes them.
    ``documents``: `list_documents(cfg, record_check(kind))` when the caller already has it (a
    training run lists the corpus once, not at every eval). Prepared data (prepared.py) lists nothing.
    """
    _check_arguments(cfg, kind, seq_len, batch_size, seed, process_index, process_count)
    rows = batch_size // process_count
    shuffle = cfg.shuffle and split == "train"
    if split == "eval":
        num_epochs = num_epochs or 1
    # Every process reads the same global order and keeps its rows of each batch (below): the order
    # does not depend on the process count, so N processes' checkpoint continues on M (elastic resume).
    src = _open_source(cfg, tokenizer, kind, seq_len, split, documents)
    ds = src.dataset.shuffle(seed) if shuffle else src.dataset  # grain reshuffles each epoch with seed + epoch
    this_process = dict(start=process_index * rows, stop=(process_index + 1) * rows)
    if src.rows_packed is not None:  # rows read by index: each process reads only its rows of each batch
        batches = prepared.ProcessRows(
            ds.repeat(num_epochs), src.records, batch_size, this_process["start"], this_process["stop"], src.read,
            functools.partial(text_batch, n_rows=rows, seq_len=seq_len)).to_iter_dataset(_ROW_READ_OPTIONS)
    else:
        if kind == "text":
            packed, batch_fn = _pack_text(cfg, src, ds.repeat(num_epochs), seq_len, shuffle, seed)
        else:
            packed, batch_fn = _pack_examples(cfg, src, ds, tokenizer, kind, seq_len, num_epochs,
                                              reference, pair_index, split)
        batches = packed.batch(
            batch_size, batch_fn=functools.partial(batch_fn, n_rows=batch_size, seq_len=seq_len)
        )
        if process_count > 1:  # the global batch is the same in every process; each keeps its rows
            batches = batches.map(functools.partial(_rows_of, **this_process))
    return BatchIterator(
        _prefetch(batches, cfg),
        documents=src.documents,
        num_documents=src.num_documents,
        rows=rows,
        seq_len=seq_len,
        process_count=process_count,
        fingerprint=_fingerprint(cfg, src, kind, split, seq_len, batch_size, seed, shuffle, num_epochs),
        source={"data.path": src.corpus, "data.max_documents": cfg.max_documents,
                "data.eval_fraction": cfg.eval_fraction, "data.text_field": cfg.text_field},
    )


def _check_arguments(cfg: DataConfig, kind: str, seq_len: int, batch_size: int, seed: int, process_index: int,
                     process_count: int) -> None:
    """make_iterator's arguments, refused before anything is read."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} (choose from {', '.join(KINDS)})")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if not 0 <= process_index < process_count or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must divide over process_count {process_count} "
            f"and 0 <= process_index {process_index} < process_count"
        )
    if cfg.worker_count < 0 or cfg.prefetch < 0 or cfg.shuffle_window < 0:
        raise ValueError(f"worker_count, prefetch and shuffle_window must be >= 0: {cfg}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")


class _Source(NamedTuple):
    """One split's records before shuffling: what grain iterates (`dataset`: documents, or prepared
    record indices) and how an item becomes tokens (`read`)."""
    documents: list[Document] | None  # the split's documents; None: prepared data
    documents_id: str                 # the fingerprint's "documents"
    num_documents: int
    records: Any                      # prepared.source for prepared data, else None
    dataset: grain.MapDataset
    read: Any
    rows_packed: tuple[int, int] | None  # prepared data packed into rows: (seed it was shuffled with, row count)
    corpus: str                       # the records' data.path: for prepared data, the one it was prepared from


def _open_source(cfg: DataConfig, tokenizer, kind: str, seq_len: int, split: str,
                 documents: list[Document] | None) -> _Source:
    """The split's records: prepared ArrayRecord shards (checked against this run), else the raw corpus's
    documents (listed here unless the caller passes them)."""
    if uses_prepared(cfg):
        meta = prepared.load_metadata(cfg.path)
        prepared.check_run(meta, cfg, tokenizer, kind, seq_len)
        docs_id = meta["splits"][split]["documents"]
        n_docs = int(docs_id.split(":")[0])
        # the record keys go through grain (shuffle, repeat: the raw pipeline's indices); prepared.py reads
        records = prepared.source(cfg.path, meta, split)
        src = _Source(None, docs_id, n_docs, records, grain.MapDataset.range(len(records)), prepared.decode, None,
                      meta.get("source", cfg.path))
        if meta["packed"]:
            src = src._replace(rows_packed=(meta["packed"]["seed"], meta["splits"][split]["records"]),
                               read=prepared.decode_row)
    else:
        docs = documents if documents is not None else list_documents(cfg, record_check(kind))
        docs = split_documents(docs, split, cfg.eval_fraction)
        src = _Source(docs, prepared.documents_fingerprint(docs), len(docs), None, grain.MapDataset.source(docs),
                      ReadAndTokenize(tokenizer, cfg.text_field), None, cfg.path)
    # An empty eval split ends at once; the caller feeds padding batches.
    if not src.num_documents and split == "train":
        raise ValueError(f"no {split} documents in data path {cfg.path} (eval_fraction={cfg.eval_fraction})")
    return src


def _pack_text(cfg: DataConfig, src: _Source, ds: grain.MapDataset, seq_len: int, shuffle: bool, seed: int):
    """Pretraining: documents read and tokenized, concatenated and cut into rows of seq_len + 1 tokens.
    Returns (rows, the batch function)."""
    ds = prepared.BlockReads(ds, src.records, src.read) if src.documents is None else ds.map(src.read)
    packed = ConcatThenSplitIterDataset(
        ds.to_iter_dataset(_READ_OPTIONS), length_struct={"tokens": seq_len + 1}
    )
    if shuffle and cfg.shuffle_window > 1:  # tokens flow through in order; rows leave mixed
        packed = WindowShuffleIterDataset(packed, window_size=cfg.shuffle_window, seed=seed)
    return packed, text_batch


def _pack_examples(cfg: DataConfig, src: _Source, ds: grain.MapDataset, tokenizer, kind: str, seq_len: int,
                   num_epochs: int | None, reference: dict | None, pair_index: bool, split: str):
    """Fine-tuning: records rendered into examples (chat.py), packed first-fit into rows of seq_len.
    Returns (rows, the batch function); each batch counts the records it holds cut at their first read."""
    if src.documents is None and (reference is not None or pair_index):
        raise ValueError(f"data.path {cfg.path} (prepared data): dpo.precompute_reference keys its table by "
                         f"source record; give the JSONL/Parquet records, or set it to false")
    index = {d.key: i for i, d in enumerate(src.documents)} if pair_index else None
    render = RenderRecords(tokenizer, kind, seq_len, reference, index, per_epoch=len(ds))
    ds = ds.repeat(num_epochs)  # prepared: the records rendered when preparing, cut and shifted here
    # with the element index: reads past the first epoch's are not counted again (chat.py)
    ds = ds.map_with_index(render.indexed) if src.documents is not None else prepared.BlockReads(
        ds, src.records, prepared.RecordExamples(render, f"{cfg.path} (prepared)", split).indexed, with_index=True)
    keys = EXAMPLE_KEYS + ("cut",) + (("half",) if kind in ("dpo", "reward") else ())
    keys += ("margin",) if kind == "reward" else ()
    keys += (("ref_logps",) if reference is not None else ()) + (("pair",) if pair_index else ())
    packed = FirstFitPackIterDataset(
        ds.to_iter_dataset(_READ_OPTIONS), length_struct={k: seq_len for k in keys},
        num_packing_bins=cfg.packing_bins, shuffle_bins=False,
    )
    return packed, example_batch


def _prefetch(batches: grain.IterDataset, cfg: DataConfig) -> grain.IterDataset:
    """Batches made ahead in worker processes (data.worker_count) and a prefetch thread (data.prefetch)."""
    if cfg.worker_count:
        # grain reads an absl flag when starting workers; outside absl.app it is unparsed.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    if cfg.prefetch:
        batches = ThreadPrefetchIterDataset(batches, prefetch_buffer_size=cfg.prefetch)
    return batches


def _fingerprint(cfg: DataConfig, src: _Source, kind: str, split: str, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool, num_epochs: int | None) -> dict[str, Any]:
    """What a restored iterator state must agree with: it only makes sense for the same documents read
    the same way (BatchIterator.set_state compares every entry)."""
    return {
        "documents": src.documents_id,
        "split": split,
        "seq_len": seq_len,
        "rows": batch_size,  # global: the same state in every process, whatever their number
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "worker_count": cfg.worker_count,
        **({} if kind == "text" else {"kind": kind, "packing_bins": cfg.packing_bins}),
        # rows packed when preparing: another pipeline than packing documents here
        **({} if src.rows_packed is None else
           {"packed_rows": f"{src.rows_packed[1]} rows, seed {src.rows_packed[0]}"}),
    }
