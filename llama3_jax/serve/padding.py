"""Host-side left-padding: prompts right-aligned in a fixed number of slots, so every row's last token
sits in the same slot (the contiguous cache's one-write-slot rule, kv_cache.py).

One copy for every caller: the static path and scoring cut sorted sequences into whole batches
(`left_padded_batches`); the scheduler pads the prompts it admits at one host visit (`left_pad`).
Padding rows (past the real ones) hold one zero token, length 1, so a batch always has its full row
count (one compile per shape) and the device never sees a zero-length row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .slots import bucket


def left_pad(seqs: Sequence[Sequence[int]], width: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """`seqs` right-aligned in `width` slots -> tokens (rows, width) int32, lengths (rows,) int32; rows
    past len(seqs) are padding (one zero token)."""
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, s in enumerate(seqs):
        tokens[r, width - len(s):] = s
        lengths[r] = len(s)
    return tokens, lengths


def left_padded_batches(seqs: Sequence[Sequence[int]], batch_size: int, width=bucket
                        ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Sequences sorted longest first (less padding; the largest shapes compile and allocate first, so a
    memory problem shows at once), cut into batches of `batch_size` rows, each left-padded to a
    power-of-two bucket (or `width(longest)`). Yields (indices of the batch's sequences, tokens (B, P),
    lengths (B,)); rows past len(indices) are padding (length 1, all zeros) so every batch has B rows."""
    b = min(batch_size, len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), b):
        rows = order[start:start + b]
        p = width(max(len(seqs[i]) for i in rows))
        tokens, lengths = left_pad([seqs[i] for i in rows], p, b)
        yield rows, tokens, lengths
