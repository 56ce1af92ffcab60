"""Host I/O when several processes run one job: process 0 reads, every process computes, process 0 writes.

`generate` and `score` across hosts run one global batch: every process must run the same compiled
programs in the same order with the same inputs, or the collectives inside them wait for each other
forever. So the decisions that shape those programs (which lines to run, which rows go in which slot,
when a row is finished) may only derive from data every process holds alike:

  * `on_main(fn)`: process 0 alone runs `fn` (read the input file, the output's ids for a resume, write
    the error lines) and every process gets its JSON result, or its error, through `broadcast_bytes`;
  * `to_host(x)`: a device result as one numpy array on every process, gathered from the other hosts
    when its rows are spread over them (the continuous-batching scheduler reads each chunk's tokens
    and done mask this way, so its refills are the same everywhere).

In one process both are plain calls: no JSON round trip, no collective.
"""

from __future__ import annotations

import json

import jax
import numpy as np

# errors that keep their type on every process (the CLI reports them as one line, exit status 2)
_KEPT = (FileNotFoundError, OSError, KeyError, ValueError)
CHUNK = 1 << 24  # broadcast payloads in pieces of at most 16 MiB (each a device buffer on every host)


def several() -> bool:
    return jax.process_count() > 1


def to_host(x) -> np.ndarray:
    """`x` as a numpy array on this host: its own copy when it has one (addressable or replicated),
    else gathered over the processes (a collective: every process calls it, in the same order)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's `data` on every process (the others pass None). A collective."""
    from jax.experimental import multihost_utils
    main = jax.process_index() == 0
    n = len(data) if main else 0
    # two int32 halves: without x64 an int64 would be cut to 32 bits
    hi, lo = (int(v) for v in multihost_utils.broadcast_one_to_all(np.array([n >> 30, n & (2**30 - 1)], np.int32)))
    n = (hi << 30) | lo
    out, start = bytearray(), 0
    while start < n:
        size = min(CHUNK, 1 << (n - start - 1).bit_length())  # power-of-two pieces: few compiled broadcasts
        piece = np.zeros(size, np.uint8)
        if main:
            chunk = np.frombuffer(data, np.uint8, count=min(size, n - start), offset=start)
            piece[:len(chunk)] = chunk
        got = multihost_utils.broadcast_one_to_all(piece)
        out += got[:min(size, n - start)].tobytes()
        start += size
    return bytes(out)


def on_main(fn):
    """`fn()` run by process 0 alone; every process returns its result (JSON-able: it comes back as
    JSON gives it, lists for tuples), or raises its error (a ValueError, KeyError or OSError as that
    builtin type with its message, so each process reports it as its own; anything else becomes a
    RuntimeError on the others). Every process must call it, in the same order. One process: `fn()` itself."""
    if not several():
        return fn()
    data, error = None, None
    if jax.process_index() == 0:
        try:
            data = json.dumps({"value": fn()}, ensure_ascii=False).encode()
        except Exception as e:  # noqa: BLE001 (the others must hear of any failure, or they wait forever)
            error = e
            kind = next((k.__name__ for k in _KEPT if isinstance(e, k)), None)
            data = json.dumps({"error": kind, "message": str(e) if kind else f"{type(e).__name__}: {e}"}).encode()
    payload = json.loads(broadcast_bytes(data))
    if error is not None:
        raise error
    if "error" in payload:
        kind = {k.__name__: k for k in _KEPT}.get(payload["error"])
        if kind is None:
            raise RuntimeError(f"process 0 failed: {payload['message']}")
        raise kind(payload["message"])
    return payload["value"]
