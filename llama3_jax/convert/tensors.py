"""The vocabulary every format shares: the error type, one tensor in our layout, the shapes a config
implies, and the parsers of the dtype and size options.

It sits below every format module and below core.py (the driver that picks readers and writers), so a
format depends only on this file and never on the driver: formats can be combined (peft merges into an
hf or jax reader) without an import cycle.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from ..model.config import ModelConfig


class ConvertError(ValueError):
    """Bad input: the message names the file and tensor at fault."""


class Tensor(NamedTuple):
    name: str          # our name, e.g. "layers/wq"
    layer: int | None  # layer index for "layers/*"
    array: np.ndarray  # in our layout (model/llama.py), one layer's slice for stacked weights
    origin: str        # "file:tensor" in the source, for error messages


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our layout's shape per name (per layer for stacked weights)."""
    D, H, KV, K, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "embed": (V, D), "norm": (D,),
        "layers/attn_norm": (D,), "layers/mlp_norm": (D,),
        "layers/wq": (D, H, K), "layers/wk": (D, KV, K), "layers/wv": (D, KV, K), "layers/wo": (H, K, D),
        "layers/w_gate": (D, F), "layers/w_up": (D, F), "layers/w_down": (F, D),
    }
    if cfg.head == "score":  # a reward model: the scalar head in place of the output layer, tied or not
        shapes["score"] = (D, 1)
    elif not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def all_keys(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Every (name, layer) a complete checkpoint of `cfg` holds: one per layer for stacked weights."""
    keys = []
    for name in expected_shapes(cfg):
        if name.startswith("layers/"):
            keys += [(name, i) for i in range(cfg.n_layers)]
        else:
            keys.append((name, None))
    return keys


def parse_dtype(name: str | None):
    """The numpy dtype of a --dtype name; None (keep the source dtype) stays None."""
    if name is None:
        return None
    import ml_dtypes
    table = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
             "float16": np.float16, "fp16": np.float16}
    if name not in table:
        raise ConvertError(f"unknown dtype {name!r} (choose from float32, bfloat16, float16)")
    return np.dtype(table[name])


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)(b))?\s*", re.IGNORECASE)


def parse_size(text: str | int, flag: str) -> int:
    """A byte count as transformers' `max_shard_size` reads it: an integer (bytes), or a number with a
    unit: KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); as in transformers, a
    lowercase final b without the i ("5Gb", "500mb") counts bits."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise ConvertError(f"{flag} {text!r}: not a size (give bytes, or a number with a unit: "
                               f"5GB, 500MB, 5GiB)")
        number, prefix, binary, b = m.groups()
        n = float(number) if "." in number else int(number)
        if prefix:
            power = "kmgt".index(prefix.lower()) + 1
            n = n * (1024 ** power if binary else 1000 ** power)
            if b == "b" and not binary:
                n = n / 8
        n = int(n)
    if n < 1:
        raise ConvertError(f"{flag} {text!r}: must be at least 1 byte")
    return n
