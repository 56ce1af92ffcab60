"""Published per-chip figures that MFU, fit and bandwidth reports divide by: dense bf16 peak FLOP/s and
memory (HBM) size. Keys are matched as substrings of `device.device_kind`, first match wins, so the
more specific names come first ("TPU v5 lite" is a v5e, plain "TPU v5" a v5p)."""

from __future__ import annotations

GiB = 2**30

PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "TPU v5": 459e12}
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5p": 95 * GiB,
             "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB, "TPU v5": 95 * GiB, "H200": 141 * 10**9,
             "H100": 80 * 10**9, "A100": 80 * 10**9}


def lookup(table: dict, device_kind: str):
    """The first entry whose key is contained in `device_kind` (case-insensitive), else None."""
    kind = device_kind.lower()
    return next((v for k, v in table.items() if k.lower() in kind), None)
