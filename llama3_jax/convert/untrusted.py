"""Checks on downloaded checkpoint files before anything is allocated from what they declare.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}} and the data. Every number in it comes from whoever made the file: a
header length of 2^63 would have us read (and allocate) that much; overlapping or out-of-range
offsets would make one tensor's bytes another's, or read past the file; a shape that disagrees with
the byte count would reshape garbage. An index file (`model.safetensors.index.json`) names shard
files: a `../../etc/passwd`, an absolute path, a backslash or a symlink out of the directory must not
be opened (the one check of store/safe_paths.py, which bucket keys and manifests go through too).
Each check raises ConvertError naming the file and the tensor or entry at fault.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..store.safe_paths import UnsafePath, inside
from .tensors import ConvertError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def check_header_size(path: Path, n: int, file_size: int) -> None:
    """Before reading the JSON header: its declared length is sane and inside the file."""
    if n > MAX_HEADER_BYTES:
        raise ConvertError(f"{path}: safetensors header of {n} bytes declared (more than {MAX_HEADER_BYTES}): "
                           f"refusing to read it")
    if 8 + n > file_size:
        raise ConvertError(f"{path}: truncated safetensors file (header of {n} bytes, file {file_size})")


def check_tensor_table(path: Path, header: dict, itemsizes: dict[str, int], data_bytes: int) -> None:
    """Every entry well-formed; dtype x shape == its byte count; offsets inside the data and disjoint."""
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: safetensors header is not a JSON object")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ConvertError(f"{path}: tensor {name}: header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in itemsizes:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ConvertError(f"{path}: tensor {name}: shape {shape!r} is not a list of sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ConvertError(f"{path}: tensor {name}: data_offsets {offsets!r} is not [begin, end] with begin <= end")
        begin, end = offsets
        if end > data_bytes:
            raise ConvertError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] run past the end of the "
                               f"data ({data_bytes} bytes; truncated or corrupt file)")
        want = math.prod(shape) * itemsizes[dtype]
        if end - begin != want:
            raise ConvertError(f"{path}: tensor {name}: {dtype} {shape} needs {want} bytes, data_offsets "
                               f"[{begin}, {end}] hold {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ConvertError(f"{path}: tensors {n0} [{b0}, {e0}] and {n1} [{b1}, {e1}] overlap")


def check_index_entry(index: Path, src: Path, name: object) -> Path:
    """The shard file an index entry names, which must be a plain relative path inside `src`."""
    if not isinstance(name, str) or not name:
        raise ConvertError(f"{index}: weight_map entry {name!r} is not a file name")
    try:
        return inside(src, name)
    except UnsafePath as e:
        raise ConvertError(f"{index}: {name!r} points outside {src} (it {e}): refusing to open it") from None


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
