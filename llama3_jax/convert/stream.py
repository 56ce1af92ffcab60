"""The tensor stream: each tensor a reader yields is checked against the config, cast and handed to
the writer before the next is read, so no side holds more than one tensor.

The checks are what make a bad source fail with one line naming its file and tensor instead of a
model that loads and is wrong: a tensor the config has no place for, the same tensor twice, a shape
that is not the config's (in our layout), and, at the end, any tensor the source never gave.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..failpoints import kill_point
from ..model.config import ModelConfig
from .tensors import ConvertError, Tensor, all_keys, expected_shapes


class Discard:
    """The writer of processes other than 0 when process 0 writes the output alone."""

    reads_slices = True

    def add(self, name: str, layer: int | None, array: np.ndarray) -> None:
        pass

    def finish(self) -> None:
        pass


def stream(reader, writer, cfg: ModelConfig, out_dtype: np.dtype, src: Path, progress: bool,
           start: float) -> int:
    """Every tensor of `reader` into `writer` (checked, cast unless the writer reads slices and casts
    them itself), then `writer.finish()`; the bytes read. `progress` draws a bar from `start` on."""
    shapes, keys = expected_shapes(cfg), set(all_keys(cfg))
    seen, done_bytes, last = set(), 0, 0.0
    for t in reader.tensors():
        _check(t, shapes, keys, seen)
        seen.add((t.name, t.layer))
        # a writer that reads slices casts them itself: a memory-mapped tensor is then read only there
        writer.add(t.name, t.layer, t.array if getattr(writer, "reads_slices", False)
                   else t.array.astype(out_dtype, copy=False))
        kill_point("convert.tensor")
        done_bytes += t.array.nbytes
        if progress and (time.time() - last >= 0.5 or len(seen) == len(keys)):
            last = time.time()
            _progress(len(seen), len(keys), done_bytes, start)
    missing = sorted(keys - seen, key=str)
    if missing:
        name, layer = missing[0]
        raise ConvertError(f"{src}: missing tensor {name}" + (f" of layer {layer}" if layer is not None else ""))
    writer.finish()
    kill_point("convert.finish")
    return done_bytes


def _check(t: Tensor, shapes: dict[str, tuple[int, ...]], keys: set, seen: set) -> None:
    """One incoming tensor: expected by the config, not seen before, of the config's shape."""
    key = (t.name, t.layer)
    if key not in keys:
        raise ConvertError(f"{t.origin}: unexpected tensor for this config")
    if key in seen:
        raise ConvertError(f"{t.origin}: duplicate tensor")
    if tuple(t.array.shape) != shapes[t.name]:
        raise ConvertError(f"{t.origin}: shape {tuple(t.array.shape)} does not match the config "
                           f"(expected {shapes[t.name]} in llama3-jax layout)")


def _progress(n: int, total: int, nbytes: int, start: float) -> None:
    secs = time.time() - start
    rate = nbytes / 1e6 / max(secs, 1e-9)
    eta = secs / n * (total - n) if n else 0
    bar = "#" * int(30 * n / total)
    sys.stderr.write(f"\rconvert [{bar:<30}] {n}/{total} tensors {rate:.1f} MB/s ETA {eta:.0f}s")
    sys.stderr.flush()
