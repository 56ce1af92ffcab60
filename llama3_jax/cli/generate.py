"""`llama3-jax generate` and `llama3-jax score`: JSONL batches through the decoding engine
(serve/offline.py). Both exit with status 1 when every input line failed."""

from __future__ import annotations

import argparse

from .args import add_distributed_args, add_engine_args


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="batched generation: JSONL prompts in, JSONL completions out",
                       description="Batched generation: JSONL prompts in, JSONL completions out (resumable). "
                                   "Exit status 1 when every input line failed, 2 on bad usage.")
    add_engine_args(g)
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="most new tokens per prompt (default: until a stop token or the end of the model's "
                        "context)")
    g.add_argument("--num-shards", type=int, default=1, metavar="N",
                   help="split the input over N independent runs: this one takes every N-th line and writes "
                        "OUTPUT-0000I-of-0000N.jsonl; tools/merge_outputs.py joins them (default: %(default)s)")
    g.add_argument("--shard-index", type=int, default=0, metavar="I",
                   help="which of the N runs this is, 0..N-1 (default: %(default)s)")
    _add_sampling_args(g)
    _add_cache_args(g)
    add_distributed_args(g)
    g.set_defaults(func=run_generate)

    s = sub.add_parser("score", help="per-token log-probs of given completions",
                       description="Per-token log-probs of given completions: JSONL {id, prompt, completion} "
                                   "in, JSONL out (resumable). Exit status 1 when every input line failed, "
                                   "2 on bad usage.")
    add_engine_args(s)
    add_distributed_args(s)
    s.set_defaults(func=run_score)


def _add_sampling_args(g: argparse.ArgumentParser) -> None:
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


def _add_cache_args(g: argparse.ArgumentParser) -> None:
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


def run_generate(args: argparse.Namespace) -> int:
    _fetch_checkpoint(args)
    from ..serve.offline import run_generate
    return 1 if run_generate(args)["all_failed"] else 0


def run_score(args: argparse.Namespace) -> int:
    _fetch_checkpoint(args)
    from ..serve.offline import run_score
    return 1 if run_score(args)["all_failed"] else 0


def _fetch_checkpoint(args: argparse.Namespace) -> None:
    """--checkpoint as a local path: file:///x -> /x; gs://...: its latest complete step, fetched into
    the cache (store/remote.py). (An HF or Meta directory is read as one: serve/restore.py.)"""
    from ..store.paths import is_remote, resolve
    args.checkpoint = resolve(args.checkpoint, "--checkpoint")
    if is_remote(args.checkpoint):
        from ..store.remote import fetch
        args.checkpoint = fetch(args.checkpoint, "--checkpoint")
