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
(convert/load.py). convert/ sits on serve's floor, so serve cannot import it: the layer above both
(cli/generate.py, for `generate`/`score --checkpoint`) hands it in with `read_other_formats`; without
it such a directory gets a one-line error naming the `convert` command to run first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from ..model import quant
from ..model.config import ModelConfig
from ..model.llama import quantize_params, split_layer_params
from ..store import checkpoint


# convert/load.py once read_other_formats gave it: model_config_of(dir), restore_params_any(dir, mesh, cfg)
_OTHER_FORMATS = None


def read_other_formats(loader) -> None:
    """Let checkpoint directories be HF or Meta directories too, read by `loader` (convert/load.py)."""
    global _OTHER_FORMATS
    _OTHER_FORMATS = loader


def _restore(checkpoint_dir: str | Path, mesh, cfg: ModelConfig) -> tuple[ModelConfig, dict]:
    if _OTHER_FORMATS is not None:
        return _OTHER_FORMATS.restore_params_any(checkpoint_dir, mesh, cfg=cfg)
    return checkpoint.restore_params(checkpoint_dir, mesh, cfg=cfg)


def _load_config(checkpoint_dir: str | Path) -> ModelConfig:
    if _OTHER_FORMATS is not None:
        return _OTHER_FORMATS.model_config_of(checkpoint_dir)
    path = Path(checkpoint_dir)
    fmt = "meta" if (path / "params.json").is_file() and not checkpoint.is_checkpoint(path) else "hf"
    try:
        return checkpoint.load_config(checkpoint_dir)
    except (FileNotFoundError, ValueError) as e:
        if fmt == "meta" or "not a llama3-jax config" in str(e):
            raise ValueError(f"{checkpoint_dir}: not a llama3-jax checkpoint (`llama3-jax generate`/`score` read "
                             f"HF and Meta directories too; here convert it first: llama3-jax convert "
                             f"--from {fmt} --to jax {checkpoint_dir} DST)") from None
        raise


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
        cfg = _load_config(checkpoint_dir)
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
