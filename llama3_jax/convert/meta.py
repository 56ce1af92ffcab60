"""Meta's original layout: params.json + consolidated.NN.pth, one file per model-parallel rank.

What Meta's reference (`llama_models/llama3/model.py` on fairscale) puts in shard r of S:
  tok_embeddings (V, D)     VocabParallelEmbedding: rows (vocab) split, V/S per shard
  wq (H*K, D), w1, w3 (F, D), output (V, D)
                            ColumnParallelLinear: weight (out, in), out rows split
  wk, wv (KV*K, D)          column-split too; when S > KV (405B MP16, 8 KV heads) every shard needs the
                            KV head of its query heads, so shard r holds KV head r // (S // KV) and each
                            KV head is stored S // KV times: what llama_models' `reshard_mp` gives when it
                            splits 8 shards for 16 ranks (HF's converter does not handle S > KV at all)
  wo (D, H*K), w2 (D, F)    RowParallelLinear: in columns split
  norms (D,)                replicated in every shard

q and k rows are in Meta's interleaved rotary order (pairs (2i, 2i+1) rotate together); ours is HF's
"rotate half" (pairs (i, i + K/2)), so q/k get the published permutation (transformers'
convert_llama_weights_to_hf `permute`) one way and its inverse the other. The permutation acts within
each head, and shards split between heads, so each shard's slice is permuted on its own.

Memory: every shard is opened with `torch.load(mmap=True)`, so a tensor is read only when its slices are
concatenated; peak ≈ one full tensor. bfloat16 goes through an int16 view (no float32 round trip). The
writer parks each shard's tensors in a scratch file in the output directory (disk, not RAM), then
`torch.save`s each shard from memory maps of it and deletes the scratch file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from ..model.config import ModelConfig, from_meta_params, read_json, to_meta_params
from .tensors import ConvertError, Tensor
from .hf import to_hf

# our name -> Meta name template
_L = "layers.{}."
NAMES = {
    "embed": "tok_embeddings.weight",
    "layers/wq": _L + "attention.wq.weight",
    "layers/wk": _L + "attention.wk.weight",
    "layers/wv": _L + "attention.wv.weight",
    "layers/wo": _L + "attention.wo.weight",
    "layers/w_gate": _L + "feed_forward.w1.weight",
    "layers/w_down": _L + "feed_forward.w2.weight",
    "layers/w_up": _L + "feed_forward.w3.weight",
    "layers/attn_norm": _L + "attention_norm.weight",
    "layers/mlp_norm": _L + "ffn_norm.weight",
    "norm": "norm.weight",
    "lm_head": "output.weight",
}
# how each tensor is split across model-parallel shards: (kind, axis of the Meta tensor)
SPLIT = {
    "embed": ("split", 0), "lm_head": ("split", 0),
    "layers/wq": ("split", 0), "layers/w_gate": ("split", 0), "layers/w_up": ("split", 0),
    "layers/wk": ("kv", 0), "layers/wv": ("kv", 0),
    "layers/wo": ("split", 1), "layers/w_down": ("split", 1),
    "layers/attn_norm": ("replicate", None), "layers/mlp_norm": ("replicate", None), "norm": ("replicate", None),
}
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}  # numpy/torch names
_FILE = re.compile(r"consolidated\.(\d+)\.pth$")
IGNORED = {"rope.freqs"}  # a buffer of Llama 1/2 checkpoints, recomputed by every implementation


def meta_name(name: str, layer: int | None) -> str:
    return NAMES[name].format(layer)


def _order(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Meta's state_dict order (module registration order), with output.weight always present."""
    per_layer = ["layers/wq", "layers/wk", "layers/wv", "layers/wo", "layers/w_gate", "layers/w_down",
                 "layers/w_up", "layers/attn_norm", "layers/mlp_norm"]
    keys = [("embed", None)]
    for i in range(cfg.n_layers):
        keys += [(n, i) for n in per_layer]
    return keys + [("norm", None), ("lm_head", None)]


# ------------------------------------------------------------------------------ layout transforms


def _meta_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    D, H, KV, K, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    return {"embed": (V, D), "lm_head": (V, D), "norm": (D,), "layers/attn_norm": (D,), "layers/mlp_norm": (D,),
            "layers/wq": (H * K, D), "layers/wk": (KV * K, D), "layers/wv": (KV * K, D), "layers/wo": (D, H * K),
            "layers/w_gate": (F, D), "layers/w_up": (F, D), "layers/w_down": (D, F)}[name]


def _shard_shape(name: str, cfg: ModelConfig, shards: int) -> tuple[int, ...]:
    shape = list(_meta_shape(name, cfg))
    kind, axis = SPLIT[name]
    if kind == "split":
        shape[axis] //= shards
    elif kind == "kv":
        shape[axis] = max(cfg.n_kv_heads // shards, 1) * cfg.head_dim
    return tuple(shape)


def _rows_to_ours(name: str, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """One shard's slice of wq/wk/wv, rows (h*K, D) -> a view (D, h, 2, K/2) of ours (D, h, K).

    Meta's row (head, pair j, member e) becomes our (head, e * K/2 + j): "rotate half" keeps the two
    members of a rotary pair K/2 apart. wv has no rotary; the same split leaves it in order.
    """
    K, D = cfg.head_dim, cfg.dim
    h = a.shape[0] // K
    if name in ("layers/wq", "layers/wk"):
        return a.reshape(h, K // 2, 2, D).transpose(3, 0, 2, 1)
    return a.T.reshape(D, h, 2, K // 2)


def _ours_to_rows(a: np.ndarray) -> np.ndarray:
    """Inverse of _rows_to_ours for wq/wk: ours (D, h, K) -> Meta rows (h*K, D), pairs interleaved."""
    D, h, K = a.shape
    return a.reshape(D, h, 2, K // 2).transpose(1, 3, 2, 0).reshape(h * K, D)


def to_meta(name: str, a: np.ndarray) -> np.ndarray:
    """Our layout -> Meta's full (unsharded) tensor: transformers' layout, except q/k, whose rotary
    pairs Meta interleaves."""
    if name in ("layers/wq", "layers/wk"):
        return _ours_to_rows(a)
    return to_hf(name, a)


def _from_meta(name: str, parts: list[np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """All shards' slices (Meta layout) -> one tensor in our layout; one copy when shards > 1."""
    def cat(arrays, axis):
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)

    if name in ("layers/wq", "layers/wk", "layers/wv"):  # concatenate views, so the one copy is the last
        a = cat([_rows_to_ours(name, p, cfg) for p in parts], axis=1)
        return a.reshape(cfg.dim, -1, cfg.head_dim)
    if name == "layers/wo":  # (D, H*K) -> (H, K, D)
        return cat(parts, axis=1).T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim)
    if name in ("lm_head", "layers/w_gate", "layers/w_up", "layers/w_down"):
        kind, axis = SPLIT[name]
        return cat(parts, axis=axis).T
    if name == "embed":
        return cat(parts, axis=0)
    return parts[0]  # replicated norms


def check_shards(cfg: ModelConfig, shards: int, where: str) -> None:
    """The divisibility Meta's fairscale layers require of `shards` model-parallel ranks."""
    H, KV, F, V = cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.vocab_size
    if shards < 1:
        raise ConvertError(f"{where}: shards must be >= 1, got {shards}")
    problems = [f"{n}={v}" for n, v in (("n_heads", H), ("intermediate_size", F), ("vocab_size", V)) if v % shards]
    if KV % shards and shards % KV:
        problems.append(f"n_kv_heads={KV} (neither divides the other)")
    if problems:
        raise ConvertError(f"{where}: {shards} model-parallel shards do not divide {', '.join(problems)}")


# ------------------------------------------------------------------------------------- torch I/O


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError("the meta format needs PyTorch (pip install 'llama3-jax[torch]')") from None
    return torch


def _numpy(t) -> np.ndarray:
    """A torch CPU tensor as numpy without copying; bfloat16 through an int16 view (exact, no float32)."""
    torch = _torch()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _same_bits(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """Bit-for-bit equality (not ==: -0.0 vs 0.0, NaNs), in row blocks so no full-size temporary is made."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    u = np.dtype(f"u{a.dtype.itemsize}")
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # tensors here are 1-D or 2-D
    return all(np.array_equal(a2[i:i + rows].view(u), b2[i:i + rows].view(u)) for i in range(0, a2.shape[0], rows))


def meta_files(src: Path) -> list[Path]:
    found = {}
    for f in src.glob("consolidated.*.pth"):
        m = _FILE.match(f.name)
        if m:
            found[int(m.group(1))] = f
    if not found:
        raise ConvertError(f"{src}: no consolidated.*.pth files (not a Meta checkpoint directory)")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ConvertError(f"{src}: consolidated.{missing[0]:02d}.pth is missing "
                           f"(found {len(found)} shards up to consolidated.{max(found):02d}.pth)")
    return [found[i] for i in range(len(found))]


def load_shard(path: Path) -> dict:
    torch = _torch()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: cannot load ({msg})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConvertError(f"{path}: not a state dict of tensors")
    return sd


# ---------------------------------------------------------------------------------------- reader


class MetaReader:
    """Opens every shard (memory-mapped), checks names and shapes against params.json up front."""

    def __init__(self, src: Path):
        pj = src / "params.json"
        params = read_json(pj, "a Meta checkpoint directory", ConvertError)
        params = params.get("model", params)  # some releases nest the arguments
        self.files = meta_files(src)
        self.shards = [load_shard(f) for f in self.files]
        for sd in self.shards:
            for k in IGNORED:
                sd.pop(k, None)
        tied = self._tied()
        try:
            self.config = from_meta_params(params, tie_embeddings=tied, source=str(pj))
        except (ValueError, TypeError) as e:
            raise ConvertError(str(e)) from None
        n = len(self.files)
        check_shards(self.config, n, f"{src} ({n} consolidated.*.pth files)")
        self._check()
        dtypes = set()
        for f, sd in zip(self.files, self.shards):
            for k, v in sd.items():
                if str(v.dtype).removeprefix("torch.") not in _TORCH_DTYPES:
                    raise ConvertError(f"{f}: tensor {k} has unsupported dtype {v.dtype}")
                dtypes.add(str(v.dtype).removeprefix("torch."))
        self.dtype = np.dtype(ml_dtypes.bfloat16 if dtypes == {"bfloat16"} else dtypes.pop() if len(dtypes) == 1
                              else np.float32)  # the source dtype; mixed files widen to float32

    def _tied(self) -> bool:
        """Tied (3.2 1B/3B) when output.weight is absent or bit-identical to tok_embeddings in every shard."""
        emb, out = NAMES["embed"], NAMES["lm_head"]
        if all(out not in sd for sd in self.shards):
            return True
        for sd in self.shards:
            if emb not in sd or out not in sd or not _same_bits(_numpy(sd[emb]), _numpy(sd[out])):
                return False
        return True

    def _keys(self) -> list[tuple[str, int | None]]:
        return [k for k in _order(self.config) if not (k[0] == "lm_head" and self.config.tie_embeddings)]

    def _check(self) -> None:
        """Every shard holds exactly the expected tensors, each of its shard's shape."""
        n = len(self.files)
        want = {meta_name(*k): k for k in self._keys()}
        want_opt = {NAMES["lm_head"]} if self.config.tie_embeddings else set()  # tied: embedding copy or absent
        for f, sd in zip(self.files, self.shards):
            extra = [k for k in sd if k not in want and k not in want_opt]
            if extra:
                raise ConvertError(f"{f}: unexpected tensor {extra[0]} (not in a Llama 3 model with these params.json)")
            missing = [k for k in want if k not in sd]
            if missing:
                more = f" ({len(missing)} missing)" if len(missing) > 1 else ""
                raise ConvertError(f"{f}: missing tensor {missing[0]}{more}")
            for mname, (name, _) in want.items():
                shape, expect = tuple(sd[mname].shape), _shard_shape(name, self.config, n)
                if shape != expect:
                    raise ConvertError(f"{f}: tensor {mname} has shape {shape}, params.json with {n} shard(s) "
                                       f"implies {expect}")

    def tensors(self) -> Iterator[Tensor]:
        cfg, n = self.config, len(self.files)
        rep = max(n // cfg.n_kv_heads, 1)  # copies of each KV head when shards > n_kv_heads
        origin = self.files[0].name if n == 1 else f"consolidated.00-{n - 1:02d}.pth"
        for name, layer in self._keys():
            mname = meta_name(name, layer)
            kind, _ = SPLIT[name]
            if kind == "replicate":
                ranks = [0]
            elif kind == "kv" and rep > 1:
                ranks = list(range(0, n, rep))
                for r in range(n):  # the copies must agree, or the checkpoint is not what we think
                    first = r - r % rep
                    if r != first and not _same_bits(_numpy(self.shards[r][mname]), _numpy(self.shards[first][mname])):
                        raise ConvertError(f"{self.files[r]}: tensor {mname} should repeat KV head {r // rep} of "
                                           f"{self.files[first].name} ({n} shards, {cfg.n_kv_heads} KV heads)")
            else:
                ranks = list(range(n))
            parts = [_numpy(self.shards[r][mname]) for r in ranks]
            yield Tensor(name, layer, _from_meta(name, parts, cfg), f"{origin}:{mname}")
        self.shards = []  # drop the memory maps


# ---------------------------------------------------------------------------------------- writer

class MetaWriter:
    """Splits each tensor into `shards` model-parallel slices as it arrives.

    torch.save needs a shard's whole dict at once, and every tensor feeds every shard, so slices are
    parked in one scratch file per shard inside the (temporary) output directory — on disk, not in
    memory — and `finish` saves each shard from memory maps of its scratch file, then deletes it.
    """

    def __init__(self, dst: Path, cfg: ModelConfig, dtype: np.dtype, shards: int = 1):
        torch = _torch()
        self.dst, self.cfg, self.dtype, self.n = dst, cfg, np.dtype(dtype), int(shards)
        if self.dtype.name not in _TORCH_DTYPES:
            raise ConvertError(f"meta output: unsupported dtype {self.dtype.name}")
        self.torch_dtype = getattr(torch, _TORCH_DTYPES[self.dtype.name])
        check_shards(cfg, self.n, "meta output")
        try:
            self.params = to_meta_params(cfg)
        except ValueError as e:
            raise ConvertError(f"meta output: {e}") from None
        dst.mkdir(parents=True, exist_ok=True)
        self.where: dict[tuple[str, int | None], int] = {}  # key -> byte offset in every shard's scratch file
        self.layout: list[tuple[str, int | None, tuple[int, ...]]] = []
        offset = 0
        for name, layer in _order(cfg):
            shape = _shard_shape(name, cfg, self.n)
            self.layout.append((name, layer, shape))
            self.where[(name, layer)] = offset
            offset += int(np.prod(shape)) * self.dtype.itemsize
        self.scratch = [dst / f".consolidated.{r:02d}.scratch" for r in range(self.n)]
        for path in self.scratch:
            with open(path, "wb") as f:
                f.truncate(offset)
        self.files = [open(p, "r+b") for p in self.scratch]

    def _slices(self, name: str, full: np.ndarray) -> list[np.ndarray]:
        kind, axis = SPLIT[name]
        if kind == "replicate":
            return [full] * self.n
        if kind == "kv" and self.n > self.cfg.n_kv_heads:
            K, rep = self.cfg.head_dim, self.n // self.cfg.n_kv_heads
            return [full[(r // rep) * K:(r // rep + 1) * K] for r in range(self.n)]
        return np.split(full, self.n, axis=axis)

    def _write(self, key: tuple[str, int | None], full: np.ndarray) -> None:
        for f, part in zip(self.files, self._slices(key[0], full)):
            f.seek(self.where[key])
            f.write(np.ascontiguousarray(part.astype(self.dtype, copy=False)).reshape(-1).view(np.uint8))

    def add(self, name: str, layer: int | None, array: np.ndarray) -> None:
        self._write((name, layer), to_meta(name, array))
        if name == "embed" and self.cfg.tie_embeddings:  # Meta's files always carry output.weight
            self._write(("lm_head", None), array)

    def finish(self) -> None:
        torch = _torch()
        for f in self.files:
            f.close()
        store = np.dtype(f"i{self.dtype.itemsize}") if self.dtype == ml_dtypes.bfloat16 else self.dtype
        for r, path in enumerate(self.scratch):
            mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable for torch, never written
            sd = {}
            for name, layer, shape in self.layout:
                lo = self.where[(name, layer)]
                a = mm[lo:lo + int(np.prod(shape)) * self.dtype.itemsize].view(store).reshape(shape)
                t = torch.from_numpy(a)
                sd[meta_name(name, layer)] = t.view(self.torch_dtype) if store != self.dtype else t
            torch.save(sd, self.dst / f"consolidated.{r:02d}.pth")
            del sd, mm
            path.unlink()
        (self.dst / "params.json").write_text(json.dumps(self.params, indent=2) + "\n")
