"""`llama3-jax convert`: weights between hf, meta and jax formats, and PEFT LoRA adapters (convert/)."""

from __future__ import annotations

import argparse

from .args import add_distributed_args, add_mesh_arg

# flags handed to convert() as options when given, in this order (the first that does not fit the
# output format is the one its error names)
OPTIONS = ("max_shard_size", "shards", "base", "mesh", "keep_adapters", "quantize", "base_model_name")


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert weights between hf, meta and jax formats, and peft (LoRA adapters)")
    c.add_argument("--from", dest="src_format", required=True, choices=["hf", "meta", "jax", "peft"])
    c.add_argument("--to", dest="dst_format", required=True, choices=["hf", "meta", "jax", "peft"])
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="output dtype (default: keep the source dtype)")
    c.add_argument("--max-shard-size", default=None,
                   help="hf output only: largest safetensors file, in bytes or with a unit as transformers "
                        "reads it: 5GB, 500MB, 5GiB (default: 5GB)")
    c.add_argument("--shards", type=int, default=None, help="meta output only: model-parallel files (default: 1)")
    c.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")
    c.add_argument("--quantize", choices=["int8"], default=None,
                   help="--to jax only: store int8 matrices + per-output-channel scales, for generate/score "
                        "(default: float)")
    c.add_argument("--base", default=None,
                   help="--from peft only: the hf or jax model the adapter is merged into (default: none; "
                        "needed with --from peft)")
    add_mesh_arg(c, "--to jax only: the arrays are placed and saved shard by shard on this mesh")
    c.add_argument("--keep-adapters", action="store_true",
                   help="--from peft --to jax only: keep the adapter as LoRA adapters on --base (a LoRA checkpoint "
                        "that generate/score read merged and `train lora.init_from=DST` trains on) instead of "
                        "merging it (default: merge)")
    c.add_argument("--base-model-name", default=None, metavar="NAME",
                   help="--to peft only: the adapter's base_model_name_or_path, the transformers model (hub name or "
                        "directory) it loads onto (default: the one the LoRA base was converted from with "
                        "`convert --from hf`)")
    add_distributed_args(c)
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..convert import convert
    given = {key: getattr(args, key) for key in OPTIONS}
    options = {key: value for key, value in given.items() if value is not None and value is not False}
    convert(args.src, args.dst, src_format=args.src_format, dst_format=args.dst_format, dtype=args.dtype,
            progress=not args.quiet, **options)
