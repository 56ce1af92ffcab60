"""Rows -> the model's batch arrays (BATCH_KEYS), for both kinds of packing.

Pretraining concatenates documents and splits the stream into rows of seq_len + 1 (grain's
ConcatThenSplitIterDataset): a long document continues on the next row. Fine-tuning examples are
already shifted (a reward model's: whole sides, chat.py) and must stay whole (a dialog's loss mask, a DPO pair's two sides), so they are packed
first-fit into rows of seq_len (grain's FirstFitPackIterDataset) and padded.
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
EXAMPLE_KEYS = ("tokens", "targets", "loss_mask", "positions")
# DPO with precomputed reference log-probs (float32), its pre-pass; reward: each pair's margin (float32, on
# every token of both sides; every reward example has it, 0 when the record gives none)
EXTRA_KEYS = ("ref_logps", "pair", "margin")
# fine-tuning: the batch's count of records cut to fit, first reads only (a 0-d int32, from the examples'
# ``cut``: chat.py); the iterator takes it out of the batch and adds it to its checkpointed total
TRUNCATED_KEY = "truncated"


def text_batch(rows: list[dict[str, np.ndarray]], *, n_rows: int, seq_len: int) -> dict:
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


def example_batch(rows: list[dict[str, np.ndarray]], *, n_rows: int, seq_len: int) -> dict:
    """First-fit packed rows of examples -> (n_rows, seq_len) int32 arrays.

    Each example is one segment (1, 2, ... in the row). A DPO or reward pair (``half`` 1 = chosen,
    2 = rejected) is two: pair p of a row is segments 2p - 1 (chosen) and 2p (rejected), which is how
    objectives.dpo and objectives.pair_last_positions find the two sides of a pair.
    """
    out = {k: np.zeros((n_rows, seq_len), np.int32) for k in BATCH_KEYS}
    for i, row in enumerate(rows):
        for k in EXAMPLE_KEYS:
            out[k][i] = row[k]
        seg = row["tokens_segment_ids"]
        out["segment_ids"][i] = np.where(seg > 0, 2 * seg - 2 + row["half"], 0) if "half" in row else seg
        for k in EXTRA_KEYS:
            if k in row:
                out.setdefault(k, np.zeros((n_rows, seq_len), row[k].dtype))[i] = row[k]
    for k in EXTRA_KEYS:  # an all-padding batch still has the keys
        if rows and k in rows[0]:
            out.setdefault(k, np.zeros((n_rows, seq_len), rows[0][k].dtype))
    out[TRUNCATED_KEY] = np.asarray(sum(int(row["cut"].sum()) for row in rows if "cut" in row), np.int32)
    return out
