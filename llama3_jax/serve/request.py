"""A request, its completion, and the one rule for how a row ends.

Both decoding paths (continuous batching in scheduler.py, static batches in static_batch.py) end their
rows here: `stop_string_cut` (checked on live rows as their tokens arrive), `ended` (a row the device
has finished), `finished` (both, for a row that comes back whole), so a row ends the same way whichever
path ran it:
  * a stop TOKEN is never kept; the device reports how many tokens a row kept;
  * a row that kept its whole budget ends with "length" (its budget, or the context's end), one that
    kept fewer hit a stop token: "stop";
  * a stop STRING is found in the decoded text (it may span tokens) and ends the row with "stop": the
    tokens up to the one that completed it are kept, the text is cut before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and its knobs. `seed` and `row_seed` pick the random stream: fold_in(key(seed), row_seed).
    `ignore_eos`: this row does not stop at the run's stop ids (continuous batching; the server's
    per-request `ignore_eos`)."""
    tokens: Sequence[int]
    max_new_tokens: int       # the row's budget (the rest of the context when the caller gave none)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    row_seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


# the per-row device fields both decoding paths build from a batch's Requests (with `lengths`, which come
# from the padding, the `rows` of slots.place): field -> (Request attribute, dtype, the value of a padding row:
# greedy, no filters, a budget of one token)
_ROW_COLUMNS = {"seeds": ("seed", np.int32, 0), "row_seeds": ("row_seed", np.int32, 0),
                "temperature": ("temperature", np.float32, 0.0), "top_k": ("top_k", np.int32, 0),
                "top_p": ("top_p", np.float32, 1.0), "limit": ("max_new_tokens", np.int32, 1),
                "ignore_eos": ("ignore_eos", np.bool_, False)}


def row_columns(requests: Sequence[Request], rows: int) -> dict[str, np.ndarray]:
    """Host arrays (rows,) of each request's seeds, knobs and budget (`limit`); rows past len(requests)
    are batch padding with neutral values."""
    pad = rows - len(requests)
    return {f: np.array([getattr(r, attr) for r in requests] + [fill] * pad, dtype)
            for f, (attr, dtype, fill) in _ROW_COLUMNS.items()}


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]     # generated ids, without the stop token
    finish_reason: str    # "stop" (a stop token or string was generated) or "length" (its budget or the context's end)
    text: str | None = None
    stop_token: int | None = None  # the stop token that ended a "stop" row (never in `tokens`); None: not
    # ended by one, or not reported (the static path); continuous batching reports it (RL's completions)


def cut_at_stop(tokens: list[int], stops: Sequence[str], decode: Callable[[list[int]], str],
                checked: int = 0) -> tuple[int, str] | None:
    """The first stop string in decode(tokens): (tokens kept, text before the stop string), or None.

    Kept are the fewest tokens whose text holds a stop string: a stop string may span two or more
    tokens, and the last kept token may carry text past it (cut from `text`, kept in `tokens`).
    `checked`: a prefix of that many tokens is known to hold none.
    """
    if not stops or not any(s in decode(tokens) for s in stops):
        return None
    for n in range(checked + 1, len(tokens) + 1):
        text = decode(tokens[:n])
        found = [text.find(s) for s in stops if s in text]
        if found:
            return n, text[:min(found)]
    return None  # not prefix-stable (an incomplete character completed later): no cut


def stop_string_cut(tokens: list[int], stops: Sequence[str], decode: Callable[[list[int]], str] | None,
                    checked: int = 0) -> Completion | None:
    """The row's Completion if its tokens hold one of its stop strings, else None (also without a
    decoder: the caller asked for no text and gave no stop strings)."""
    if not stops or decode is None:
        return None
    cut = cut_at_stop(tokens, stops, decode, checked)
    return None if cut is None else Completion(tokens[:cut[0]], "stop", cut[1])


def ended(tokens: list[int], budget: int, decode: Callable[[list[int]], str] | None,
          stop_token: int | None = None) -> Completion:
    """The Completion of a row the device has finished (no stop string in it): "length" when it kept its
    whole `budget` of tokens, "stop" when a stop token ended it sooner (`stop_token`, when known)."""
    reason = "length" if len(tokens) >= budget else "stop"
    return Completion(tokens, reason, decode(tokens) if decode is not None else None,
                      stop_token if reason == "stop" else None)


def finished(tokens: list[int], budget: int, stops: Sequence[str], decode: Callable[[list[int]], str] | None
             ) -> Completion:
    """A whole finished row: cut at its first stop string if it holds one, else as `ended` says."""
    return stop_string_cut(tokens, stops, decode) or ended(tokens, budget, decode)


def generated_tokens(c: Completion, stops, decode) -> int:
    """The tokens a row generated: those it kept, plus the stop token that ended it (never kept). A row
    ended by a stop STRING kept the token that completed it (above): nothing to add. Its text is
    cut before the stop string, so it is shorter than its tokens' text; a stop token's row has the
    whole text."""
    by_token = c.finish_reason == "stop" and (not stops or c.text == decode(c.tokens))
    return len(c.tokens) + by_token
