"""Hugging Face transformers layout: config.json + (sharded) safetensors.

safetensors is read and written here directly (an 8-byte header length, a JSON header, raw bytes):
reading memory-maps one file at a time, and writing plans every shard's header from the config up
front, then drops each tensor at its offset as it arrives, so neither side holds more than one tensor
(bfloat16 included, via ml_dtypes).

The reader also says where the model came from (`HFReader.source`, `hf_source`), which `--to jax`
records in the checkpoint's config.json: a LoRA trained on that checkpoint exports (peft.py) as an
adapter on the transformers model, which transformers can load, not on our checkpoint, which it cannot.

A reward model (head "score") is transformers' `LlamaForSequenceClassification` with one label: the
trunk's tensors under the same names, `score.weight` (1, D) in place of `lm_head.weight`. What can go
wrong is the `pad_token_id` of its config.json: transformers reads each row's reward at the last token
that is not the pad id, so a pad id that is an end-of-turn id moves every reward to the token before
it, and a missing one makes transformers refuse batches. The reader keeps the pad id a source records
(`HFReader.pad_token_id`, recorded in the `source` of a `--to jax` checkpoint), and the writer writes
it back; a model that records none gets `config.default_pad_id` (not BOS or EOS).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from ..model.config import ModelConfig, from_hf_config, read_json, to_hf_config, to_hf_generation_config
from .tensors import ConvertError, Tensor, expected_shapes, parse_size
from .untrusted import check_header_size, check_index_entry, check_tensor_table

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"

# our name -> (HF name template, to-ours transform, from-ours transform); transforms get (array, cfg)
_LAYER = "model.layers.{}."
NAMES = {
    "embed": ("model.embed_tokens.weight", None, None),
    "norm": ("model.norm.weight", None, None),
    "lm_head": ("lm_head.weight", "T", "T"),
    "score": ("score.weight", "T", "T"),  # a reward model's head: transformers' (1, D), ours (D, 1)
    "layers/attn_norm": (_LAYER + "input_layernorm.weight", None, None),
    "layers/mlp_norm": (_LAYER + "post_attention_layernorm.weight", None, None),
    "layers/wq": (_LAYER + "self_attn.q_proj.weight", "in_heads", "out_heads"),
    "layers/wk": (_LAYER + "self_attn.k_proj.weight", "in_heads", "out_heads"),
    "layers/wv": (_LAYER + "self_attn.v_proj.weight", "in_heads", "out_heads"),
    "layers/wo": (_LAYER + "self_attn.o_proj.weight", "o_in", "o_out"),
    "layers/w_gate": (_LAYER + "mlp.gate_proj.weight", "T", "T"),
    "layers/w_up": (_LAYER + "mlp.up_proj.weight", "T", "T"),
    "layers/w_down": (_LAYER + "mlp.down_proj.weight", "T", "T"),
}


def _to_ours(kind, a: np.ndarray, shape) -> np.ndarray:
    if kind is None:
        return a
    if kind == "T":
        return a.T
    if kind in ("in_heads", "o_in"):  # (H*K, D) -> (D, H, K); (D, H*K) -> (H, K, D)
        return a.T.reshape(shape)
    raise AssertionError(kind)


def _from_ours(kind, a: np.ndarray) -> np.ndarray:
    if kind is None:
        return a
    if kind == "T":
        return a.T
    if kind == "out_heads":  # (D, H, K) -> (H*K, D)
        return a.reshape(a.shape[0], -1).T
    if kind == "o_out":  # (H, K, D) -> (D, H*K)
        return a.reshape(-1, a.shape[-1]).T
    raise AssertionError(kind)


def to_hf(name: str, a: np.ndarray) -> np.ndarray:
    """Our layout -> the transformers tensor (a view where possible)."""
    return _from_ours(NAMES[name][2], a)


def hf_name(name: str, layer: int | None) -> str:
    return NAMES[name][0].format(layer)


# ---------------------------------------------------------------------------------- safetensors I/O


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor table, data start offset) of one safetensors file, with truncation checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConvertError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        check_header_size(path, n, size)  # before reading n bytes
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConvertError(f"{path}: corrupt safetensors header") from None
    if isinstance(header, dict):
        header.pop("__metadata__", None)
    check_tensor_table(path, header, {k: np.dtype(v).itemsize for k, v in DTYPES.items()}, size - 8 - n)
    return header, 8 + n


def hf_weight_files(src: Path) -> list[Path]:
    index = src / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ConvertError(f"{index}: corrupt index (no weight_map)") from None
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index}: weight_map is not an object")
        files = sorted({check_index_entry(index, src, f) for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ConvertError(f"{index}: lists {f.name}, which does not exist")
        return files
    single = src / "model.safetensors"
    if single.exists():
        return [single]
    raise ConvertError(f"{src}: no model.safetensors or {INDEX} (only safetensors checkpoints are supported)")


# ---------------------------------------------------------------------------------------- reader


def hf_source(src: Path) -> dict:
    """Where a transformers model was read from, as config.json's `source` records it: a snapshot of
    the Hugging Face hub cache (.../models--ORG--NAME/snapshots/REVISION) by its hub name and revision,
    which load from the cache or the hub anywhere; any other directory by its absolute path."""
    path = src.resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--") and len(repo) > len("models--"):
        return {"format": "hf", "name_or_path": repo[len("models--"):].replace("--", "/"), "revision": path.name}
    return {"format": "hf", "name_or_path": str(path), "revision": None}


def hf_pad_id(hf: dict) -> int | None:
    """config.json's `pad_token_id` when it is a token id; None when absent, null or not one (older
    conversions wrote -1: transformers never matches it, and a language model never reads it), so it
    is neither recorded nor written back."""
    pad = hf.get("pad_token_id")
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else None


class HFReader:
    def __init__(self, src: Path):
        self.source = hf_source(src)
        cfg_path = src / "config.json"
        hf = read_json(cfg_path, "a transformers model directory", ConvertError)
        try:
            self.config = from_hf_config(hf, source=str(cfg_path))
        except ValueError as e:
            raise ConvertError(str(e)) from None
        self.pad_token_id = hf_pad_id(hf)
        if self.pad_token_id is not None:  # kept in a --to jax checkpoint's config.json, written back by --to hf
            self.source = self.source | {"pad_token_id": self.pad_token_id}
        self.files = hf_weight_files(src)
        self.headers = {f: read_header(f) for f in self.files}
        # HF name -> (our name, layer)
        self.names = {}
        for name in expected_shapes(self.config):
            if name.startswith("layers/"):
                for i in range(self.config.n_layers):
                    self.names[hf_name(name, i)] = (name, i)
            else:
                self.names[hf_name(name, None)] = (name, None)
        self._check_headers()
        dtypes = {info["dtype"] for header, _ in self.headers.values() for info in header.values()}
        self.dtype = np.dtype(DTYPES[sorted(dtypes)[0]]) if len(dtypes) == 1 else np.dtype(np.float32)

    def _skipped(self, hname: str) -> bool:
        return hname.endswith("rotary_emb.inv_freq") or (self.config.tie_embeddings and hname == "lm_head.weight")

    def _check_headers(self) -> None:
        """Every tensor's name and full shape against config.json, from the headers alone (before any
        data is read): a transposed non-square projection has the right element count but would
        reshape into scrambled weights, so element counts are not enough."""
        shapes = expected_shapes(self.config)
        for path in self.files:
            header, _ = self.headers[path]
            for hname, info in header.items():
                if self._skipped(hname):
                    continue
                if hname not in self.names:
                    raise ConvertError(f"{path}: unexpected tensor {hname}")
                name, _ = self.names[hname]
                want = _hf_shape(name, shapes[name])
                if tuple(info["shape"]) != want:
                    raise ConvertError(f"{path}: tensor {hname} has shape {tuple(info['shape'])}, "
                                       f"config.json implies {want}")
        present = {h for header, _ in self.headers.values() for h in header}
        missing = [h for h in self.names if h not in present]
        if missing:
            raise ConvertError(f"{self.files[0].parent}: missing tensor {missing[0]} ({len(missing)} missing)")

    def tensors(self) -> Iterator[Tensor]:
        shapes = expected_shapes(self.config)
        for path in self.files:
            header, start = self.headers[path]
            data = np.memmap(path, dtype=np.uint8, mode="r")
            for hname, info in header.items():
                if self._skipped(hname):
                    continue
                name, layer = self.names[hname]  # names and shapes were checked in _check_headers
                lo, hi = info["data_offsets"]
                a = data[start + lo:start + hi].view(DTYPES[info["dtype"]]).reshape(info["shape"])
                yield Tensor(name, layer, _to_ours(NAMES[name][1], a, shapes[name]), f"{path.name}:{hname}")
            del data


def _hf_shape(name, ours):
    kind = NAMES[name][2]
    return tuple(_from_ours(kind, np.empty(ours, np.uint8)).shape)


# ---------------------------------------------------------------------------------------- writer


class HFWriter:
    """Plans all shards from the config, then writes each tensor at its offset as it arrives."""

    def __init__(self, dst: Path, cfg: ModelConfig, dtype: np.dtype, max_shard_size: str | int = "5GB",
                 pad_token_id: int | None = None):
        self.dst, self.cfg, self.dtype, self.pad_token_id = dst, cfg, np.dtype(dtype), pad_token_id
        dst.mkdir(parents=True, exist_ok=True)
        shapes = expected_shapes(cfg)
        order = [("embed", None)]
        for i in range(cfg.n_layers):
            order += [(n, i) for n in NAMES if n.startswith("layers/")]
        order += [("norm", None)] + [(n, None) for n in ("lm_head", "score") if n in shapes]
        limit = parse_size(max_shard_size, "--max-shard-size")
        shards, cur, cur_size = [], [], 0
        for key in order:
            nbytes = int(np.prod(shapes[key[0]])) * self.dtype.itemsize
            if cur and cur_size + nbytes > limit:
                shards.append(cur)
                cur, cur_size = [], 0
            cur.append(key)
            cur_size += nbytes
        shards.append(cur)
        n = len(shards)
        self.where = {}  # (name, layer) -> (file, absolute offset)
        self.weight_map = {}
        for s, keys in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, layer in keys:
                shape = list(_hf_shape(name, shapes[name]))
                nbytes = int(np.prod(shape)) * self.dtype.itemsize
                header[hf_name(name, layer)] = {"dtype": DTYPE_NAMES[self.dtype], "shape": shape,
                                                "data_offsets": [offset, offset + nbytes]}
                self.weight_map[hf_name(name, layer)] = fname
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
            start = 8 + len(raw)
            with open(dst / fname, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(start + offset)
            for name, layer in keys:
                self.where[(name, layer)] = (dst / fname, start + header[hf_name(name, layer)]["data_offsets"][0])
        self.total_size = sum(int(np.prod(_hf_shape(k[0], shapes[k[0]]))) * self.dtype.itemsize for k in order)
        self.n_shards = n

    def add(self, name: str, layer: int | None, array: np.ndarray) -> None:
        if name == "lm_head" and self.cfg.tie_embeddings:
            return
        path, offset = self.where[(name, layer)]
        a = np.ascontiguousarray(to_hf(name, array).astype(self.dtype, copy=False))
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(a.reshape(-1).view(np.uint8)))

    def finish(self) -> None:
        torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[self.dtype.name]
        hf = to_hf_config(self.cfg, torch_dtype, pad_token_id=self.pad_token_id)
        (self.dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (self.dst / "generation_config.json").write_text(json.dumps(to_hf_generation_config(self.cfg), indent=2) + "\n")
        if self.n_shards > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
