"""PEFT LoRA adapters <-> llama3-jax: export a LoRA workdir's adapters as a PEFT directory, or import a
PEFT adapter (e.g. from the Hugging Face hub) merged into its base, or kept as adapters to train on.

    convert --from jax --to peft WORKDIR OUT          adapter_config.json + adapter_model.safetensors
    convert --from peft ADAPTER OUT --base BASE_DIR   BASE_DIR: a transformers or llama3-jax checkpoint
    convert --from peft ADAPTER OUT --base BASE_DIR --keep-adapters
        OUT: a LoRA checkpoint (as a LoRA train workdir: config.json with a `lora` record + the adapters
        as its `params`); a transformers base is converted to OUT/base beside them. generate/score read
        it merged; `train lora.init_from=OUT` trains those adapters on.

PEFT's layout (lora_A (rank, in_features), lora_B (out_features, rank), keys
``base_model.model.model.layers.N.<module>.lora_{A,B}.weight``) and the name map live in lora.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..store import checkpoint
from ..model import lora
from ..model.config import ModelConfig, read_json
from .atomic import atomic_dir
from .tensors import ConvertError, Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_peft(src: Path, dst: Path) -> None:
    """A LoRA workdir's adapters (latest step) -> a PEFT directory, written to a temp dir and renamed."""
    from safetensors.numpy import save_file
    try:
        cfg = checkpoint.load_config(src)
        adapted = checkpoint.lora_base(src)
    except (FileNotFoundError, ValueError) as e:
        raise ConvertError(str(e)) from None
    if adapted is None:
        raise ConvertError(f"{src}: not a LoRA workdir (config.json has no 'lora' section); "
                           f"use --to hf for a full checkpoint")
    record, base = adapted
    lc = lora.from_record(record)
    try:
        adapters = checkpoint.restore_adapters(src, cfg, lc)
    except (FileNotFoundError, ValueError) as e:
        raise ConvertError(str(e)) from None
    tensors = lora.to_peft(adapters)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc.rank, "lora_alpha": lc.alpha,
        "lora_dropout": lc.dropout, "target_modules": sorted(lora.PEFT_MODULES[t].split(".")[1] for t in lc.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": str(base),
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(src: Path) -> tuple[lora.LoraConfig, dict[str, np.ndarray]]:
    """A PEFT LoRA directory's settings (as our LoraConfig, scale folded into alpha) and tensors."""
    from safetensors.numpy import load_file
    cfg_path = src / ADAPTER_CONFIG
    pc = read_json(cfg_path, "a PEFT adapter directory", ConvertError)
    if pc.get("peft_type") != "LORA":
        raise ConvertError(f"{cfg_path}: peft_type {pc.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if pc.get(key):
            raise ConvertError(f"{cfg_path}: {key} is not supported")
    if pc.get("bias", "none") != "none" or pc.get("modules_to_save"):
        raise ConvertError(f"{cfg_path}: adapters with bias or modules_to_save are not supported")
    by_module = {v.split(".")[1]: k for k, v in lora.PEFT_MODULES.items()}
    modules = pc.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ConvertError(f"{cfg_path}: target module {unknown[0]!r} is not a Llama projection")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    # rsLoRA scales by alpha / sqrt(r): the same merge as alpha' = alpha * sqrt(r) with scale alpha' / r
    alpha = alpha * r ** 0.5 if pc.get("use_rslora") else alpha
    targets = tuple(t for t in lora.TARGETS if t in {by_module[m] for m in modules})
    weights = src / ADAPTER_WEIGHTS
    if not weights.exists():
        raise ConvertError(f"{weights}: not found")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise ConvertError(f"{weights}: not a readable safetensors file ({e})") from None
    return lora.LoraConfig(rank=r, alpha=alpha, dropout=float(pc.get("lora_dropout", 0.0)), targets=targets), tensors


def base_dir(base: str | Path | None) -> Path:
    """--base, which both imports (merged and as adapters) need."""
    if base is None:
        raise ConvertError("--from peft needs --base BASE_DIR (the transformers or llama3-jax model it adapts)")
    return Path(base)


def base_format(base: Path) -> str:
    """The format of the model an adapter is merged into: "jax" for a llama3-jax checkpoint, else "hf"."""
    cfg_path = base / checkpoint.CONFIG_FILE
    if cfg_path.exists() and read_json(cfg_path, "a model config", ConvertError).get("format") == checkpoint.FORMAT:
        return "jax"
    return "hf"


def import_adapters(src: Path, dst: Path, base: str | Path | None, progress: bool,
                    convert_base: Callable[[Path, Path], ModelConfig]) -> ModelConfig:
    """`--keep-adapters`: a PEFT adapter -> a LoRA checkpoint at `dst` (written to a temp dir, renamed
    when complete) whose `lora` record names the base: `base` itself when it is a llama3-jax checkpoint,
    else `dst/base`, converted from transformers here by `convert_base(base, out)` (the driver's
    `convert --from hf --to jax`, passed in so this format never imports the driver above it; its dtype
    applies to the base, adapters stay float32)."""
    import jax
    base = base_dir(base)
    lc, tensors = read_adapter(src)
    with atomic_dir(dst) as tmp:
        if base_format(base) == "jax":
            try:
                cfg, tokenizer = checkpoint.load_config(base), checkpoint.load_tokenizer_spec(base)
            except (FileNotFoundError, ValueError) as e:
                raise ConvertError(str(e)) from None
            recorded = base.absolute()
        else:
            cfg, tokenizer = convert_base(base, tmp / "base"), None
            recorded = dst.absolute() / "base"  # where it lands after the rename below
        try:
            adapters = lora.from_peft(tensors, cfg, lc, str(src / ADAPTER_WEIGHTS))
        except ValueError as e:
            raise ConvertError(str(e)) from None
        checkpoint.save_params(tmp, cfg, jax.tree.map(jax.numpy.asarray, adapters), tokenizer=tokenizer,
                               lora_record=lora.config_record(lc, str(recorded)))
    if progress:
        print(f"imported {src} (peft, LoRA rank {lc.rank}, {', '.join(lc.targets)}) -> {dst} as adapters on "
              f"{recorded}", file=sys.stderr)
    return cfg


class PeftReader:
    """The base checkpoint's tensors (`base`: its hf or jax reader, which the driver opens from
    `base_dir`/`base_format`) with the adapter at `src` merged into its targets."""

    def __init__(self, src: Path, base):
        self.base = base
        self.config, self.dtype = self.base.config, self.base.dtype
        lc, tensors = read_adapter(src)
        try:
            self.adapters = lora.from_peft(tensors, self.config, lc, str(src / ADAPTER_WEIGHTS))
        except ValueError as e:
            raise ConvertError(str(e)) from None
        self.scale = lc.scale

    def tensors(self) -> Iterator[Tensor]:
        for t in self.base.tensors():
            name = t.name.split("/", 1)[1] if t.layer is not None else None
            ab = self.adapters["layers"].get(name)
            if ab is not None:
                d = np.tensordot(ab["a"][t.layer], ab["b"][t.layer], 1)
                merged = (t.array.astype(np.float32) + self.scale * d).astype(t.array.dtype)
                t = t._replace(array=merged, origin=f"{t.origin} + LoRA")
            yield t
