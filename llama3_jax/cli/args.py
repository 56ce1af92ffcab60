"""Argument groups that several commands share, defined once so their flags, defaults and help read
the same everywhere: the jax.distributed flags, the mesh flag, and the engine flags of generate/score/serve."""

from __future__ import annotations

import argparse


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """`train` takes the same as distributed.* keys; every process runs the same command line."""
    d = p.add_argument_group("several hosts (jax.distributed; detected by itself on Cloud TPU, SLURM, Open MPI, "
                             "Kubernetes)")
    d.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                   help="process 0's address (default: the cluster's, else one process)")
    d.add_argument("--num-processes", type=int, metavar="N", default=None,
                   help="processes in the job (default: the cluster's, else 1)")
    d.add_argument("--process-id", type=int, metavar="I", default=None,
                   help="this process's id, 0..N-1 (default: the cluster's, else 0)")


def add_mesh_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--mesh, in training's mesh.* terms; `what` says what this command places on it."""
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help=f"{what}: the mesh of training's mesh.* keys and sharding rules, e.g. "
                        "data=1,fsdp=1,tensor=-1 (-1: the rest of the devices; axes not named: 1; also dcn_data, "
                        "dcn_fsdp) (default: the model split over each host's devices, tensor = local devices, "
                        "data = processes)")


def add_engine_args(p: argparse.ArgumentParser, files: bool = True) -> None:
    """What every command that runs the decoding engine takes: generate and score (`files`: their JSONL
    input and output), serve."""
    p.add_argument("--checkpoint", required=True, help="a jax checkpoint (convert --to jax, or a train workdir), or an HF or Meta directory read as one")
    if files:
        p.add_argument("--input", required=True, help="input JSONL")
        p.add_argument("--output", required=True, help="output JSONL (appended; ids already there are skipped)")
    p.add_argument("--batch-size", type=int, default=8,
                   help=f"{'sequences per batch' if files else 'decode slots: rows decoded together'} "
                        "(default: %(default)s)")
    if files:
        p.add_argument("--read-lines", type=int, default=None, metavar="N",
                       help="read, check and run the input N lines at a time (on several processes process 0 "
                            "reads and sends each piece), so no host holds the whole input (default: 4096)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="compute dtype; float32 matches transformers' float32 logits (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model path (default: the one the checkpoint records, else llama-models' Llama 3)")
    add_mesh_arg(p, "parameters, KV cache and batch rows")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights with one scale per output channel, made at load (a checkpoint from "
                        "convert --quantize int8 is int8 already) (default: the checkpoint's weights)")


def add_cache_args(g: argparse.ArgumentParser) -> None:
    """The KV cache flags of the continuous-batching engine (generate, serve)."""
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


def add_compile_cache_arg(p: argparse.ArgumentParser) -> None:
    """--compile-cache: where compiled programs are kept between runs (parallel/compile_cache.py)."""
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled XLA programs in DIR, so the next run reads them instead of compiling; "
                        "'none' = off (default: $JAX_COMPILATION_CACHE_DIR, else $LLAMA3_JAX_COMPILE_CACHE, else "
                        "$XDG_CACHE_HOME/llama3-jax/xla, i.e. ~/.cache/llama3-jax/xla)")


def use_compile_cache(args: argparse.Namespace) -> None:
    """Before the first compile: JAX's persistent cache at --compile-cache (or its default)."""
    from ..parallel.compile_cache import enable
    enable(getattr(args, "compile_cache", None))


def fetch_checkpoint(args: argparse.Namespace) -> None:
    """--checkpoint as a local path: file:///x -> /x; gs://...: its latest complete step, fetched into
    the cache (store/remote.py). (An HF or Meta directory is read as one: serve/restore.py.)"""
    from ..store.paths import is_remote, resolve
    args.checkpoint = resolve(args.checkpoint, "--checkpoint")
    if is_remote(args.checkpoint):
        from ..store.remote import fetch
        args.checkpoint = fetch(args.checkpoint, "--checkpoint")
