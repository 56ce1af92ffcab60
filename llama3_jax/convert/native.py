"""llama3-jax's own format (checkpoint.py): config.json + orbax params, any training step directory.

Across processes (`convert` on every host of a pod, jax.distributed running): the writer keeps only
the shards of each array that this process's devices hold, filled from slices of each incoming tensor
(a safetensors tensor is a memory map, so only those bytes are read), and every process saves its
shards into one orbax checkpoint; no host holds the whole model. The reader reads one output tensor
at a time (a stacked parameter layer by layer), each process only its shards of it, and gathers it
for process 0, which writes the output alone (core.py): a host holds one tensor, never a whole
stacked parameter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from ..store import checkpoint
from ..model.config import ModelConfig, read_json
from ..model.llama import quantize_params
from ..parallel.multihost_io import several, to_host
from ..parallel.sharding import inference_mesh, make_mesh, parse_mesh
from .tensors import ConvertError, Tensor, expected_shapes


class JaxReader:
    def __init__(self, src: Path):
        try:
            self.config = checkpoint.load_config(src)
            self.step = checkpoint.latest_intact_step(src)  # checked once, not per tensor
        except (FileNotFoundError, ValueError) as e:
            raise ConvertError(str(e)) from None
        if self.config.quantization is not None:
            raise ConvertError(f"{src}: holds {self.config.quantization} weights (convert --quantize), which only "
                               f"generate and score read: convert the float checkpoint instead")
        self.src = src
        self.dtype = np.dtype(self.config.param_dtype)
        self.pad_token_id = recorded_pad_id(src)

    def tensors(self) -> Iterator[Tensor]:
        # one output tensor at a time: a stacked parameter layer by layer (checkpoint.ParamReader);
        # several processes: each reads its shards of the tensor, then all gather it
        try:
            mesh = make_mesh(fsdp=-1) if several() else None
            params = checkpoint.ParamReader(self.src, self.config, self.step, mesh=mesh)
            for name in expected_shapes(self.config):
                for layer, a in params.arrays(name):
                    origin = f"{self.src}:{name}" + ("" if layer is None else f"[{layer}]")
                    yield Tensor(name, layer, to_host(a), origin)
                    del a
        except (FileNotFoundError, ValueError) as e:
            raise ConvertError(str(e)) from None


def recorded_pad_id(src: Path) -> int | None:
    """The HF `pad_token_id` that `convert --from hf --to jax` recorded in config.json's `source` (hf.py),
    of SRC or, for a LoRA workdir, of its base; None when neither records one (`--to hf` then writes
    config.default_pad_id for a reward model)."""
    dirs = [src]
    try:
        adapted = checkpoint.lora_base(src)
    except (FileNotFoundError, ValueError):
        adapted = None
    if adapted is not None:
        dirs.append(adapted[1])
    for d in dirs:
        source = read_json(d / checkpoint.CONFIG_FILE, "a llama3-jax checkpoint", ConvertError).get("source")
        pad = source.get("pad_token_id") if isinstance(source, dict) else None
        if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
            return pad
    return None


def _span(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A shard's index (slices, possibly open) as (start, stop) per dimension: hashable, explicit."""
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


class JaxWriter:
    """Saves the model with orbax, each array placed shard by shard on `mesh` ("data=1,fsdp=1,tensor=-1";
    default: fsdp = processes, tensor = local devices: the model split over each host's devices and
    across the hosts) as the rules table shards it. Only this process's shards are held (in numpy
    until `finish`), each filled from slices of the incoming tensors (cast there, so a memory-mapped
    source is read only where this process needs it): no device and no host holds the whole model.
    `quantize="int8"` stores int8 matrices + per-output-channel scales (model.quantize_params),
    quantised from the tensors in the output dtype (which the norms keep): the same int8 weights as
    `generate --quantize int8` makes at load from a float checkpoint of that dtype."""

    reads_slices = True  # core.convert hands over tensors uncast: slices are read and cast here

    def __init__(self, dst: Path, cfg: ModelConfig, dtype: np.dtype, mesh: str | None = None,
                 quantize: str | None = None):
        self.dst, self.cfg, self.dtype, self.quantize = dst, cfg, np.dtype(dtype), quantize
        sizes = parse_mesh(mesh) or {"fsdp": jax.process_count(), "tensor": jax.local_device_count()}
        target = checkpoint.abstract_params(cfg, inference_mesh(sizes))
        self.targets, self.shards, self.devices = {}, {}, {}
        for name in expected_shapes(cfg):
            t = target
            for key in name.split("/"):
                t = t[key]
            self.targets[name] = t
            where = t.sharding.addressable_devices_indices_map(t.shape)
            by_device = {d: _span(idx, t.shape) for d, idx in where.items()}
            self.devices[name] = by_device  # a replicated shard is filled once, placed on each of its devices
            self.shards[name] = {span: np.empty([b - a for a, b in span], self.dtype)
                                 for span in set(by_device.values())}

    def add(self, name: str, layer: int | None, array: np.ndarray) -> None:
        for span, buf in self.shards[name].items():
            if layer is not None:
                (lo, hi), span = span[0], span[1:]
                if not lo <= layer < hi:
                    continue
                buf = buf[layer - lo]
            buf[...] = array[tuple(slice(a, b) for a, b in span)].astype(self.dtype, copy=False)

    def finish(self) -> None:
        # Hand each array to jax and drop the numpy shards at once, so the model is never held twice.
        params: dict = {"layers": {}}
        for name in list(self.shards):
            t, shards = self.targets[name], self.shards.pop(name)
            pieces = [jax.device_put(shards[span], d) for d, span in self.devices[name].items()]
            a = jax.make_array_from_single_device_arrays(t.shape, t.sharding, pieces)
            del shards, pieces
            if name.startswith("layers/"):
                params["layers"][name.split("/", 1)[1]] = a
            else:
                params[name] = a
        cfg = self.cfg
        if self.quantize is not None:
            cfg = dataclasses.replace(cfg, quantization=self.quantize)
            params = quantize_params(params, cfg)
        checkpoint.save_params(self.dst, cfg, params)
