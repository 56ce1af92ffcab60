"""`llama3-jax generate` and `llama3-jax score`: JSONL batches through the decoding engine
(serve/offline.py). Both exit with status 1 when every input line failed."""

from __future__ import annotations

import argparse

from .args import (add_cache_args, add_compile_cache_arg, add_distributed_args, add_engine_args,
                   fetch_checkpoint, use_compile_cache)


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
    add_cache_args(g)
    add_compile_cache_arg(g)
    add_distributed_args(g)
    g.set_defaults(func=run_generate)

    s = sub.add_parser("score", help="per-token log-probs of given completions",
                       description="Per-token log-probs of given completions: JSONL {id, prompt, completion} "
                                   "in, JSONL out (resumable). Exit status 1 when every input line failed, "
                                   "2 on bad usage.")
    add_engine_args(s)
    add_compile_cache_arg(s)
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


def run_generate(args: argparse.Namespace) -> int:
    use_compile_cache(args)
    fetch_checkpoint(args)
    from ..serve.offline import run_generate
    return 1 if run_generate(args)["all_failed"] else 0


def run_score(args: argparse.Namespace) -> int:
    use_compile_cache(args)
    fetch_checkpoint(args)
    from ..serve.offline import run_score
    return 1 if run_score(args)["all_failed"] else 0
