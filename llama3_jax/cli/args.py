"""Argument groups that several commands share, defined once so their flags, defaults and help read
the same everywhere: the jax.distributed flags, the mesh flag, and the engine flags of generate/score."""

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


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """What every command that runs the decoding engine over a JSONL file takes (generate, score)."""
    p.add_argument("--checkpoint", required=True, help="a jax checkpoint (convert --to jax, or a train workdir), or an HF or Meta directory read as one")
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", required=True, help="output JSONL (appended; ids already there are skipped)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    p.add_argument("--read-lines", type=int, default=None, metavar="N",
                   help="read, check and run the input N lines at a time (on several processes process 0 reads "
                        "and sends each piece), so no host holds the whole input (default: 4096)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="compute dtype; float32 matches transformers' float32 logits (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model path (default: the one the checkpoint records, else llama-models' Llama 3)")
    add_mesh_arg(p, "parameters, KV cache and batch rows")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights with one scale per output channel, made at load (a checkpoint from "
                        "convert --quantize int8 is int8 already) (default: the checkpoint's weights)")
