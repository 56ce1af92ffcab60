"""llama3-jax's own format (checkpoint.py): config.json + orbax params, any training step directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from .. import checkpoint
from ..config import ModelConfig
from ..model import quantize_params
from .core import ConvertError, Tensor, expected_shapes


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
    """Stacks per-layer tensors into the model's arrays, then saves them with orbax. `quantize="int8"`
    stores int8 matrices + per-output-channel scales (model.quantize_params), quantised from the
    tensors in the output dtype (which the norms keep): the same int8 weights as `generate --quantize
    int8` makes at load from a float checkpoint of that dtype."""

    def __init__(self, dst: Path, cfg: ModelConfig, dtype: np.dtype, quantize: str | None = None):
        self.dst, self.cfg, self.quantize = dst, cfg, quantize
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
        params: dict = {"layers": {}}
        for name in list(self.arrays):
            a = jax.device_put(self.arrays.pop(name))
            if name.startswith("layers/"):
                params["layers"][name.split("/", 1)[1]] = a
            else:
                params[name] = a
        cfg = self.cfg
        if self.quantize is not None:
            cfg = dataclasses.replace(cfg, quantization=self.quantize)
            params = quantize_params(params, cfg)
        checkpoint.save_params(self.dst, cfg, params)
