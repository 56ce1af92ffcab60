"""The run config of `llama3-jax train` (TrainConfig, MeshConfig) and what it resolves to: the model's
shape (a resumed workdir's, init_from's, or `model`) and the tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import checkpoint
from ..config import ModelConfig, load_model_config
from ..attention import NAMES as ATTENTION_NAMES
from ..data import DataConfig
from ..model import remat_policy
from ..optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: the rest of the devices
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str = "runs/default"
    model: str | dict = "tiny"  # preset name, or ModelConfig keys (with optional `preset` as the base)
    init_from: str | None = None  # a jax checkpoint (convert output or a train workdir): its config + params
    tokenizer: str | None = None  # None: Llama 3's tokenizer.model; a path to one; or "bytes" (UTF-8 bytes)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    seq_len: int = 512
    grad_accum: int = 1  # microbatches per step (scanned inside the step)
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # none | full | dots | save_qkv_proj | offload (model.remat_policy)
    attention: str = "auto"  # auto | reference | blockwise | splash | cudnn (attention/__init__.py)
    loss_chunk: int = -1  # positions per chunk of the output layer + loss; 0 = whole, -1 = auto (losses.py)
    scan_layers: bool = True
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = no eval
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = False
    sample_prompt: str = "def "
    sample_tokens: int = 32  # 0 = no sample at the end
    peak_flops: float = 0.0  # per device, for MFU; 0 = PEAK_FLOPS by device kind (CPU: see above)
    progress: bool = True

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every", "eval_batches")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16 or float32, got {self.compute_dtype!r}")
        remat_policy(self.remat)
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_NAMES)}; got {self.attention!r}")
        if self.loss_chunk < -1:
            raise ValueError(f"loss_chunk must be -1 (auto), 0 (whole) or positive, got {self.loss_chunk}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, BOS 256, EOS 257 (`tokenizer: bytes`): a real tokenizer for models
    with a tiny vocabulary (tests, quick experiments), with no 128K-row embedding to pay for."""

    bos_id, eos_id, n_words = 256, 257, 258
    stop_tokens = (257,)

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def make_tokenizer(spec: str | None):
    if spec == "bytes":
        return ByteTokenizer()
    from ..tokenizer import Tokenizer
    return Tokenizer(spec)


def model_config(cfg: TrainConfig, resume_dir: Path | None = None) -> ModelConfig:
    """The model's shape: a resumed workdir's, else init_from's, else `model`; dtypes from the run."""
    if resume_dir is not None or cfg.init_from:
        mc = checkpoint.load_config(resume_dir or cfg.init_from)
    elif isinstance(cfg.model, str):
        mc = load_model_config(cfg.model)
    else:
        keys = dict(cfg.model)
        base = load_model_config(keys.pop("preset")).to_dict() if "preset" in keys else {}
        mc = ModelConfig.from_dict(base | keys)
    return dataclasses.replace(mc, dtype=cfg.compute_dtype, param_dtype="float32")
