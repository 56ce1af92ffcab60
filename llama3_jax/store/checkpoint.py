"""The one on-disk format: `DIR/config.json` (the model config) + an orbax CheckpointManager in DIR.

Each step directory holds the item `params` (a plain nested dict of arrays, the model's layout), and
for training runs also `opt_state`, `data` (iterator state) and `meta`. `convert --to jax` writes step 0
with params only; `train` writes more steps in the same directory; every reader (generate, score,
convert --from jax, init_from) takes the latest step's params. Restores always go into an abstract,
sharded target built for the current mesh, so any mesh reads any checkpoint.

Integrity (integrity.py): every step a manager saves gets a manifest of its files' sizes and sha256
once committed; readers take the latest step whose files still match it, warning about each newer
step they skip and the file at fault. Unfinished step directories (a save killed midway) are removed
when a writing manager opens the directory. Before a restore, the stored arrays' shapes are compared
with the target's, so a checkpoint of another model shape fails naming the first parameter that
differs (orbax would otherwise pad or cut arrays to the target's shape).

Heads (model/config.py `head`): a reward model (`score`) started from a language model reads only the
trunk (`restore_trunk`: an orbax partial restore, so the output layer, 1 GB for Llama 3 8B, is never
read); a LoRA reward workdir stores its trained `score` beside the adapters, and its merged model
(`restore_params`, `ParamReader`) is the base's trunk + the adapters + that head, whatever head the base
had (`merge_adapters`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from . import integrity, remote
from ..model import lora
from ..model.config import ModelConfig, read_json
from ..model.llama import abstract_model
from ..parallel.distributed import sync
from ..parallel.multihost_io import on_main
from .paths import is_remote
from ..parallel.sharding import make_mesh, state_shardings

FORMAT = "llama3-jax"
CONFIG_FILE = "config.json"
HEAD_KEYS = ("lm_head", "lm_head_scale", "score")  # what sits on the final norm; the rest is the trunk


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON via temp file + fsync + rename, so readers never see half a file and a crash (of the
    process or the machine) leaves the old file or the new one; on any error the temp file goes and
    the old file stays as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(directory: Path, cfg: ModelConfig, tokenizer: str | None = None,
                lora_record: dict | None = None) -> None:
    """`tokenizer`: what a training run tokenized with ("bytes" or a tokenizer.model path), for readers
    to use by default; None (Llama 3's tokenizer) is not written. A LoRA workdir also records its
    adapters' settings and base (`lora_record`, lora.config_record)."""
    if jax.process_index() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "model": cfg.to_dict()} | ({"tokenizer": tokenizer} if tokenizer else {})
        data |= {"lora": lora_record} if lora_record else {}
        write_json_atomic(Path(directory) / CONFIG_FILE, data)


def lora_base(directory: str | Path) -> tuple[dict, Path] | None:
    """(lora record, base checkpoint dir) of a LoRA workdir, None for a full checkpoint. A base that is
    gone is a one-line error naming its path."""
    path = Path(directory) / CONFIG_FILE
    record = read_json(path, "a llama3-jax checkpoint").get("lora") if path.exists() else None
    if not record:
        return None
    base = Path(remote.fetch(record["base"], "the LoRA base")) if is_remote(record["base"]) else Path(record["base"])
    if not is_checkpoint(base):
        raise FileNotFoundError(f"{directory}: the LoRA base checkpoint {base} is missing (config.json lora.base)")
    return record, base


def load_config(directory: str | Path) -> ModelConfig:
    if is_remote(directory):  # a dry run or a run's model shape: config.json alone, not the whole checkpoint
        directory = Path(remote.fetch(f"{str(directory).rstrip('/')}/{CONFIG_FILE}", "a checkpoint")).parent
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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission, ...): one line naming the path."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Manager(ocp.CheckpointManager):
    """An orbax CheckpointManager that seals (integrity.seal) each step it saved once the save is
    committed (orbax waits for the previous save in `save`, `wait_until_finished` and `close`: that is
    where the manifests are written), and turns a failed write (often raised later, from the async
    writer) into one CheckpointWriteError naming the directory, the step and orbax's first line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unsealed: list[int] = []
        self.on_sealed = None  # called once steps are sealed (process 0): remote.WorkdirMirror.push

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()
        try:
            saved = super().save(step, *args, **kwargs)
        except Exception as e:
            raise CheckpointWriteError(f"{self.directory}: checkpoint step {step} not written: {_first_line(e)}") from e
        if saved:
            self._unsealed.append(step)
        return saved

    def wait_until_finished(self) -> None:
        pending, self._unsealed = getattr(self, "_unsealed", []), []
        try:
            super().wait_until_finished()
            for step in pending:
                step_dir = Path(self.directory) / str(step)
                if jax.process_index() == 0 and step_dir.is_dir() and not integrity.is_sealed(step_dir):
                    integrity.seal(step_dir)
        except CheckpointWriteError:
            raise
        except Exception as e:
            steps = ", ".join(map(str, pending)) or "?"
            raise CheckpointWriteError(f"{self.directory}: checkpoint step {steps} not written: {_first_line(e)}") from e
        if pending and getattr(self, "on_sealed", None) is not None:
            try:
                self.on_sealed()
            except Exception as e:
                steps = ", ".join(map(str, pending))
                raise CheckpointWriteError(f"{self.directory}: checkpoint step {steps} saved here but not uploaded: "
                                           f"{_first_line(e)}") from e


def manager(directory: str | Path, *, max_to_keep: int | None = None, async_save: bool = False,
            read_only: bool = False, on_sealed=None) -> ocp.CheckpointManager:
    """`on_sealed`: called (process 0) after each sealing of new steps, e.g. to upload them."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=not read_only)
    if not read_only:
        remove_unfinished(directory)
    m = Manager(Path(directory).absolute(), options=options)
    m.on_sealed = on_sealed
    return m


def remove_unfinished(directory: str | Path) -> list[Path]:
    """Delete step directories whose save never finished (`N.orbax-checkpoint-tmp*`: the process died
    before orbax's commit rename); orbax never reads them. Process 0 only; returns what it removed."""
    directory = Path(directory)
    if jax.process_index() != 0 or not directory.is_dir():
        return []
    removed = sorted(p for p in directory.glob("*.orbax-checkpoint-tmp*") if p.is_dir())
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
        print(f"checkpoint: removed {p}, a save that never finished", file=sys.stderr)
    return removed


def latest_step(directory: str | Path) -> int | None:
    """The latest committed step (not checked against its manifest: see latest_intact_step)."""
    if not Path(directory).exists():
        return None
    with manager(directory, read_only=True) as m:
        return m.latest_step()


def all_steps(directory: str | Path) -> list[int]:
    if not Path(directory).exists():
        return []
    with manager(directory, read_only=True) as m:
        return sorted(m.all_steps())


def latest_intact_step(directory: str | Path, *, set_aside: bool = False) -> int | None:
    """The latest step whose files match its manifest. Each newer step that does not is reported on
    stderr with the file at fault, and with `set_aside` (a writer, which will save that step number
    again) renamed to `STEP.corrupt`. None if there are no steps; ValueError if none is intact.

    Several processes (every one calls this): process 0 alone checks the files, reports and renames;
    the others take its verdict (multihost_io.on_main), so all restore the same step even if their
    views of a shared file system differ, and none hashes the checkpoint again."""
    steps = all_steps(directory)

    def check() -> tuple[int | None, list[tuple[int, str]]]:
        corrupt = []
        for step in reversed(steps):
            problem = integrity.verify(Path(directory) / str(step))
            if problem is None:
                if corrupt:
                    print(f"checkpoint: warning: using step {step} of {directory} instead", file=sys.stderr)
                return step, corrupt
            corrupt.append((step, problem))
            print(f"checkpoint: warning: {directory} step {step} is corrupt: {problem}", file=sys.stderr)
        return None, corrupt

    intact, corrupt = on_main(check)
    if set_aside and corrupt:
        if jax.process_index() == 0:
            for step, _ in corrupt:
                os.replace(Path(directory) / str(step), Path(directory) / f"{step}.corrupt")
        sync(f"llama3_jax_set_aside_{corrupt[-1][0]}")  # no process lists the steps before they moved
    if intact is None and corrupt:
        raise ValueError(f"{directory}: no intact checkpoint step "
                         f"({'; '.join(f'step {step}: {problem}' for step, problem in corrupt)})")
    return intact


def check_shapes(directory: str | Path, step: int, item: str, target: dict) -> None:
    """ValueError naming the first parameter of `target` (a pure dict of ShapeDtypeStruct) whose
    stored shape differs or which is not stored, before orbax pads or cuts it to fit."""
    stored = ocp.StandardCheckpointHandler().metadata(Path(directory).absolute() / str(step) / item).tree
    for path, want in jax.tree_util.tree_flatten_with_path(target)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        node = stored
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        name = "/".join(keys)
        if node is None:
            raise ValueError(f"{directory} step {step}: {item} {name} is not in the checkpoint "
                             f"(the model expects shape {tuple(want.shape)})")
        if tuple(node.shape) != tuple(want.shape):
            raise ValueError(f"{directory} step {step}: {item} {name} has shape {tuple(node.shape)} in the "
                             f"checkpoint, the model expects {tuple(want.shape)} (a checkpoint of another model?)")


def save_params(directory: str | Path, cfg: ModelConfig, params: dict, step: int = 0,
                tokenizer: str | None = None, lora_record: dict | None = None) -> None:
    """Write a params-only checkpoint (what `convert --to jax` produces; with `lora_record`, `params`
    are LoRA adapters on that record's base: `convert --from peft --keep-adapters`)."""
    save_config(directory, cfg, tokenizer=tokenizer, lora_record=lora_record)
    with manager(directory) as m:
        m.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params, layer_save_args(params))),
               force=True)
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
    """(config, params) from the latest (or given) step, restored straight into their shardings.

    A LoRA workdir gives its merged model: base (restored from the path it records) + adapters (and a
    reward model's trained `score` head, whatever head the base has: `merge_adapters`)."""
    cfg = cfg or load_config(directory)
    adapted = lora_base(directory)
    if adapted is not None:
        record, base = adapted
        lc = lora.from_record(record)
        params = restore_trunk(base, mesh, cfg) if cfg.head == "score" else restore_params(base, mesh, cfg=cfg)[1]
        adapters = restore_adapters(directory, cfg, lc, mesh, step)
        return cfg, jax.jit(merge_adapters, static_argnums=2)(params, adapters, lc.scale)
    target = abstract_params(cfg, mesh)
    return cfg, _restore_params_item(directory, step, ocp.args.StandardRestore(target),
                                     "params do not match config.json", target)


def restore_trunk(directory: str | Path, mesh, cfg: ModelConfig, step: int | None = None) -> dict:
    """`cfg`'s params without a head (HEAD_KEYS), from a full checkpoint of `cfg`'s trunk whatever its
    head: only the trunk's arrays are read (an orbax partial restore), into their shardings."""
    target = {k: v for k, v in abstract_params(cfg, mesh).items() if k not in HEAD_KEYS}
    return _restore_params_item(directory, step, None, "params do not match config.json", target)


def merge_adapters(params: dict, adapters: dict, scale: float) -> dict:
    """A LoRA model's full params: scale * A B added to the base's weights (lora.merge), and a reward
    model's trained head (`adapters["score"]`, PEFT's modules_to_save) in place of the base's head."""
    merged = lora.merge(params, adapters, scale)
    if "score" in adapters:
        merged = {k: v for k, v in merged.items() if k not in HEAD_KEYS}
        merged["score"] = adapters["score"].astype(merged["embed"].dtype)
    return merged


def adapter_target(cfg: ModelConfig, lc, mesh) -> dict:
    """What a LoRA workdir trains and stores (abstract, sharded): the adapters, and for a reward model
    (head `score`) the head beside them, float32 like the adapters."""
    target = lora.abstract(cfg, lc, mesh)
    if cfg.head == "score":
        target["score"] = abstract_params(cfg, mesh)["score"]
        target["score"] = jax.ShapeDtypeStruct(target["score"].shape, np.float32, sharding=target["score"].sharding)
    return target


def restore_adapters(directory, cfg: ModelConfig, lc, mesh=None, step: int | None = None) -> dict:
    """The LoRA adapters of a LoRA workdir (its `params` item; a reward model's `score` head too)."""
    mesh = mesh if mesh is not None else make_mesh(devices=jax.devices()[:1])
    target = adapter_target(cfg, lc, mesh)
    return _restore_params_item(directory, step, ocp.args.StandardRestore(target),
                                "LoRA adapters do not match config.json", target)


def _restore_params_item(directory, step: int | None, args, what: str, target: dict):
    """The `params` item of the latest intact step (or the given one: the caller chose it, e.g. with
    latest_intact_step), its stored shapes checked against `target`; orbax's errors become one line.
    `args` None: a partial restore of `target`, a part of the stored tree (the rest is not read)."""
    if step is None:
        step = latest_intact_step(directory)
    if step is None:
        raise FileNotFoundError(f"{directory}: no checkpoint step found")
    check_shapes(directory, step, "params", target)
    try:
        if args is None:
            with ocp.PyTreeCheckpointer() as c:
                return c.restore(Path(directory).absolute() / str(step) / "params", args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        with manager(directory, read_only=True) as m:
            return m.restore(step, args=ocp.args.Composite(params=args))["params"]
    except (ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{directory} step {step}: {what} ({msg})") from None


class ParamReader:
    """A checkpoint's parameters one output tensor at a time (`convert --from jax`): each stacked
    parameter (L, ...) layer by layer, each layer read straight from the stored array (tensorstore, the
    spec orbax reads it with), so no host holds a whole stacked parameter (one 405B w_gate is ~220 GB;
    one layer of it 1.7 GB). With `mesh` (several processes) each process reads only its shards of a
    layer, placed as the rules shard the parameter (a jax.Array); without, a numpy array.
    Checkpoints written here keep every layer in chunks of its own (`layer_save_args`), so reading a
    layer touches only its bytes; older ones (chunks spanning all layers) are read a stacked array at a
    time, as before. A LoRA workdir gives its merged model: base layer + scale * A_i B_i (and a reward
model's trained `score`, read from the workdir)."""

    def __init__(self, directory: str | Path, cfg: ModelConfig, step: int | None = None, mesh=None):
        self.directory, self.cfg, self.mesh = Path(directory), cfg, mesh
        self.step = latest_intact_step(directory) if step is None else step
        if self.step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint step found")
        self.params_dir = self.directory.absolute() / str(self.step) / "params"
        self.base, adapted = None, lora_base(directory)
        if adapted is None:
            self.target = abstract_params(cfg, mesh)
        else:
            record, base = adapted
            self.lc = lora.from_record(record)
            self.base = ParamReader(base, cfg, mesh=mesh)  # read for the trunk only when cfg's head is a score
            one = make_mesh(devices=jax.devices()[:1])
            self.target = adapter_target(cfg, self.lc, mesh if mesh is not None else one)

    def arrays(self, name: str):
        """(layer, array) for each layer of "layers/*" in order, or (None, array) for the others."""
        if self.base is None or name == "score":  # a LoRA reward workdir's head is its own
            yield from self._read(name.split("/"))
            return
        target = name.split("/", 1)[1] if name.startswith("layers/") else None
        if target not in self.lc.targets:
            yield from self.base.arrays(name)
            return
        a, b = (self._read(["layers", target, k]) for k in ("a", "b"))
        for (i, w), (_, ai), (_, bi) in zip(self.base.arrays(name), a, b):
            one = lora.merge({"layers": {target: w[None]}}, {"layers": {target: {"a": ai[None], "b": bi[None]}}},
                             self.lc.scale)
            yield i, one["layers"][target][0]

    def _read(self, path: list[str]):
        leaf = self.target
        for p in path:
            leaf = leaf[p]
        sub = leaf
        for p in reversed(path):
            sub = {p: sub}
        name = "/".join(path)
        check_shapes(self.directory, self.step, "params", sub)
        try:
            store = _open_stored(self.params_dir, ".".join(path))
            sharding = None if self.mesh is None else leaf.sharding
            if path[0] != "layers":
                yield None, _read_shards(store, leaf.shape, leaf.dtype, sharding)
                return
            # a block of layers as the chunks hold them: one layer here; older checkpoints' chunks hold
            # every layer, so their block is the stacked array (read once, not decoded once per layer)
            per_chunk = store.chunk_layout.read_chunk.shape[0] or leaf.shape[0]
            for start in range(0, leaf.shape[0], per_chunk):
                n = min(per_chunk, leaf.shape[0] - start)
                view = store[start:start + n][ts.d[:].translate_to[0]]
                block = _read_shards(view, (n, *leaf.shape[1:]), leaf.dtype, sharding)
                for j in range(n):
                    yield start + j, block[j]
                del block
        except ValueError as e:  # tensorstore: a missing or unreadable chunk
            raise ValueError(f"{self.directory} step {self.step}: cannot read params {name} "
                             f"({_first_line(e)})") from None


def _open_stored(params_dir: Path, name: str):
    """The stored array `name` ("layers.wq") of an orbax `params` item, opened with orbax's own read spec."""
    from etils import epath
    zarr3 = bool(read_json(params_dir / "_METADATA", "an orbax checkpoint item").get("use_zarr3", False))
    ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(params_dir))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(params_dir), use_zarr3=zarr3,
                                       is_ocdbt_checkpoint=ocdbt, ts_context=context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
    return ts.open(spec, open=True, read=True, context=context).result()


def _read_shards(store, shape: tuple[int, ...], dtype, sharding) -> jax.Array | np.ndarray:
    """`store` (a tensorstore view of `shape`) as a jax.Array with `sharding`: this process reads only
    its devices' shards, each distinct shard once. No sharding (one process): the numpy array itself,
    with no device copy beside it."""
    if sharding is None:
        return store.read().result().astype(dtype, copy=False)
    pieces, read = [], {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        span = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
        if span not in read:
            read[span] = store[tuple(slice(a, b) for a, b in span)].read().result().astype(dtype, copy=False)
        pieces.append(jax.device_put(read[span], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def layer_save_args(tree):
    """orbax SaveArgs for `tree`: each array under a "layers" key (stacked, layer axis first) is stored
    in chunks of one layer (`shard_axes=(0,)`: orbax splits that axis down to 1), so ParamReader reads
    one layer's bytes and nothing of the others. Other arrays keep orbax's default chunks."""
    def args(path, x):
        stacked = getattr(x, "ndim", 0) >= 1 and any(getattr(k, "key", None) == "layers" for k in path)
        return ocp.SaveArgs(shard_axes=(0,) if stacked else ())
    return jax.tree_util.tree_map_with_path(args, tree)


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
