"""Training input pipeline on grain: documents -> Llama 3 tokens -> packed rows -> batches.

    list documents (paths / JSONL line offsets / Parquet rows; nothing is tokenized yet)  sources.py
      -> train/eval split by a hash of each document's identity (stable when the corpus grows)
      -> shard: this process keeps documents i % process_count == process_index
      -> shuffle (seed + epoch) and repeat               [grain MapDataset]           iterator.py
      -> read + tokenize, in reader threads (or worker processes):
           pretraining: BOS text EOS                                                  text.py
           fine-tuning: chat rendering + loss mask (SFT), chosen/rejected pair (DPO)  chat.py
      -> pack: pretraining concat-then-split into seq_len + 1 token rows;             packing.py
               fine-tuning first-fit into seq_len rows (records stay whole)
      -> shift into tokens/targets, batch, prefetch      [grain batch / ThreadPrefetch]

Why seq_len + 1 for pretraining: the row is cut into ``tokens = row[:-1]`` and ``targets = row[1:]``,
so the last input of a row still gets its true next token when that token belongs to the same
document. Long documents continue on the next row as a new segment whose positions restart at 0; RoPE
only sees position differences inside a row, so nothing is lost but the one token pair that straddles
the two rows. Fine-tuning records are shifted one by one before packing instead (chat.py).

The iterator state is grain's own (a few integers: document index, epoch, packer state), so it is
small, JSON-serialisable, and restores exactly.
"""

from .iterator import KINDS, BatchIterator, make_iterator, record_check
from .packing import BATCH_KEYS
from .sources import DataConfig, Document, list_documents, skipped_line_count, split_documents

__all__ = ["BATCH_KEYS", "KINDS", "BatchIterator", "DataConfig", "Document", "list_documents", "make_iterator",
           "record_check", "skipped_line_count", "split_documents"]
