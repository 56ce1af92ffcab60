"""LoRA: low-rank adapters as a separate pytree beside the frozen base weights.

For a projection ``y = x W`` the adapter adds ``(alpha / rank) * (x A) B``, A (in..., rank) and
B (rank, out...) in the same einsum layout as W (llama.py), so the merged weight is
``W + (alpha / rank) * tensordot(A, B, 1)``. B starts at zero: an untrained adapter is the base model.
A starts as PEFT's default (Kaiming-uniform, bound 1/sqrt(fan_in)).

The adapters of every layer are stacked on a leading `layers` axis like the base weights:

    {"layers": {name: {"a": (layers, *in, rank), "b": (layers, rank, *out)}}}   name in `targets`

The base checkpoint layout never changes; a LoRA workdir holds only these arrays (and their optimizer
state) and names its base in config.json (`lora` section, see `config_record`).

PEFT interoperability (`to_peft` / `from_peft`): Hugging Face's `LlamaForCausalLM` keeps each
projection as a Linear of weight (out_features, in_features) whose in/out match our einsum layout
flattened (q/k are already in HF's rotate-half layout, llama.py), so PEFT's ``lora_A.weight`` is
``A.reshape(-1, rank).T`` and ``lora_B.weight`` is ``B.reshape(rank, -1).T``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .llama import N_IN, PROJECTIONS, layer_specs

TARGETS = PROJECTIONS
PEFT_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                "w_down": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, training only
    targets: tuple[str, ...] = TARGETS
    # train only: a LoRA checkpoint (a LoRA train workdir, or `convert --from peft --keep-adapters`
    # output) whose adapters training starts from, on the base it records (train/config.py resolve_lora)
    init_from: str | None = None

    def __post_init__(self):
        if self.rank < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora: need rank >= 0 and 0 <= dropout < 1 (got rank={self.rank}, "
                             f"dropout={self.dropout})")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"lora.targets: unknown {bad[0] if bad else 'empty list'!r} "
                             f"(choose from {', '.join(TARGETS)})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def specs(cfg: ModelConfig, lc: LoraConfig) -> dict[str, dict[str, tuple[tuple[int, ...], tuple]]]:
    """name -> {"a"|"b": (stacked shape, logical axes)}."""
    out = {}
    base = layer_specs(cfg)
    for name in lc.targets:
        shape, axes, _ = base[name]
        n = N_IN[name]
        out[name] = {"a": ((cfg.n_layers, *shape[:n], lc.rank), ("layers", *axes[:n], "lora_rank")),
                     "b": ((cfg.n_layers, lc.rank, *shape[n:]), ("layers", "lora_rank", *axes[n:]))}
    return out


def init(cfg: ModelConfig, lc: LoraConfig, key: jax.Array) -> dict:
    """A uniform(+-1/sqrt(fan_in)) as PEFT does, B = 0 (so the adapted model starts as the base)."""
    out = {}
    for i, (name, s) in enumerate(specs(cfg, lc).items()):
        a_shape = s["a"][0]
        fan_in = math.prod(a_shape[1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        out[name] = {"a": a, "b": jnp.zeros(s["b"][0], jnp.float32)}
    return {"layers": out}


def abstract(cfg: ModelConfig, lc: LoraConfig, mesh) -> dict:
    """ShapeDtypeStructs (float32) with shardings from the logical rules."""
    from ..parallel.sharding import named_sharding
    return {"layers": {name: {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=named_sharding(mesh, axes, shape))
                              for k, (shape, axes) in s.items()} for name, s in specs(cfg, lc).items()}}


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """A (L, *in, r), B (L, r, *out) -> the stacked weight change (L, *in, *out), unscaled."""
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, 1))(a, b)


def merge(params: dict, adapters: dict, scale: float) -> dict:
    """Base params + scale * A B for every adapted weight (in the base's dtype)."""
    layers = dict(params["layers"])
    for name, ab in adapters["layers"].items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + scale * delta(ab["a"], ab["b"])).astype(w.dtype)
    return {**params, "layers": layers}


def config_record(lc: LoraConfig, base: str) -> dict:
    """What a LoRA workdir's config.json records: the settings and the base checkpoint's path."""
    return {"rank": lc.rank, "alpha": lc.alpha, "dropout": lc.dropout, "targets": list(lc.targets), "base": base}


def from_record(record: dict) -> LoraConfig:
    return LoraConfig(rank=int(record["rank"]), alpha=float(record["alpha"]), dropout=float(record["dropout"]),
                      targets=tuple(record["targets"]))


# ------------------------------------------------------------------------------------- PEFT
def peft_key(name: str, layer: int, which: str) -> str:
    """Our (name, layer, "a"|"b") -> the tensor name in PEFT's adapter_model.safetensors."""
    return f"base_model.model.model.layers.{layer}.{PEFT_MODULES[name]}.lora_{which.upper()}.weight"


def to_peft(adapters: dict) -> dict[str, np.ndarray]:
    """Stacked adapters -> PEFT's tensors: lora_A (rank, in_features), lora_B (out_features, rank)."""
    out = {}
    for name, ab in adapters["layers"].items():
        a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
        r = a.shape[-1]
        for i in range(a.shape[0]):
            out[peft_key(name, i, "a")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[peft_key(name, i, "b")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def from_peft(tensors: dict[str, np.ndarray], cfg: ModelConfig, lc: LoraConfig, where: str) -> dict:
    """PEFT's tensors -> stacked adapters in our layout; a missing or misshapen tensor is named."""
    out = {}
    for name, s in specs(cfg, lc).items():
        parts = {}
        for k in ("a", "b"):
            shape = s[k][0]
            rows = []
            for i in range(cfg.n_layers):
                key = peft_key(name, i, k)
                if key not in tensors:
                    raise ValueError(f"{where}: missing tensor {key}")
                t = np.asarray(tensors[key], np.float32)
                want = (lc.rank, math.prod(shape[1:-1])) if k == "a" else (math.prod(shape[2:]), lc.rank)
                if t.shape != want:
                    raise ValueError(f"{where}: {key} has shape {t.shape}, expected {want}")
                rows.append(t.T.reshape(shape[1:]))
            parts[k] = np.stack(rows)
        out[name] = parts
    return {"layers": out}
