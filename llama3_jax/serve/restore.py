"""The parameters a Generator decodes with: restored from a checkpoint (or taken from memory), cast,
optionally quantised to int8 and split per layer.

Why the order matters:
  * the compute dtype is cast at restore (orbax casts into the abstract target), so a bfloat16 engine
    never holds float32 copies and each decode step reads half the bytes;
  * quantising at load restores in the STORED dtype first, so the int8 weights equal what
    `convert --quantize int8` writes; a checkpoint that is int8 already loads as it is;
  * int8 matrices and their scales are never cast;
  * on CPU XLA reads separate per-layer arrays ~2x faster than a stacked, scanned layer axis (model.Llama),
    so the default splits there and stacks elsewhere.

A checkpoint directory may also be a Hugging Face or Meta one, converted on the fly onto the mesh
(convert/load.py, the floor below serve), so `generate`, `score` and a Python `Generator` read it alike.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from ..model import quant
from ..model.config import ModelConfig
from ..model.llama import quantize_params, split_layer_params
from ..convert import load


def _restore(checkpoint_dir: str | Path, mesh, cfg: ModelConfig) -> tuple[ModelConfig, dict]:
    return load.restore_params_any(checkpoint_dir, mesh, cfg=cfg)


def model_config(checkpoint_dir: str | Path) -> ModelConfig:
    """The model config of a checkpoint, an HF or a Meta directory (nothing restored)."""
    return load.model_config_of(checkpoint_dir)


def check_options(dtype: str, quantize: str | None, kv_cache_dtype: str | None) -> None:
    """Raise ValueError on a compute dtype, quantisation or KV-cache dtype the engine does not run."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    quant.check(quantize)
    if kv_cache_dtype not in (None, "bfloat16", "float32", "int8"):
        raise ValueError(f"kv_cache_dtype must be bfloat16, float32 or int8, got {kv_cache_dtype!r}")


def load_params(checkpoint_dir: str | Path | None, dtype: str, mesh, cfg: ModelConfig | None, params: dict | None,
                quantize: str | None, split_layers: bool | None) -> tuple[ModelConfig, dict, bool]:
    """(cfg, params, split_layers) ready to decode: from `checkpoint_dir` restored into `mesh`'s
    sharded target, or `cfg` + `params` already in memory (tests, benchmarks) cast the same way."""
    if params is None:
        if checkpoint_dir is None:
            raise ValueError("Generator needs a checkpoint directory (or cfg and params)")
        cfg = model_config(checkpoint_dir)
        quantize_now = quantize is not None and cfg.quantization is None
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=cfg.param_dtype if quantize_now else dtype)
        cfg, params = _restore(checkpoint_dir, mesh, cfg)
    else:
        quantize_now = quantize is not None and cfg.quantization is None
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if quantize_now:
        params = quantize_params(params, cfg)
        cfg = dataclasses.replace(cfg, quantization=quantize)
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    params = quant.cast_floats(params, dtype)
    if split_layers is None:
        split_layers = jax.devices()[0].platform == "cpu"
    if split_layers:
        params = split_layer_params(params)
    return cfg, params, split_layers
