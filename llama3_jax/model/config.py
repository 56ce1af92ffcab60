"""Typed configuration: the model's shape, its presets, and translation to the HF and Meta formats.

Every numeric constant of the architecture (eps, rope theta, rope scaling) lives here and is read
from the source files when converting: other JAX ports went wrong by hard-coding them.
Run configs (train / generate) are also frozen dataclasses; `config_loader.load_yaml_config` builds
any of them from a YAML file plus dotted `key=value` overrides and refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path

from ..config_loader import build_dataclass, load_yaml_config, read_yaml  # noqa: F401 (load_yaml_config: re-exported)

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
HEADS = ("lm", "score")  # ModelConfig.head: what sits on the final norm (llama.py)
# transformers' class for each head (config.json "architectures")
HF_ARCHITECTURES = {"lm": "LlamaForCausalLM", "score": "LlamaForSequenceClassification"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" frequency scaling (3.1 uses factor 8, 3.2 factor 32)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    bos_id: int = 128000
    eos_ids: tuple[int, ...] = (128001, 128008, 128009)
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    # None: float matrices; "int8": int8 matrices + per-output-channel scales (quant.py), for generate/score
    quantization: str | None = None
    # "lm": the output layer `lm_head` (vocab logits); "score": a scalar head `score` (embed, 1) in its
    # place, a reward model (transformers' LlamaForSequenceClassification with num_labels=1)
    head: str = "lm"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        _check_model_values(self)
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization={self.quantization!r}: expected \"int8\" or null")
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}: expected one of {', '.join(HEADS)}")
        if self.head == "score" and self.quantization is not None:
            raise ValueError(f"head=score: a reward model has no {self.quantization} path (quantization is for "
                             f"generating with a language model's output layer); use float weights")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

    def num_params(self) -> int:
        """Exact parameter count (the published 8,030,261,248 for Llama 3 8B)."""
        d, L, k = self.dim, self.n_layers, self.head_dim
        attn = d * k * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.intermediate_size
        out = d if self.head == "score" else 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + out + L * (attn + mlp + 2 * d) + d

    def to_dict(self) -> dict:
        """The config.json record; `head` only when it is not "lm", so a language model's record (and
        every reader of it, older versions included) is what it was before reward models existed."""
        out = dataclasses.asdict(self)
        if out["head"] == "lm":
            del out["head"]
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "ModelConfig":
        return build_dataclass(cls, d, source=source)


# Generous bounds (the largest Llama 3 is far inside them) so a hostile or mistyped config.json is
# refused by name before anything is sized from it: vocab_size 10^12 would ask for terabytes.
SIZE_LIMITS = {"vocab_size": 1 << 24, "dim": 1 << 17, "n_layers": 1 << 12, "n_heads": 1 << 12,
               "n_kv_heads": 1 << 12, "head_dim": 1 << 12, "intermediate_size": 1 << 20, "max_seq_len": 1 << 24}
MAX_PARAMS = 10**13


def _check_model_values(cfg: ModelConfig) -> None:
    for key, limit in SIZE_LIMITS.items():
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise ValueError(f"{key}={v!r}: expected an integer in [1, {limit}] (refused before allocating anything)")
    floats = {"norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}
    if isinstance(cfg.rope_scaling, RopeScaling):
        floats.update({f"rope_scaling.{k}": v for k, v in dataclasses.asdict(cfg.rope_scaling).items()})
    for key, v in floats.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{key}={v!r}: expected a finite number > 0")
    if cfg.num_params() > MAX_PARAMS:
        raise ValueError(f"these sizes make {cfg.num_params():.3g} parameters (more than {MAX_PARAMS:.0e}): refusing")


# ---------------------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name (`llama3.1-8b`, a file in configs/models/) or a YAML/JSON file of ModelConfig keys."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIGS_DIR / "models" / f"{name_or_path}.yaml"
        if not path.exists():
            close = difflib.get_close_matches(str(name_or_path), preset_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (presets: {', '.join(preset_names())})"
            raise ValueError(f"unknown model preset {name_or_path!r}{hint}")
    return build_dataclass(ModelConfig, read_yaml(path) or {}, source=str(path))


def read_json(path: Path, what: str, error: type[Exception] = ValueError) -> dict:
    """A JSON object from `path`; a missing or malformed file raises `error` naming the path."""
    if not path.exists():
        raise error(f"{path}: not found (not {what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------- HF config.json


def from_hf_config(hf: dict, *, source: str = "config.json") -> ModelConfig:
    """Read both the transformers-4 form (rope_theta + rope_scaling) and the 5 form (rope_parameters)."""
    try:
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):  # transformers 4 may write {"rope_type": "default"}: no scaling
            scaling = None
        elif kind != "llama3":
            raise ValueError(f"{source}: unsupported rope type {kind!r}")
        n_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", 128001)
        head = _hf_head(hf)
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if not scaling else RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            ),
            max_seq_len=hf.get("max_position_embeddings", 8192),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 128000,
            eos_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            head=head,
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(e if str(e).startswith(source) else f"{source}: {e}") from None


def _hf_head(hf: dict) -> str:
    """"score" for a LlamaForSequenceClassification with one label (a reward model), else "lm"; a
    classifier of several labels is refused (our `score` head is one scalar)."""
    if "LlamaForSequenceClassification" not in (hf.get("architectures") or ()):
        return "lm"
    labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))  # transformers' default: 2 labels
    if labels != 1:
        raise ValueError(f"LlamaForSequenceClassification with {labels} labels: only a reward model "
                         f"(num_labels=1) converts")
    return "score"


LLAMA3_PAD_ID = 128004  # <|finetune_right_pad_id|> of Llama 3's tokenizer (tokenizer.py Tokenizer.pad_id)
LLAMA3_VOCAB = 128256


def default_pad_id(cfg: ModelConfig) -> int:
    """The `pad_token_id` a reward model's HF config.json gets when its source recorded none. transformers
    reads a row's reward at its last token that is not the pad id, and our rows end in EOS / <|eot_id|>,
    so the pad id must be neither BOS nor any EOS id: <|finetune_right_pad_id|> (128004) with Llama 3's
    vocabulary, else the highest id that is neither (the byte tokenizer's vocab of 262: 261, an id it
    never emits)."""
    taken = {cfg.bos_id, *cfg.eos_ids}
    if cfg.vocab_size >= LLAMA3_VOCAB and LLAMA3_PAD_ID not in taken:
        return LLAMA3_PAD_ID
    return next(i for i in range(cfg.vocab_size - 1, -1, -1) if i not in taken)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32", pad_token_id: int | None = None) -> dict:
    """A config.json that `AutoModelForCausalLM.from_pretrained` loads (transformers 4 and 5 keys); of a
    reward model (head "score"), one that `AutoModelForSequenceClassification` loads with num_labels=1
    and a `pad_token_id`, which transformers needs to find each row's last token: `pad_token_id` (the one
    the source recorded, kept by the converters), else `default_pad_id`."""
    out = {
        "architectures": [HF_ARCHITECTURES[cfg.head]],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_ids[0],
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if cfg.head == "score":  # one label: transformers reads num_labels from id2label
        out |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
        pad_token_id = default_pad_id(cfg) if pad_token_id is None else pad_token_id
    if pad_token_id is not None:
        out["pad_token_id"] = int(pad_token_id)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rs = dataclasses.asdict(cfg.rope_scaling) | {"rope_type": "llama3"}
        out["rope_scaling"] = rs
        rope |= rs
    out["rope_parameters"] = rope
    return out


def to_hf_generation_config(cfg: ModelConfig) -> dict:
    return {"bos_token_id": cfg.bos_id, "eos_token_id": list(cfg.eos_ids), "do_sample": False}


# ------------------------------------------------------------------------------- Meta params.json


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU width (llama_models FeedForward)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def from_meta_params(p: dict, *, tie_embeddings: bool = False, source: str = "params.json") -> ModelConfig:
    """params.json -> ModelConfig. Meta's files carry no rope scaling factor (its reference hard-codes 8,
    which is wrong for 3.2): we read explicit `rope_scaling_factor`/... keys when present (our exports
    write them), else 32 for tied-embedding models (3.2 1B/3B), else 8."""
    try:
        n_heads = p["n_heads"]
        scaling = None
        if p.get("use_scaled_rope"):
            scaling = RopeScaling(
                factor=float(p.get("rope_scaling_factor") or (32.0 if tie_embeddings else 8.0)),
                low_freq_factor=float(p.get("rope_low_freq_factor", 1.0)),
                high_freq_factor=float(p.get("rope_high_freq_factor", 4.0)),
                original_max_position_embeddings=int(p.get("rope_original_max_position_embeddings", 8192)),
            )
        return ModelConfig(
            vocab_size=p["vocab_size"],
            dim=p["dim"],
            n_layers=p["n_layers"],
            n_heads=n_heads,
            n_kv_heads=p.get("n_kv_heads") or n_heads,
            head_dim=p["dim"] // n_heads,
            intermediate_size=meta_ffn_dim(p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
            norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=float(p.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
            max_seq_len=p.get("context_length", p.get("max_seq_len", 131072 if scaling else 8192)),
            tie_embeddings=tie_embeddings,
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(e if str(e).startswith(source) else f"{source}: {e}") from None


def to_meta_params(cfg: ModelConfig) -> dict:
    """ModelConfig -> params.json that Meta's `Llama.build` loads; rope scaling and context length go in
    extra keys (Meta's ModelArgs skips unknown keys) so that from_meta_params reads the model back exactly."""
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ValueError(f"Meta format needs head_dim*n_heads == dim, got {cfg.head_dim}*{cfg.n_heads} != {cfg.dim}")
    multiple_of, mult = _meta_ffn_args(cfg.dim, cfg.intermediate_size)
    out = {
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
        "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "use_scaled_rope": cfg.rope_scaling is not None,
        # not "max_seq_len": Meta's loader calls ModelArgs(max_seq_len=..., **params), which a key of
        # that name turns into a TypeError; ModelArgs ignores keys it does not know, like this one.
        "context_length": cfg.max_seq_len,
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        out |= {"rope_scaling_factor": rs.factor, "rope_low_freq_factor": rs.low_freq_factor,
                "rope_high_freq_factor": rs.high_freq_factor,
                "rope_original_max_position_embeddings": rs.original_max_position_embeddings}
    return out


# (dim, ffn width) -> Meta's published (multiple_of, ffn_dim_multiplier): 3/3.1 8B, 70B, 405B, 3.2 1B, 3B
_PUBLISHED_FFN_ARGS = {(4096, 14336): (1024, 1.3), (8192, 28672): (4096, 1.3), (16384, 53248): (4096, 1.2),
                       (2048, 8192): (256, 1.5), (3072, 8192): (256, 1.0)}


def _meta_ffn_args(dim: int, ffn: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) reproducing `ffn`: Meta's published pair for a published shape,
    else one that Meta's rule maps exactly to `ffn`."""
    if (dim, ffn) in _PUBLISHED_FFN_ARGS:
        return _PUBLISHED_FFN_ARGS[(dim, ffn)]
    for multiple_of in (1024, 256):
        if meta_ffn_dim(dim, multiple_of, None) == ffn:
            return multiple_of, None
    base = int(2 * (4 * dim) / 3)
    mult = (ffn - 0.5) / base  # int(mult*base) lands just below ffn; rounding up to `ffn` gives ffn
    assert meta_ffn_dim(dim, ffn, mult) == ffn
    return ffn, mult


# --------------------------------------------------------------------- YAML + dotted overrides
#
