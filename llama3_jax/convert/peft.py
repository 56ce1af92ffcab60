"""PEFT LoRA adapters <-> llama3-jax: export a LoRA workdir's adapters as a PEFT directory, or import a
PEFT adapter (e.g. from the Hugging Face hub) merged into its base, or kept as adapters to train on.

    convert --from jax --to peft WORKDIR OUT [--base-model-name NAME]
        adapter_config.json + adapter_model.safetensors, loadable by AutoPeftModelForCausalLM
    convert --from peft ADAPTER OUT --base BASE_DIR   BASE_DIR: a transformers or llama3-jax checkpoint
    convert --from peft ADAPTER OUT --base BASE_DIR --keep-adapters
        OUT: a LoRA checkpoint (as a LoRA train workdir: config.json with a `lora` record + the adapters
        as its `params`); a transformers base is converted to OUT/base beside them. generate/score read
        it merged; `train lora.init_from=OUT` trains those adapters on.

PEFT's layout (lora_A (rank, in_features), lora_B (out_features, rank), keys
``base_model.model.model.layers.N.<module>.lora_{A,B}.weight``) and the name map live in lora.py.

A reward model's LoRA (head "score": the head trains beside the adapters, store/checkpoint.py
`adapter_target`) is peft's sequence classification: `task_type` "SEQ_CLS", the head in
`modules_to_save` (["classifier", "score"], what peft 0.21.2 writes for SEQ_CLS), its trained weight
saved as ``base_model.model.score.weight`` (1, D), as peft saves a module to save. It loads with
`AutoPeftModelForSequenceClassification` (a base that is a language model also needs `num_labels=1`
and a `pad_token_id` given). An imported SEQ_CLS adapter makes a reward model, whatever the base's head.

What can go wrong, and what catches it:
- An export that peft cannot load onto its base: `base_model_name_or_path` must be something
  transformers reads, not our jax checkpoint. `convert --from hf --to jax` records in config.json
  where the weights came from (`source`: the hf directory, or hub name + revision for a hub cache
  snapshot, hf.hf_source); the export writes that, or `--base-model-name`, and refuses (one line) a
  base that records none. The config has every key peft 0.21.2 writes (`adapter_config`), with
  `peft_version` "0.21.2": the format written, whatever peft is installed (peft is no runtime need).
- An adapter config that is not what it claims: every setting is checked for type and range (`r`
  0 would divide by zero; a string `r` would be a wrong rank) and a setting that changes the math
  and that we do not implement (DoRA, per-layer ranks, bias, modules to save other than a sequence
  classifier's head, ...) is refused, one line naming the file and key. A head of several labels
  (`score.weight` (N, D), N > 1) is refused: our `score` is one scalar. A missing `r` / `lora_alpha` / `lora_dropout` / `target_modules` takes peft's
  default (8, 8, 0.0, q_proj + v_proj), as peft itself would. `target_modules` is matched as peft
  matches it (a name or dotted suffix, a regular expression, "all-linear"), and must adapt every
  layer of a projection or none.
- A hostile or inconsistent adapter_model.safetensors: its header goes through the checks of model
  weights (untrusted.py, via hf.read_header) before anything is read, only float tensors are taken,
  and the tensor names must be exactly those the config implies: a tensor peft would ignore, or one
  it would leave at random init, is an error rather than a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from ..store import checkpoint
from ..model import lora
from ..model.config import ModelConfig, read_json
from .atomic import atomic_dir
from .hf import DTYPES, read_header
from .tensors import ConvertError, Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the peft release whose adapter_config.json key set `adapter_config` writes
# peft's defaults for settings an adapter_config.json leaves out (LoraConfig; llama's target modules)
DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# settings that change what the adapter computes and that the merge here does not implement
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform",
               "layer_replication", "exclude_modules", "target_parameters", "lora_bias", "use_qalora",
               "use_bdlora", "alora_invocation_tokens", "trainable_token_indices")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# a reward model's head: what peft's SEQ_CLS task saves (modules_to_save), and under which key
SEQ_CLS_MODULES = ["classifier", "score"]  # peft 0.21.2's for SEQ_CLS; "classifier" is no Llama module
SCORE_KEY = "base_model.model.score.weight"


def adapter_config(lc: lora.LoraConfig, base_name: str, revision: str | None, head: str = "lm") -> dict:
    """adapter_config.json as peft 0.21.2's LoraConfig.save_pretrained writes it (all its keys;
    tests/test_peft_io.py and test_reward_convert.py compare with peft's own): our settings, peft's
    defaults for the rest; a reward model's (head "score") as peft's SEQ_CLS task writes it."""
    seq_cls = head == "score"
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_name, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": lc.alpha, "lora_bias": False,
        "lora_dropout": lc.dropout, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": SEQ_CLS_MODULES if seq_cls else None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": lc.rank, "rank_pattern": {},
        "revision": revision, "target_modules": sorted(lora.PEFT_MODULES[t].split(".")[1] for t in lc.targets),
        "target_parameters": None, "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
    }


def base_model_name(base: Path, override: str | None) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) for an export on the jax checkpoint `base`: `override`
    (--base-model-name), else the transformers model `base` was converted from (its config.json
    `source`, written by `convert --from hf --to jax`)."""
    if override is not None:
        return override, None
    path = base / checkpoint.CONFIG_FILE
    source = read_json(path, "a llama3-jax checkpoint", ConvertError).get("source")
    if not (isinstance(source, dict) and source.get("format") == "hf"
            and isinstance(source.get("name_or_path"), str) and source["name_or_path"]):
        raise ConvertError(f"{path}: the LoRA base records no transformers model it was converted from "
                           f"(no hf 'source'): give --base-model-name NAME (a hub name or a transformers directory)")
    revision = source.get("revision")
    return source["name_or_path"], revision if isinstance(revision, str) else None


def export_peft(src: Path, dst: Path, base_name: str | None = None) -> None:
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
    name, revision = base_model_name(base, base_name)
    lc = lora.from_record(record)
    try:
        adapters = checkpoint.restore_adapters(src, cfg, lc)
    except (FileNotFoundError, ValueError) as e:
        raise ConvertError(str(e)) from None
    tensors = lora.to_peft(adapters)
    if cfg.head == "score":  # the trained head, as peft saves a module to save: (num_labels, D)
        tensors[SCORE_KEY] = np.ascontiguousarray(np.asarray(adapters["score"], np.float32).T)
    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = adapter_config(lc, name, revision, cfg.head)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ import


class Adapter(NamedTuple):
    """A PEFT adapter directory as read and checked, before the base model is known."""
    config: Path  # its adapter_config.json
    weights: Path  # its adapter_model.safetensors
    rank: int
    alpha: float  # rsLoRA folded in: the scale is alpha / rank
    dropout: float
    modules: str | list[str]  # target_modules as peft reads it
    tensors: dict[str, np.ndarray]  # float32
    head: bool = False  # a sequence classifier's (SEQ_CLS): a reward model's trained `score` (SCORE_KEY)


def _setting(pc: dict, path: Path, key: str, ok: Callable[[object], bool], want: str):
    """pc[key] (peft's default when absent; for target_modules also when null, as peft reads it)."""
    value = pc.get(key)
    if key not in pc or (value is None and key == "target_modules"):
        value = DEFAULTS.get(key)
    if not ok(value):
        raise ConvertError(f"{path}: {key}: {value!r} is not {want}")
    return value


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_config(pc: dict, path: Path) -> tuple[int, float, float, str | list[str]]:
    """(rank, alpha, dropout, target_modules) of an adapter_config.json; one line naming the key else."""
    if pc.get("peft_type") != "LORA":
        raise ConvertError(f"{path}: peft_type: {pc.get('peft_type')!r} is not LORA")
    for key in UNSUPPORTED:
        value = pc.get(key)
        if not (value is None or value is False or value == {} or value == []):
            raise ConvertError(f"{path}: {key}: {value!r} is not supported")
    _head_setting(pc, path)
    if pc.get("bias", "none") != "none":
        raise ConvertError(f"{path}: bias: {pc['bias']!r} is not supported (only 'none')")
    r = _setting(pc, path, "r", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1,
                 "an integer >= 1")
    alpha = float(_setting(pc, path, "lora_alpha", _is_number, "a finite number"))
    dropout = float(_setting(pc, path, "lora_dropout", lambda x: _is_number(x) and 0 <= x < 1, "a number in [0, 1)"))
    rslora = _setting(pc, path, "use_rslora", lambda x: x is None or isinstance(x, bool), "true or false")
    modules = _setting(pc, path, "target_modules", lambda x: isinstance(x, str) and x or isinstance(x, list)
                       and x and all(isinstance(m, str) and m for m in x), "a module name, a list of them or a regex")
    # rsLoRA scales by alpha / sqrt(r): the same merge as alpha' = alpha * sqrt(r) with scale alpha' / r
    return r, alpha * r ** 0.5 if rslora else alpha, dropout, modules


def _head_setting(pc: dict, path: Path) -> bool:
    """Whether the adapter carries a sequence classifier's head (peft's SEQ_CLS task, or `score` among
    `modules_to_save`), a reward model's; any other module to save is refused (one line)."""
    modules = pc.get("modules_to_save")
    if modules is not None and not (isinstance(modules, list) and all(m in SEQ_CLS_MODULES for m in modules)):
        raise ConvertError(f"{path}: modules_to_save: {modules!r} is not supported (only a reward model's "
                           f"head: score)")
    return pc.get("task_type") == "SEQ_CLS" or "score" in (modules or ())


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    """adapter_model.safetensors, checked as model weights are (hf.read_header: header length,
    truncation, dtypes, shapes against byte counts, offsets inside the data and disjoint) before any
    tensor is read; float tensors only, as float32."""
    if not path.exists():
        raise ConvertError(f"{path}: not found")
    header, start = read_header(path)
    for name, info in header.items():
        if info["dtype"] not in FLOAT_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has dtype {info['dtype']}: adapter weights are floats")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return {name: data[start + info["data_offsets"][0]:start + info["data_offsets"][1]]
                .view(DTYPES[info["dtype"]]).reshape(info["shape"]).astype(np.float32)
                for name, info in header.items()}
    finally:
        del data


def read_adapter(src: Path) -> Adapter:
    """A PEFT LoRA directory's settings and tensors, checked as far as they can be without the base."""
    cfg_path = src / ADAPTER_CONFIG
    pc = read_json(cfg_path, "a PEFT adapter directory", ConvertError)
    rank, alpha, dropout, modules = _check_config(pc, cfg_path)
    weights = src / ADAPTER_WEIGHTS
    return Adapter(cfg_path, weights, rank, alpha, dropout, modules, _read_weights(weights),
                   _head_setting(pc, cfg_path))


def adapted_config(adapter: Adapter, cfg: ModelConfig) -> ModelConfig:
    """The model an adapter on a base of config `cfg` makes: a reward model (head score) when the adapter
    carries a sequence classifier's head, whatever the base's head; else the base's."""
    return dataclasses.replace(cfg, head="score") if adapter.head else cfg


def _targets(adapter: Adapter, n_layers: int) -> tuple[str, ...]:
    """The projections `target_modules` adapts, matched against the module names of transformers'
    LlamaForCausalLM as peft matches them: a string is "all-linear" or a regular expression over the
    whole name, a list's entries are names or dotted suffixes. A projection adapted in some layers
    only, or an entry that names no projection, is refused."""
    names = {(t, i): f"model.layers.{i}.{lora.PEFT_MODULES[t]}" for t in lora.TARGETS for i in range(n_layers)}
    modules, path = adapter.modules, adapter.config
    if isinstance(modules, str) and modules.lower() == "all-linear":
        return lora.TARGETS
    if isinstance(modules, str):
        try:
            pattern = re.compile(modules)
        except re.error as e:
            raise ConvertError(f"{path}: target_modules: {modules!r} is not a regular expression ({e})") from None
        hit = {k for k, name in names.items() if pattern.fullmatch(name)}
    else:
        hit = set()
        for m in modules:
            found = {k for k, name in names.items() if name == m or name.endswith("." + m)}
            if not found:
                raise ConvertError(f"{path}: target_modules: {m!r} is not a Llama projection "
                                   f"({', '.join(sorted(v.split('.')[1] for v in lora.PEFT_MODULES.values()))})")
            hit |= found
    targets = tuple(t for t in lora.TARGETS if any((t, i) in hit for i in range(n_layers)))
    if not targets:
        raise ConvertError(f"{path}: target_modules: {modules!r} matches no Llama projection")
    partial = [t for t in targets if not all((t, i) in hit for i in range(n_layers))]
    if partial:
        raise ConvertError(f"{path}: target_modules: {modules!r} adapts {lora.PEFT_MODULES[partial[0]]} in some "
                           f"layers only: not supported")
    return targets


def adapters_for(adapter: Adapter, cfg: ModelConfig) -> tuple[lora.LoraConfig, dict]:
    """The adapter on a base of config `cfg`: our LoraConfig and the stacked adapters. The file's
    tensors must be exactly those its config implies, each of the base's shape."""
    lc = lora.LoraConfig(rank=adapter.rank, alpha=adapter.alpha, dropout=adapter.dropout,
                         targets=_targets(adapter, cfg.n_layers))
    wanted = {lora.peft_key(t, i, k) for t in lc.targets for i in range(cfg.n_layers) for k in "ab"}
    extra = sorted(set(adapter.tensors) - wanted - ({SCORE_KEY} if adapter.head else set()))
    if extra:
        raise ConvertError(f"{adapter.weights}: unexpected tensor {extra[0]} (not a LoRA tensor of target_modules "
                           f"on this {cfg.n_layers}-layer base; {len(extra)} unexpected)")
    try:
        adapters = lora.from_peft(adapter.tensors, cfg, lc, str(adapter.weights))
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if adapter.head:
        adapters["score"] = _score_head(adapter, cfg.dim)
    return lc, adapters


def _score_head(adapter: Adapter, dim: int) -> np.ndarray:
    """A SEQ_CLS adapter's trained head (1, D) as our `score` (D, 1); missing or of several labels: one line."""
    w = adapter.tensors.get(SCORE_KEY)
    if w is None:
        raise ConvertError(f"{adapter.weights}: missing tensor {SCORE_KEY} (the head its config saves: "
                           f"{adapter.config.name} task_type SEQ_CLS or modules_to_save score)")
    if w.shape != (1, dim):
        raise ConvertError(f"{adapter.weights}: {SCORE_KEY} has shape {tuple(w.shape)}, expected (1, {dim}): "
                           f"only a reward model's head (one label) converts")
    return np.ascontiguousarray(w.T)


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
    applies to the base, adapters stay float32, and it records the hf `source` a `--to peft` export of
    this checkpoint names)."""
    import jax
    base = base_dir(base)
    adapter = read_adapter(src)  # checked before a base is converted
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
        lc, adapters = adapters_for(adapter, cfg)
        cfg = adapted_config(adapter, cfg)
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
        adapter = read_adapter(src)
        lc, self.adapters = adapters_for(adapter, self.base.config)
        self.config, self.dtype = adapted_config(adapter, self.base.config), self.base.dtype
        self.scale, self.head_origin = lc.scale, f"{adapter.weights.name}:{SCORE_KEY}"
        self.pad_token_id = getattr(base, "pad_token_id", None)  # a reward model's, for --to hf (hf.py)

    def tensors(self) -> Iterator[Tensor]:
        head = self.adapters.get("score")
        for t in self.base.tensors():
            if head is not None and t.name in ("lm_head", "score"):  # the adapter's head replaces the base's
                continue
            name = t.name.split("/", 1)[1] if t.layer is not None else None
            ab = self.adapters["layers"].get(name)
            if ab is not None:
                d = np.tensordot(ab["a"][t.layer], ab["b"][t.layer], 1)
                merged = (t.array.astype(np.float32) + self.scale * d).astype(t.array.dtype)
                t = t._replace(array=merged, origin=f"{t.origin} + LoRA")
            yield t
        if head is not None:
            yield Tensor("score", None, head, self.head_origin)
