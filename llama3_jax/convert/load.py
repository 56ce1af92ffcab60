"""A Hugging Face or Meta directory read as if it were a checkpoint: `init_from`, and `generate`/`score
--checkpoint`, may name one; its tensors are converted on the fly onto the run's mesh, nothing written.

What can go wrong, and what here catches it:
  * a second copy of the model, on disk or unsharded in memory (a 70B model is 140 GB): the tensors
    come from the reader `convert` uses (hf.py: memory-mapped safetensors; meta.py: memory-mapped
    torch shards), one at a time; each device's slice of a tensor is read and cast into its shard
    (`jax.make_array_from_callback`, so a process reads only its own devices' slices), and a stacked
    parameter is filled layer by layer in place (a donated `dynamic_update_slice` into an array born
    sharded). The most a device holds beside its shards is one layer of one parameter; the most a host
    holds is the memory map's pages of one tensor. No file is written anywhere.
  * weights that differ from the converted checkpoint's: the same readers, the same layout transforms
    and the same checks (stream.py: a tensor the config has no place for, a duplicate, a wrong shape,
    a missing one) as `convert --from hf|meta --to jax`, each cast straight from the source dtype into
    the target's, as convert-then-restore casts (the source dtype is exact in float32, and float32 ->
    bfloat16 rounds to nearest even either way); the config is the reader's, its `param_dtype` the
    source's, as convert records it. tests/test_init_from_hf.py compares both paths bit for bit.
  * a directory of the wrong kind: each kind is recognised by its own file (config.json with our
    `format`; config.json with transformers' `model_type`/`architectures`; params.json), anything else
    gets our format's usual error; bad files give the readers' one-line errors naming file and tensor.
    A Meta directory needs PyTorch to read: without it, one line naming the `convert` command instead.

A LoRA workdir on such a base (train with `lora.rank` and `init_from` = an HF directory) is read the
same way: the base streamed, the adapters restored, merged as store/checkpoint.py merges them.
A reward model (head `score`) started from a language model takes only its trunk (`restore_trunk_any`):
the output layer's tensors are checked like every other but never read nor placed.
The tokenizer is what the run or the checkpoint records as usual: `convert --from hf|meta` records
none (Llama 3's), so neither does a directory read here.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from ..model import lora
from ..model.config import ModelConfig
from ..store import checkpoint
from ..store.paths import is_remote
from .stream import stream
from .tensors import ConvertError

CONVERT_HINT = "llama3-jax convert --from {fmt} --to jax {src} DST"


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_hf_dir(path: str | Path) -> bool:
    """A transformers model directory: a config.json that is transformers' (model_type or architectures),
    not ours (format=llama3-jax)."""
    if is_remote(path):
        return False
    data = _json(Path(path) / checkpoint.CONFIG_FILE)
    return (data is not None and data.get("format") != checkpoint.FORMAT
            and ("model_type" in data or "architectures" in data))


def is_meta_dir(path: str | Path) -> bool:
    """Meta's original layout: params.json (+ consolidated.NN.pth), no config.json."""
    if is_remote(path):
        return False
    p = Path(path)
    return (p / "params.json").is_file() and not (p / checkpoint.CONFIG_FILE).exists()


def _reader(path: Path):
    """The `convert` reader of an HF or Meta directory (None: neither)."""
    if is_hf_dir(path):
        from .hf import HFReader
        return HFReader(path)
    if is_meta_dir(path):
        try:
            import torch  # noqa: F401  (meta.py needs it; say how to do without)
        except ImportError:
            raise ConvertError(f"{path}: a Meta checkpoint directory, which needs PyTorch to read; convert it "
                               f"once instead: {CONVERT_HINT.format(fmt='meta', src=path)}") from None
        from .meta import MetaReader
        return MetaReader(path)
    return None


def model_config_of(path: str | Path) -> ModelConfig:
    """The model config of a llama3-jax checkpoint, an HF directory or a Meta directory (for the last
    two, what `convert --to jax` would record: the reader's config in the source dtype)."""
    if is_hf_dir(path) or is_meta_dir(path):
        import dataclasses
        reader = _reader(Path(path))
        return dataclasses.replace(reader.config, param_dtype=reader.dtype.name)
    return checkpoint.load_config(path)


def restore_params_any(path: str | Path, mesh=None, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) as checkpoint.restore_params gives them (the latest intact step, restored into
    `cfg`'s abstract target sharded for `mesh`), from a llama3-jax checkpoint, an HF or Meta directory
    (streamed onto the mesh), or a LoRA workdir whose base is one of those."""
    cfg = cfg or model_config_of(path)
    reader = _reader(Path(path)) if not is_remote(path) else None
    if reader is not None:
        return cfg, _stream_params(reader, Path(path), cfg, mesh)
    adapted = checkpoint.lora_base(path) if checkpoint.is_checkpoint(path) else None
    if adapted is not None and (is_hf_dir(adapted[1]) or is_meta_dir(adapted[1])):
        record, base = adapted
        params = restore_trunk_any(base, mesh, cfg) if cfg.head == "score" else restore_params_any(base, mesh, cfg)[1]
        lc = lora.from_record(record)
        adapters = checkpoint.restore_adapters(path, cfg, lc, mesh)
        return cfg, jax.jit(checkpoint.merge_adapters, static_argnums=2)(params, adapters, lc.scale)
    return checkpoint.restore_params(path, mesh, cfg=cfg)


def restore_trunk_any(path: str | Path, mesh, cfg: ModelConfig) -> dict:
    """`cfg`'s params without a head (checkpoint.HEAD_KEYS), from a full model of `cfg`'s trunk with any
    head (a checkpoint, an HF or Meta directory, a LoRA workdir): a reward model's start from a
    language model. The head's tensors are not read (a LoRA workdir's merged model drops its head)."""
    import dataclasses
    reader = _reader(Path(path)) if not is_remote(path) else None
    if reader is not None:
        src = dataclasses.replace(cfg, head=reader.config.head)
        placer = _Placer(checkpoint.abstract_params(src, mesh), skip=checkpoint.HEAD_KEYS)
        stream(reader, placer, src, np.dtype(cfg.param_dtype), Path(path), progress=False, start=time.time())
        return placer.params
    if checkpoint.lora_base(path) is None:
        return checkpoint.restore_trunk(path, mesh, cfg)
    _, params = restore_params_any(path, mesh, dataclasses.replace(cfg, head=checkpoint.load_config(path).head))
    return {k: v for k, v in params.items() if k not in checkpoint.HEAD_KEYS}


def _stream_params(reader, src: Path, cfg: ModelConfig, mesh) -> dict:
    """Every tensor of `reader`, checked against `cfg` (stream.py), placed into `cfg`'s sharded target."""
    placer = _Placer(checkpoint.abstract_params(cfg, mesh))
    stream(reader, placer, cfg, np.dtype(cfg.param_dtype), src, progress=False, start=time.time())
    return placer.params


def _layer_sharding(sharding, ndim: int):
    """The sharding of one layer of a stacked parameter: its own without the (replicated) layer axis."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding  # one device
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    if spec[0] is not None:
        raise AssertionError(f"the layer axis is sharded ({sharding.spec}): sharding.RULES keeps it whole")
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


@functools.lru_cache(maxsize=None)
def _zeros(shape: tuple[int, ...], dtype: str, sharding):
    return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer(sharding):
    """full[i] = x, in place (`full` donated), the result with `sharding`; one compile per sharding and shape."""
    return jax.jit(lambda full, x, i: jax.lax.dynamic_update_index_in_dim(full, x, i, 0),
                   donate_argnums=0, out_shardings=sharding)


def _place(array: np.ndarray, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    """`array` (numpy, possibly a memory map) as a jax.Array with `sharding`: each of this process's
    devices gets its slice, read and cast on its own (never the whole array cast at once)."""
    return jax.make_array_from_callback(
        shape, sharding, lambda index: np.ascontiguousarray(array[index].astype(dtype, copy=False)))


class _Placer:
    """A stream.py writer that keeps nothing on the host: each tensor goes onto its target's sharding
    as it arrives; `params` is the result, the target's pure dict of jax.Arrays."""

    reads_slices = True  # stream.py hands tensors over uncast: each slice is cast in _place

    def __init__(self, target: dict, skip: tuple[str, ...] = ()):
        self.target, self.params, self.skip = target, {}, skip  # skip: top-level names not placed

    def add(self, name: str, layer: int | None, array: np.ndarray) -> None:
        keys = name.split("/")
        if keys[0] in self.skip:
            return
        leaf, out = self.target, self.params
        for k in keys[:-1]:
            leaf, out = leaf[k], out.setdefault(k, {})
        leaf, key = leaf[keys[-1]], keys[-1]
        dtype = np.dtype(leaf.dtype)
        if layer is None:
            out[key] = _place(array, leaf.shape, dtype, leaf.sharding)
            return
        if key not in out:  # a stacked parameter: born sharded, filled layer by layer
            out[key] = _zeros(tuple(leaf.shape), dtype.name, leaf.sharding)()
        one = _place(array, leaf.shape[1:], dtype, _layer_sharding(leaf.sharding, len(leaf.shape)))
        out[key] = _set_layer(leaf.sharding)(out[key], one, np.int32(layer))

    def finish(self) -> None:
        pass
