"""Published per-chip figures that MFU, fit and bandwidth reports divide by: dense bf16 peak FLOP/s,
memory (HBM) size and bandwidth, and the chip-to-chip interconnect's bandwidth (TPU ICI, bidirectional
per chip; NVLink on GPUs). Keys are matched as substrings of `device.device_kind`, first match wins, so the
more specific names come first ("TPU v5 lite" is a v5e, plain "TPU v5" a v5p)."""

from __future__ import annotations

GiB = 2**30

PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "TPU v5": 459e12}
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5p": 95 * GiB,
             "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB, "TPU v5": 95 * GiB, "H200": 141 * 10**9,
             "H100": 80 * 10**9, "A100": 80 * 10**9}
HBM_BYTES_PER_S = {"TPU v4": 1228e9, "TPU v5 lite": 819e9, "TPU v5e": 819e9, "TPU v5p": 2765e9,
                   "TPU v6 lite": 1638e9, "TPU v6e": 1638e9, "TPU v5": 2765e9, "H200": 4.8e12,
                   "H100": 3.35e12, "A100": 2.0e12}
ICI_BYTES_PER_S = {"TPU v5 lite": 400e9, "TPU v5e": 400e9, "TPU v5p": 1200e9, "TPU v6 lite": 800e9,
                   "TPU v6e": 800e9, "TPU v5": 1200e9, "H200": 900e9, "H100": 900e9, "A100": 600e9}


def lookup(table: dict, device_kind: str):
    """The first entry whose key is contained in `device_kind` (case-insensitive), else None."""
    kind = device_kind.lower()
    return next((v for k, v in table.items() if k.lower() in kind), None)
