"""llama3-jax's own format (checkpoint.py): config.json + orbax params, any training step directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from .. import checkpoint
from ..config import ModelConfig
from ..sharding import inference_mesh, parse_mesh
from .core import ConvertError, Tensor, expected_shapes


class JaxReader:
    def __init__(self, src: Path):
        try:
            self.config = checkpoint.load_config(src)
            self.step = checkpoint.latest_intact_step(src)  # checked once, not per tensor
        except (FileNotFoundError, ValueError) as e:
            raise ConvertError(str(e)) from None
        self.src = src
        self.dtype = np.dtype(self.config.param_dtype)

    def tensors(self) -> Iterator[Tensor]:
        for name in expected_shapes(self.config):  # one stored array at a time (partial restore)
            try:
                a = np.asarray(checkpoint.restore_one(self.src, self.config, name, self.step))
            except (FileNotFoundError, ValueError) as e:
                raise ConvertError(str(e)) from None
            if name.startswith("layers/"):
                for i in range(a.shape[0]):
                    yield Tensor(name, i, a[i], f"{self.src}:{name}[{i}]")
            else:
                yield Tensor(name, None, a, f"{self.src}:{name}")
            del a


class JaxWriter:
    """Stacks per-layer tensors into the model's arrays, then saves them with orbax, each array placed
    shard by shard on `mesh` ("data=1,fsdp=1,tensor=-1"; default: sharding.inference_mesh's, the model
    split over every local device) as the rules table shards it, so no device ever holds the whole model."""

    def __init__(self, dst: Path, cfg: ModelConfig, dtype: np.dtype, mesh: str | None = None):
        self.dst, self.cfg = dst, cfg
        self.mesh_sizes = parse_mesh(mesh)  # a bad --mesh fails before the first tensor is read
        shapes = expected_shapes(cfg)
        self.arrays = {}
        for name, shape in shapes.items():
            full = (cfg.n_layers, *shape) if name.startswith("layers/") else shape
            self.arrays[name] = np.empty(full, dtype)

    def add(self, name: str, layer: int | None, array: np.ndarray) -> None:
        if layer is None:
            self.arrays[name][...] = array
        else:
            self.arrays[name][layer] = array

    def finish(self) -> None:
        # Hand each array to jax and drop the numpy copy at once, so the model is never held twice.
        target = checkpoint.abstract_params(self.cfg, inference_mesh(self.mesh_sizes))
        params: dict = {"layers": {}}
        for name in list(self.arrays):
            where = target
            for key in name.split("/"):
                where = where[key]
            a = jax.device_put(self.arrays.pop(name), where.sharding)
            if name.startswith("layers/"):
                params["layers"][name.split("/", 1)[1]] = a
            else:
                params[name] = a
        checkpoint.save_params(self.dst, self.cfg, params)
