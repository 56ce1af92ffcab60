"""The conversion driver: reader -> (check, cast) -> writer, one tensor at a time, into a temp dir.

Every format has a reader (`.config`, `.dtype`, `.tensors()` yielding `Tensor`s in our layout, see
model/llama.py) and a writer (`add(name, layer, array)`, `finish()`). The driver picks them, the stream
(stream.py) checks each tensor's shape against the config and casts, and the temp directory is renamed
to DST only when everything succeeded, so a failure never leaves a half-written output (atomic.py).
The format modules know only tensors.py and atomic.py, never this file: the driver sits on top.

Several processes (jax.distributed running; every host runs the same command): every process reads,
in the same order. `--to jax` is written by all of them into one temp directory (named after process
0's pid), each saving its own shards (native.py); other formats are written by process 0 alone. Process
0 renames the temp directory once every process has finished writing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..parallel import distributed
from ..model.config import ModelConfig
from ..store.paths import filesystem, is_remote, local_path, resolve
from .atomic import main_owner, owner, remove_stale_temps, temp_dir
from .stream import Discard, stream
from .tensors import ConvertError, Tensor, all_keys, expected_shapes, parse_dtype, parse_size

__all__ = ["FORMATS", "WRITER_OPTIONS", "ConvertError", "Tensor", "all_keys", "check_options", "convert",
           "expected_shapes", "parse_dtype", "parse_size"]

FORMATS = ("hf", "meta", "jax", "peft")  # peft: LoRA adapters (convert/peft.py)

# format -> (module, reader, writer); peft's reader wraps a base reader (_open_reader), it has no writer
_IMPLS = {"hf": ("hf", "HFReader", "HFWriter"), "meta": ("meta", "MetaReader", "MetaWriter"),
          "jax": ("native", "JaxReader", "JaxWriter")}


def _impl(fmt: str, which: int):
    """Import a format's module only when used (meta needs torch; hf and jax do not)."""
    module = importlib.import_module(f".{_IMPLS[fmt][0]}", __package__)
    return getattr(module, _IMPLS[fmt][which])


def _reader(fmt: str, src: Path):
    return _impl(fmt, 1)(src)


def _writer(fmt: str, dst: Path, cfg: ModelConfig, dtype, options: dict, reader=None):
    """FMT's writer; an hf writer also gets the pad id SRC recorded (a reward model's config.json needs one)."""
    if fmt == "hf":
        options = options | {"pad_token_id": getattr(reader, "pad_token_id", None)}
    return _impl(fmt, 2)(dst, cfg, dtype, **options)


def _check_head(cfg: ModelConfig, src: Path, dst_format: str, options: dict) -> None:
    """A reward model (head "score") goes where its head has a place: hf (LlamaForSequenceClassification)
    and jax. Meta's format has no such head, and int8 is for generating with an output layer
    (config.py refuses it too, but only after every tensor was read): one line, before anything is read."""
    if cfg.head != "score":
        return
    if dst_format == "meta":
        raise ConvertError(f"{src}: a reward model (head score): Meta's format has no score head; "
                           f"use --to hf (LlamaForSequenceClassification) or --to jax")
    if options.get("quantize") is not None:
        raise ConvertError(f"{src}: a reward model (head score): --quantize {options['quantize']} is for "
                           f"language models (generate); convert it without --quantize")


def _open_reader(src_format: str, src: Path, base: str | None):
    """SRC's reader; a peft adapter's is the base model's reader (built here) with the adapter merged."""
    if src_format != "peft":
        return _reader(src_format, src)
    from . import peft
    base = peft.base_dir(base)
    return peft.PeftReader(src, _reader(peft.base_format(base), base))


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


def convert(src: str | Path, dst: str | Path, *, src_format: str, dst_format: str, dtype: str | None = None,
            progress: bool = True, **options) -> ModelConfig:
    """Convert a checkpoint between `hf`, `meta` and `jax`; keeps the source dtype unless `dtype` is given.

    Options go to the writer: `max_shard_size` (hf), `shards` (meta model-parallel files), `mesh` (jax:
    "data=1,fsdp=1,tensor=-1", default sharding.inference_mesh's), `quantize` ("int8", jax: int8 matrices +
    scales for generate/score, quant.py); `base` (the model a `peft` adapter is
    merged into) to the reader; `keep_adapters` (with `base`): a `peft` adapter becomes a LoRA checkpoint
    instead (convert/peft.py). `--to peft` writes a LoRA workdir's adapters, as adapters on the
    transformers model its base was converted from (the `source` that `--from hf --to jax` records in
    config.json), or on `base_model_name`.
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
    distributed.sync("llama3_jax_convert_stage")
    cfg = _convert(src, stage, src_format=src_format, dst_format=dst_format, dtype=dtype, progress=progress,
                   **options)
    if distributed.process_index() == 0:
        remote.upload(stage, dst, "DST")
        shutil.rmtree(stage, ignore_errors=True)
        if progress:
            print(f"uploaded {dst}", file=sys.stderr)
    distributed.sync("llama3_jax_convert_uploaded")  # every process returns once DST is complete
    return cfg


def _convert(src: str | Path, dst: str | Path, *, src_format: str, dst_format: str, dtype: str | None = None,
             progress: bool = True, **options) -> ModelConfig:
    """`convert` between local paths: check the request, then either the adapters alone (no tensor
    stream) or every tensor from SRC's reader into the output format's writer."""
    src, dst = Path(local_path(src, "SRC")), Path(local_path(dst, "DST"))  # file:///x -> /x
    base_name = options.pop("base_model_name", None)  # --to peft's, not a writer's option
    if base_name is not None and dst_format != "peft":
        raise ConvertError(f"--base-model-name applies only to --to peft, not --to {dst_format}")
    base, keep_adapters, options = _check_request(src, dst, src_format, dst_format, options)
    if keep_adapters or dst_format == "peft":
        return _convert_adapters(src, dst, src_format, base, keep_adapters, dtype, progress, base_name)
    out_dtype = parse_dtype(dtype)
    reader = _open_reader(src_format, src, base)
    out_dtype = out_dtype or reader.dtype
    cfg = dataclasses.replace(reader.config, param_dtype=out_dtype.name)
    _check_head(cfg, src, dst_format, options)
    progress = progress and distributed.process_index() == 0
    nbytes, secs = _write(reader, cfg, out_dtype, src, dst, dst_format, options, progress)
    if progress:
        print(f"converted {src} ({src_format}) -> {dst} ({dst_format}): {len(all_keys(cfg))} tensors, "
              f"{nbytes / 1e6:.1f} MB read in {secs:.1f}s ({nbytes / 1e6 / max(secs, 1e-9):.1f} MB/s), "
              f"dtype {out_dtype.name}", file=sys.stderr)
    return cfg


def _check_request(src: Path, dst: Path, src_format: str, dst_format: str,
                   options: dict) -> tuple[str | None, bool, dict]:
    """Refuse a request that cannot run, before anything is read: unknown formats, options of another
    format, a missing SRC, an existing DST. Returns (`base`, `keep_adapters`, the writer's options)."""
    for fmt in (src_format, dst_format):
        if fmt not in FORMATS:
            raise ConvertError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    options = dict(options)
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
    if distributed.process_count() > 1 and (dst_format == "peft" or keep_adapters):
        raise ConvertError("--to peft and --keep-adapters run in one process")
    return base, keep_adapters, options


def _convert_adapters(src: Path, dst: Path, src_format: str, base: str | None, keep_adapters: bool,
                      dtype: str | None, progress: bool, base_name: str | None = None) -> ModelConfig:
    """The two conversions of LoRA adapters that are not a model: `--keep-adapters` (a LoRA checkpoint:
    the adapters + the base's path; a transformers base is converted beside them by `convert` itself)
    and `--to peft` (a LoRA workdir's adapters exported)."""
    if not keep_adapters and src_format != "jax":
        raise ConvertError("--to peft exports a LoRA workdir: use --from jax")
    from . import peft
    if keep_adapters:
        convert_base = functools.partial(convert, src_format="hf", dst_format="jax", dtype=dtype, progress=progress)
        return peft.import_adapters(src, dst, base, progress, convert_base)
    peft.export_peft(src, dst, base_name)
    return _reader("jax", src).config


def _write(reader, cfg: ModelConfig, out_dtype: np.dtype, src: Path, dst: Path, dst_format: str,
           options: dict, progress: bool) -> tuple[int, float]:
    """The tensor stream into a temp directory beside DST, renamed to DST once every process has
    written its part (deleted on any failure); (bytes read, seconds taken)."""
    rank, several = distributed.process_index(), distributed.process_count() > 1
    tmp = temp_dir(dst, main_owner() if several else owner())
    if rank == 0:
        remove_stale_temps(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
    distributed.sync("llama3_jax_convert_start")  # nobody writes into tmp before process 0 has cleared it
    start = time.time()
    try:
        # orbax: every process saves its own shards; the other formats: process 0 writes alone
        writer = (_writer(dst_format, tmp, cfg, out_dtype, options, reader) if rank == 0 or dst_format == "jax"
                  else Discard())
        nbytes = stream(reader, writer, cfg, out_dtype, src, progress, start)
        distributed.sync("llama3_jax_convert_written")
        if rank == 0:
            _record_source(reader, tmp, dst_format)
            os.replace(tmp, dst)
        distributed.sync("llama3_jax_convert_renamed")  # every process returns once DST exists
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress:
            sys.stderr.write("\n")
    return nbytes, time.time() - start


def _record_source(reader, out: Path, dst_format: str) -> None:
    """`--to jax` from a reader that knows where its model came from (hf.HFReader.source): that goes
    into the new checkpoint's config.json as `source`, before the rename, so it appears with DST. A
    `--to peft` export of a LoRA trained on DST names it as the adapter's base (peft.py); `--to hf`
    writes back its `pad_token_id` (a reward model's, hf.py)."""
    source = getattr(reader, "source", None)
    if dst_format != "jax" or not source:
        return
    from ..model.config import read_json
    from ..store.checkpoint import CONFIG_FILE, write_json_atomic
    path = out / CONFIG_FILE
    write_json_atomic(path, read_json(path, "a llama3-jax checkpoint", ConvertError) | {"source": source})
