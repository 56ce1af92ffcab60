"""The one on-disk format: `DIR/config.json` (the model config) + an orbax CheckpointManager in DIR.

Each step directory holds the item `params` (a plain nested dict of arrays, the model's layout), and
for training runs also `opt_state`, `data` (iterator state) and `meta`. `convert --to jax` writes step 0
with params only; `train` writes more steps in the same directory; every reader (generate, score,
convert --from jax, init_from) takes the latest step's params. Restores always go into an abstract,
sharded target built for the current mesh, so any mesh reads any checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from .config import ModelConfig, read_json
from .model import abstract_model
from .sharding import state_shardings

FORMAT = "llama3-jax"
CONFIG_FILE = "config.json"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON via temp file + rename so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_config(directory: Path, cfg: ModelConfig, tokenizer: str | None = None) -> None:
    """`tokenizer`: what a training run tokenized with ("bytes" or a tokenizer.model path), for readers
    to use by default; None (Llama 3's tokenizer) is not written."""
    if jax.process_index() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "model": cfg.to_dict()} | ({"tokenizer": tokenizer} if tokenizer else {})
        write_json_atomic(Path(directory) / CONFIG_FILE, data)


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (is {directory} a llama3-jax checkpoint?)")
    data = read_json(path, "a llama3-jax checkpoint")
    if data.get("format") != FORMAT or "model" not in data:
        raise ValueError(f"{path}: not a llama3-jax config (format={data.get('format')!r})")
    return ModelConfig.from_dict(data["model"])


def load_tokenizer_spec(directory: str | Path) -> str | None:
    """The tokenizer `save_config` recorded (None: Llama 3's, or a checkpoint that records none)."""
    return read_json(Path(directory) / CONFIG_FILE, "a llama3-jax checkpoint").get("tokenizer")


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).exists()


def manager(directory: str | Path, *, max_to_keep: int | None = None, async_save: bool = False,
            read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=not read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def latest_step(directory: str | Path) -> int | None:
    if not Path(directory).exists():
        return None
    with manager(directory, read_only=True) as m:
        return m.latest_step()


def save_params(directory: str | Path, cfg: ModelConfig, params: dict, step: int = 0) -> None:
    """Write a params-only checkpoint (what `convert --to jax` produces)."""
    save_config(directory, cfg)
    with manager(directory) as m:
        m.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        m.wait_until_finished()


def abstract_params(cfg: ModelConfig, mesh=None) -> dict:
    """Pure dict of ShapeDtypeStruct (sharded for `mesh`, or on the first device) for restore."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    else:
        shardings = state_shardings(mesh, state)
    shapes = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(shardings)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore_params(directory: str | Path, mesh=None, step: int | None = None,
                   cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) from the latest (or given) step, restored straight into their shardings."""
    cfg = cfg or load_config(directory)
    target = abstract_params(cfg, mesh)
    return cfg, _restore_params_item(directory, step, ocp.args.StandardRestore(target),
                                     "params do not match config.json")


def _restore_params_item(directory, step: int | None, args, what: str):
    """The `params` item of the latest (or given) step; orbax's errors become one line naming the step."""
    with manager(directory, read_only=True) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint step found")
        try:
            return m.restore(step, args=ocp.args.Composite(params=args))["params"]
        except (ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{directory} step {step}: {what} ({msg})") from None


def restore_one(directory: str | Path, cfg: ModelConfig, name: str, step: int | None = None) -> jax.Array:
    """One parameter ("embed", "layers/wq", ...) by partial restore, so converters never hold the model."""
    path = name.split("/")
    leaf = abstract_params(cfg)
    for p in path:
        leaf = leaf[p]
    sub = leaf
    for p in reversed(path):
        sub = {p: sub}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), sub)
    out = _restore_params_item(directory, step, ocp.args.PyTreeRestore(
        item=sub, restore_args=restore_args, partial_restore=True), f"cannot restore {name}")
    for p in path:
        out = out[p]
    return out


def load_model(directory: str | Path, mesh=None, dtype: str | None = None, **model_kwargs):
    """A ready `Llama` from a checkpoint (eager use, tests, notebooks).

    `dtype` overrides the compute dtype stored in config.json (bfloat16 unless set otherwise): pass
    "float32" for logits equal to transformers' float32 ones; bfloat16 rounds them.
    """
    import dataclasses

    cfg, params = restore_params(directory, mesh)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    model = abstract_model(cfg, **model_kwargs)
    nnx.update(model, params)
    return model
