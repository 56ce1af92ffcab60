"""The conversion driver: reader -> (check, cast) -> writer, one tensor at a time, into a temp dir.

Every format has a reader (`.config`, `.dtype`, `.tensors()` yielding `Tensor`s in our layout, see
model.py) and a writer (`add(name, layer, array)`, `finish()`). The driver checks each tensor's shape
against the config, casts, and renames the temp directory to DST only when everything succeeded, so a
failure never leaves a half-written output.

Several processes (jax.distributed running; every host runs the same command): every process reads,
in the same order. `--to jax` is written by all of them into one temp directory (named after process
0's pid), each saving its own shards (native.py); other formats are written by process 0 alone. Process
0 renames the temp directory once every process has finished writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..parallel import distributed
from ..model.config import ModelConfig
from ..failpoints import kill_point
from ..store.paths import filesystem, is_remote, local_path, resolve

FORMATS = ("hf", "meta", "jax", "peft")  # peft: LoRA adapters (convert/peft.py)


class ConvertError(ValueError):
    """Bad input: the message names the file and tensor at fault."""


class Tensor(NamedTuple):
    name: str          # our name, e.g. "layers/wq"
    layer: int | None  # layer index for "layers/*"
    array: np.ndarray  # in our layout (model.py), one layer's slice for stacked weights
    origin: str        # "file:tensor" in the source, for error messages


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our layout's shape per name (per layer for stacked weights)."""
    D, H, KV, K, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "embed": (V, D), "norm": (D,),
        "layers/attn_norm": (D,), "layers/mlp_norm": (D,),
        "layers/wq": (D, H, K), "layers/wk": (D, KV, K), "layers/wv": (D, KV, K), "layers/wo": (H, K, D),
        "layers/w_gate": (D, F), "layers/w_up": (D, F), "layers/w_down": (F, D),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def all_keys(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    keys = []
    for name in expected_shapes(cfg):
        if name.startswith("layers/"):
            keys += [(name, i) for i in range(cfg.n_layers)]
        else:
            keys.append((name, None))
    return keys


def parse_dtype(name: str | None):
    if name is None:
        return None
    import ml_dtypes
    table = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
             "float16": np.float16, "fp16": np.float16}
    if name not in table:
        raise ConvertError(f"unknown dtype {name!r} (choose from float32, bfloat16, float16)")
    return np.dtype(table[name])


_IMPLS = {"hf": ("hf", "HFReader", "HFWriter"), "meta": ("meta", "MetaReader", "MetaWriter"),
          "jax": ("native", "JaxReader", "JaxWriter"), "peft": ("peft", "PeftReader", None)}


def _impl(fmt: str, which: int):
    """Import a format's module only when used (meta needs torch; hf and jax do not)."""
    module = importlib.import_module(f".{_IMPLS[fmt][0]}", __package__)
    return getattr(module, _IMPLS[fmt][which])


def _reader(fmt: str, src: Path):
    return _impl(fmt, 1)(src)


def _writer(fmt: str, dst: Path, cfg: ModelConfig, dtype, options: dict):
    return _impl(fmt, 2)(dst, cfg, dtype, **options)


# writer options per output format; each is also a CLI flag (max_shard_size -> --max-shard-size)
WRITER_OPTIONS = {"hf": ("max_shard_size",), "meta": ("shards",), "jax": ("mesh", "quantize")}


def check_options(dst_format: str, options: dict) -> dict:
    """Refuse options that do not apply to the output format (one line naming the flag); parse sizes."""
    for key in options:
        flag = "--" + key.replace("_", "-")
        fits = [fmt for fmt, keys in WRITER_OPTIONS.items() if key in keys]
        if not fits:
            raise ConvertError(f"unknown option {key!r}")
        if dst_format not in fits:
            raise ConvertError(f"{flag} applies only to --to {' or '.join(fits)} output, not --to {dst_format}")
    options = dict(options)
    if options.get("quantize") not in (None, "int8"):
        raise ConvertError(f"--quantize {options['quantize']!r}: expected int8")
    if "max_shard_size" in options:
        options["max_shard_size"] = parse_size(options["max_shard_size"], "--max-shard-size")
    return options


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)(b))?\s*", re.IGNORECASE)


def parse_size(text: str | int, flag: str) -> int:
    """A byte count as transformers' `max_shard_size` reads it: an integer (bytes), or a number with a
    unit: KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); as in transformers, a
    lowercase final b without the i ("5Gb", "500mb") counts bits."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise ConvertError(f"{flag} {text!r}: not a size (give bytes, or a number with a unit: "
                               f"5GB, 500MB, 5GiB)")
        number, prefix, binary, b = m.groups()
        n = float(number) if "." in number else int(number)
        if prefix:
            power = "kmgt".index(prefix.lower()) + 1
            n = n * (1024 ** power if binary else 1000 ** power)
            if b == "b" and not binary:
                n = n / 8
        n = int(n)
    if n < 1:
        raise ConvertError(f"{flag} {text!r}: must be at least 1 byte")
    return n


def convert(src: str | Path, dst: str | Path, *, src_format: str, dst_format: str, dtype: str | None = None,
            progress: bool = True, **options) -> ModelConfig:
    """Convert a checkpoint between `hf`, `meta` and `jax`; keeps the source dtype unless `dtype` is given.

    Options go to the writer: `max_shard_size` (hf), `shards` (meta model-parallel files), `mesh` (jax:
    "data=1,fsdp=1,tensor=-1", default sharding.inference_mesh's), `quantize` ("int8", jax: int8 matrices +
    scales for generate/score, quant.py); `base` (the model a `peft` adapter is
    merged into) to the reader; `keep_adapters` (with `base`): a `peft` adapter becomes a LoRA checkpoint
    instead (convert/peft.py). `--to peft` writes a LoRA workdir's adapters.
    Returns the model config. Raises ConvertError (one line, naming file and tensor) on bad input.

    SRC, DST and `base` may be URLs (gs://...: remote.py): a remote SRC or base is fetched into the
    cache first; a remote DST is written to a local staging directory as a local one is, then uploaded
    by process 0, config.json (params.json) last, so a reader never takes a half-uploaded DST.
    """
    src, dst = resolve(src, "SRC"), resolve(dst, "DST")
    from ..store import remote
    if is_remote(src):
        src = remote.fetch(src, "SRC")
    if is_remote(options.get("base")):
        options["base"] = remote.fetch(options["base"], "--base")
    if not is_remote(dst):
        return _convert(src, dst, src_format=src_format, dst_format=dst_format, dtype=dtype, progress=progress,
                        **options)
    fs, root = filesystem(dst, "DST")
    if fs.exists(root):
        raise ConvertError(f"{dst}: already exists (refusing to overwrite)")
    stage = remote.staging_dir(dst, "DST")
    if distributed.process_index() == 0:
        shutil.rmtree(stage, ignore_errors=True)  # a staged copy an earlier, failed upload left
    _sync("llama3_jax_convert_stage")
    cfg = _convert(src, stage, src_format=src_format, dst_format=dst_format, dtype=dtype, progress=progress,
                   **options)
    if distributed.process_index() == 0:
        remote.upload(stage, dst, "DST")
        shutil.rmtree(stage, ignore_errors=True)
        if progress:
            print(f"uploaded {dst}", file=sys.stderr)
    _sync("llama3_jax_convert_uploaded")  # every process returns once DST is complete
    return cfg


def _convert(src: str | Path, dst: str | Path, *, src_format: str, dst_format: str, dtype: str | None = None,
             progress: bool = True, **options) -> ModelConfig:
    """`convert` between local paths."""
    src, dst = Path(local_path(src, "SRC")), Path(local_path(dst, "DST"))  # file:///x -> /x
    for fmt in (src_format, dst_format):
        if fmt not in FORMATS:
            raise ConvertError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    base = local_path(options.pop("base", None), "--base")  # the reader's option (--from peft), not a writer's
    if base is not None and src_format != "peft":
        raise ConvertError(f"--base applies only to --from peft, not --from {src_format}")
    keep_adapters = options.pop("keep_adapters", False)
    if keep_adapters and (src_format, dst_format) != ("peft", "jax"):
        raise ConvertError("--keep-adapters applies only to --from peft --to jax")
    options = check_options(dst_format, options)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    if dst.exists():
        raise ConvertError(f"{dst}: already exists (refusing to overwrite)")
    rank, several = distributed.process_index(), distributed.process_count() > 1
    if several and (dst_format == "peft" or keep_adapters):
        raise ConvertError("--to peft and --keep-adapters run in one process")
    if keep_adapters:  # a LoRA checkpoint (adapters + the base's path), not a merged model
        from .peft import import_adapters
        return import_adapters(src, dst, base, dtype, progress)
    if dst_format == "peft":  # the adapters alone, not a model: no tensor stream
        if src_format != "jax":
            raise ConvertError("--to peft exports a LoRA workdir: use --from jax")
        from .peft import export_peft
        export_peft(src, dst)
        return _impl("jax", 1)(src).config
    out_dtype = parse_dtype(dtype)
    reader = _impl("peft", 1)(src, base) if src_format == "peft" else _reader(src_format, src)
    cfg = reader.config
    out_dtype = out_dtype or reader.dtype
    cfg = dataclasses.replace(cfg, param_dtype=out_dtype.name)
    shapes = expected_shapes(cfg)
    keys = set(all_keys(cfg))
    progress = progress and rank == 0
    tmp = dst.parent / f".{dst.name}.tmp-{_main_pid() if several else os.getpid()}"
    if rank == 0:
        _remove_stale_temps(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
    _sync("llama3_jax_convert_start")  # nobody writes into tmp before process 0 has cleared it
    start, done_bytes, last = time.time(), 0, 0.0
    try:
        # orbax: every process saves its own shards; the other formats: process 0 writes alone
        writer = _writer(dst_format, tmp, cfg, out_dtype, options) if rank == 0 or dst_format == "jax" else _Discard()
        seen = set()
        for i, t in enumerate(reader.tensors()):
            key = (t.name, t.layer)
            if key not in keys:
                raise ConvertError(f"{t.origin}: unexpected tensor for this config")
            if key in seen:
                raise ConvertError(f"{t.origin}: duplicate tensor")
            if tuple(t.array.shape) != shapes[t.name]:
                raise ConvertError(f"{t.origin}: shape {tuple(t.array.shape)} does not match the config "
                                   f"(expected {shapes[t.name]} in llama3-jax layout)")
            seen.add(key)
            # a writer that reads slices casts them itself: a memory-mapped tensor is then read only there
            writer.add(t.name, t.layer, t.array if getattr(writer, "reads_slices", False)
                       else t.array.astype(out_dtype, copy=False))
            kill_point("convert.tensor")
            done_bytes += t.array.nbytes
            if progress and (time.time() - last >= 0.5 or len(seen) == len(keys)):
                last = time.time()
                _progress(len(seen), len(keys), done_bytes, start)
        missing = sorted(keys - seen, key=str)
        if missing:
            name, layer = missing[0]
            raise ConvertError(f"{src}: missing tensor {name}" + (f" of layer {layer}" if layer is not None else ""))
        writer.finish()
        kill_point("convert.finish")
        _sync("llama3_jax_convert_written")
        if rank == 0:
            os.replace(tmp, dst)
        _sync("llama3_jax_convert_renamed")  # every process returns once DST exists
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress:
            sys.stderr.write("\n")
    if progress:
        secs = time.time() - start
        print(f"converted {src} ({src_format}) -> {dst} ({dst_format}): {len(keys)} tensors, "
              f"{done_bytes / 1e6:.1f} MB read in {secs:.1f}s ({done_bytes / 1e6 / max(secs, 1e-9):.1f} MB/s), "
              f"dtype {out_dtype.name}", file=sys.stderr)
    return cfg


class _Discard:
    """The writer of processes other than 0 when process 0 writes the output alone."""

    reads_slices = True

    def add(self, name: str, layer: int | None, array: np.ndarray) -> None:
        pass

    def finish(self) -> None:
        pass


def _sync(name: str) -> None:
    """Every process waits here for the others (several processes only)."""
    if distributed.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _main_pid() -> int:
    """Process 0's pid, on every process: the temp directory they all write into is named after it."""
    from ..parallel.multihost_io import on_main
    return on_main(os.getpid)


@contextlib.contextmanager
def atomic_dir(dst: Path):
    """A temp directory beside `dst` for one process to write into: renamed to `dst` when the block
    ends without error, deleted when it fails, so `dst` appears whole or not at all (the `--to peft`
    export and `--keep-adapters` import; `convert` itself does the same across processes)."""
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    _remove_stale_temps(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temps(dst: Path) -> None:
    """Delete the temp directories of earlier conversions to DST whose process is gone (killed before
    its rename), so a crash leaves no litter after the next run. A live writer's temp is left alone."""
    for old in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _progress(n: int, total: int, nbytes: int, start: float) -> None:
    secs = time.time() - start
    rate = nbytes / 1e6 / max(secs, 1e-9)
    eta = secs / n * (total - n) if n else 0
    bar = "#" * int(30 * n / total)
    sys.stderr.write(f"\rconvert [{bar:<30}] {n}/{total} tensors {rate:.1f} MB/s ETA {eta:.0f}s")
    sys.stderr.flush()
