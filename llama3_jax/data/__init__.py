"""Training input pipeline on grain: documents -> Llama 3 tokens -> packed rows -> batches.

    list documents (paths / JSONL line offsets / Parquet rows; nothing is tokenized yet)  sources.py
      -> train/eval split by a hash of each document's identity (stable when the corpus grows)
      -> shuffle (seed + epoch) and repeat               [grain MapDataset]           iterator.py
      -> read + tokenize, in reader threads (or worker processes):
           pretraining: BOS text EOS                                                  text.py
           fine-tuning: chat rendering + loss mask (SFT), chosen/rejected pair (DPO, reward)  chat.py
           online RL: prompt records, a batch of rendered prompts per step (no packing)   prompts.py
      -> pack: pretraining concat-then-split into seq_len + 1 token rows;             packing.py
               fine-tuning first-fit into seq_len rows (records stay whole)
      -> shift into tokens/targets, global batch, prefetch [grain batch / ThreadPrefetch]
      -> this process's rows of the global batch: every process reads the same order, so the order
         does not depend on the process count (elastic resume; each process tokenizes the whole batch)

Why seq_len + 1 for pretraining: the row is cut into ``tokens = row[:-1]`` and ``targets = row[1:]``,
so the last input of a row still gets its true next token when that token belongs to the same
document. Long documents continue on the next row as a new segment whose positions restart at 0; RoPE
only sees position differences inside a row, so nothing is lost but the one token pair that straddles
the two rows. Fine-tuning records are shifted one by one before packing instead (chat.py).

Prepared data (prepared.py, made by tools/prepare_data.py) enters after the split: ArrayRecord
shards holding each document's tokens, read by index, so a run lists, parses and hashes nothing; the
steps after it are the same, and so are the batches.

The iterator state is grain's own (a few integers: document index, epoch, packer state), with the
pipeline's fingerprint, the keys that chose its documents and the count of records cut to seq_len
(iterator.py), so it is small, JSON-serialisable, restores exactly, and is refused by another pipeline.
"""

import importlib

# Loaded on first use: `DataConfig` (sources.py), `BATCH_KEYS` (packing.py) and chat rendering import
# without grain, which only the iterators need, so train/config.py and the step (and with them the GRPO
# path that benchmarks/gpu_bench.py times) run on a GPU image without grain.
_LAZY = {
    "KINDS": ".iterator", "BatchIterator": ".iterator", "corpus_documents": ".iterator", "make_iterator": ".iterator",
    "record_check": ".iterator", "split_sizes": ".iterator",
    "BATCH_KEYS": ".packing",
    "PromptIterator": ".prompts", "render_prompt": ".prompts",
    "DataConfig": ".sources", "Document": ".sources", "list_documents": ".sources",
    "skipped_line_count": ".sources", "split_documents": ".sources",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'llama3_jax.data' has no attribute {name!r}")
