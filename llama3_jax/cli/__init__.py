"""`llama3-jax convert|train|generate|score`: parse, validate, call the modules that do the work.

Errors from bad input surface as one line on stderr and exit status 2; nothing else is printed
for them (no traceback), because users run these from scripts over many files. `generate` and
`score` exit with status 1 when every input line failed (bad, or too long for the context).
"""

from __future__ import annotations

import argparse
import sys


def _convert(args) -> None:
    from ..convert import convert
    options = {}
    if args.max_shard_size is not None:
        options["max_shard_size"] = args.max_shard_size
    if args.shards is not None:
        options["shards"] = args.shards
    if args.base is not None:
        options["base"] = args.base
    if args.mesh is not None:
        options["mesh"] = args.mesh
    if args.keep_adapters:
        options["keep_adapters"] = True
    if args.quantize is not None:
        options["quantize"] = args.quantize
    convert(args.src, args.dst, src_format=args.src_format, dst_format=args.dst_format, dtype=args.dtype,
            progress=not args.quiet, **options)


def _train(args) -> int:
    if not args.dry_run:
        if args.topology or args.num_slices != 1:
            raise ValueError("--topology and --num-slices need --dry-run")
        from ..train import run_train
        run_train(args.config, args.overrides)
        return 0
    from ..config_loader import load_yaml_config
    from ..train import TrainConfig
    from ..train.dryrun import DoesNotFit, dry_run
    try:
        dry_run(load_yaml_config(TrainConfig, args.config, list(args.overrides)), args.topology, args.num_slices)
    except DoesNotFit as e:
        print(f"llama3-jax train: does not fit: {e}", file=sys.stderr)
        return 3
    return 0


def _generate(args) -> int:
    from ..serve.offline import run_generate
    return 1 if run_generate(args)["all_failed"] else 0


def _score(args) -> int:
    from ..serve.offline import run_score
    return 1 if run_score(args)["all_failed"] else 0


DESCRIPTION = """\
Llama 3 (3, 3.1, 3.2, 3.3) in JAX: convert weights between Hugging Face, Meta and llama3-jax
checkpoints, train from a YAML config, and generate or score JSONL batches.
Bad input is reported as one line on stderr with exit status 2.

examples:
  llama3-jax convert --from hf --to jax ~/Meta-Llama-3.1-8B ckpt/llama3.1-8b
  llama3-jax train --config configs/tiny.yaml steps=500
  llama3-jax generate --checkpoint runs/tiny --input prompts.jsonl --output out.jsonl
"""

TRAIN_DESCRIPTION = """\
Train (or resume) the run described by a YAML config plus dotted key=value overrides, e.g.
  llama3-jax train --config configs/tiny.yaml data.path=my_docs.jsonl steps=500 optim.lr=1e-3
Rerunning the same command resumes from WORKDIR's latest checkpoint. SIGTERM or Ctrl-C saves a
checkpoint and stops (a second Ctrl-C stops at once). Keys: see configs/tiny.yaml and the README's
Training section; an unknown key is refused with the closest valid one.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama3-jax", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert weights between hf, meta and jax formats")
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
    _add_mesh_arg(c, "--to jax only: the arrays are placed and saved shard by shard on this mesh")
    c.add_argument("--keep-adapters", action="store_true",
                   help="--from peft --to jax only: keep the adapter as LoRA adapters on --base (a LoRA checkpoint "
                        "that generate/score read merged and `train lora.init_from=DST` trains on) instead of "
                        "merging it (default: merge)")
    _add_distributed_args(c)
    c.set_defaults(func=_convert)

    t = sub.add_parser("train", help="pretrain or fine-tune from a YAML config", description=TRAIN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default=None, help="YAML run config (e.g. configs/tiny.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    t.add_argument("--dry-run", action="store_true",
                   help="compile one train step for the configured mesh, report memory/FLOPs, allocate nothing "
                        "(exit 0 fits, 3 does not fit)")
    t.add_argument("--topology", default=None,
                   help="with --dry-run: compile for this TPU topology, e.g. v5e:4x4, v5p:8x8x8 (needs libtpu)")
    t.add_argument("--num-slices", type=int, default=1, help="with --topology: a multislice job of N slices")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="batched generation: JSONL prompts in, JSONL completions out",
                       description="Batched generation: JSONL prompts in, JSONL completions out (resumable). "
                                   "Exit status 1 when every input line failed, 2 on bad usage.")
    _add_engine_args(g)
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="most new tokens per prompt (default: until a stop token or the end of the model's "
                        "context)")
    g.add_argument("--num-shards", type=int, default=1, metavar="N",
                   help="split the input over N independent runs: this one takes every N-th line and writes "
                        "OUTPUT-0000I-of-0000N.jsonl; tools/merge_outputs.py joins them (default: %(default)s)")
    g.add_argument("--shard-index", type=int, default=0, metavar="I",
                   help="which of the N runs this is, 0..N-1 (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k best; 0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass; 1.0 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at stop tokens: generate --max-new-tokens tokens, or to the end of the "
                        "context (default: stop)")
    g.add_argument("--static-batching", action="store_true",
                   help="decode whole batches sorted by length, each until its longest row is done, instead of "
                        "refilling --batch-size slots as rows finish, for comparison (default: continuous)")
    g.add_argument("--num-samples", type=int, default=1,
                   help="completions per input line, each its own output line with a 'sample' index (default: 1; "
                        "a line's own 'n' overrides it)")
    g.add_argument("--kv-cache-dtype", choices=["bfloat16", "float32", "int8"], default=None,
                   help="KV cache storage; int8: one scale per (position, kv head), a quarter of float32's "
                        "memory (default: the compute dtype)")
    g.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill prompts longer than N tokens N at a time, padded to a multiple of N instead of "
                        "the next power of two: bounded activation memory for long prompts (default: one pass)")
    g.add_argument("--kv-pages", type=int, default=None, metavar="N",
                   help="a paged KV cache: N pages of --page-size slots shared by all rows, each row holding "
                        "ceil((prompt + max_new_tokens) / page size) pages while it runs (default: one "
                        "contiguous cache per batch)")
    g.add_argument("--page-size", type=int, default=64, metavar="P",
                   help="slots per KV page with --kv-pages (default: %(default)s)")
    g.add_argument("--paged-attention", choices=["auto", "blockwise", "ragged_paged"], default="auto",
                   help="how decode steps read the paged cache: ragged_paged = the TPU Pallas kernel "
                        "(jax.experimental.pallas.ops.tpu.ragged_paged_attention), blockwise = XLA's page gather; "
                        "auto: the kernel on TPU for a float cache (default: %(default)s)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("score", help="per-token log-probs of given completions",
                       description="Per-token log-probs of given completions: JSONL {id, prompt, completion} "
                                   "in, JSONL out (resumable). Exit status 1 when every input line failed, "
                                   "2 on bad usage.")
    _add_engine_args(s)
    s.set_defaults(func=_score)
    _add_distributed_args(g)
    _add_distributed_args(s)
    return p


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    """`train` takes the same as distributed.* keys; every process runs the same command line."""
    d = p.add_argument_group("several hosts (jax.distributed; detected by itself on Cloud TPU, SLURM, Open MPI, "
                             "Kubernetes)")
    d.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                   help="process 0's address (default: the cluster's, else one process)")
    d.add_argument("--num-processes", type=int, metavar="N", default=None,
                   help="processes in the job (default: the cluster's, else 1)")
    d.add_argument("--process-id", type=int, metavar="I", default=None,
                   help="this process's id, 0..N-1 (default: the cluster's, else 0)")


def _add_mesh_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help=f"{what}: the mesh of training's mesh.* keys and sharding rules, e.g. "
                        "data=1,fsdp=1,tensor=-1 (-1: the rest of the devices; axes not named: 1; also dcn_data, "
                        "dcn_fsdp) (default: the model split over each host's devices, tensor = local devices, "
                        "data = processes)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a jax checkpoint (convert --to jax, or a train workdir)")
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", required=True, help="output JSONL (appended; ids already there are skipped)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    p.add_argument("--read-lines", type=int, default=None, metavar="N",
                   help="read, check and run the input N lines at a time (on several processes process 0 reads "
                        "and sends each piece), so no host holds the whole input (default: 4096)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="compute dtype; float32 matches transformers' float32 logits (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model path (default: the one in llama-models)")
    _add_mesh_arg(p, "parameters, KV cache and batch rows")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights with one scale per output channel, made at load (a checkpoint from "
                        "convert --quantize int8 is int8 already) (default: the checkpoint's weights)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..parallel import distributed
    try:
        if args.command != "train":  # train starts it from its distributed.* keys
            distributed.initialize(distributed.DistributedConfig(
                args.coordinator_address, args.num_processes, args.process_id))
        if getattr(args, "checkpoint", None) is not None:  # generate, score
            from ..store.paths import is_remote, resolve
            args.checkpoint = resolve(args.checkpoint, "--checkpoint")  # file:///x -> /x
            if is_remote(args.checkpoint):  # gs://...: its latest complete step, into the cache (remote.py)
                from ..store.remote import fetch
                args.checkpoint = fetch(args.checkpoint, "--checkpoint")
        rc = args.func(args)
    except (ValueError, KeyError, OSError) as e:  # OSError: also a full disk or a read-only path
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{distributed.error_prefix()}llama3-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama3-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0  # generate/score: 1 when every line failed; train --dry-run: 3

