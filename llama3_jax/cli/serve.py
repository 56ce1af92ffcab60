"""`llama3-jax serve`: the OpenAI-compatible HTTP server over the decoding engine (serve/openai/)."""

from __future__ import annotations

import argparse
import os

from .args import (add_cache_args, add_compile_cache_arg, add_distributed_args, add_engine_args,
                   fetch_checkpoint, use_compile_cache)

API_KEY_ENV = "LLAMA3_JAX_API_KEY"


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)",
                       description="An OpenAI-compatible HTTP server on the continuous-batching engine: "
                                   "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics. "
                                   "Runs until SIGTERM or Ctrl-C (requests in flight finish first).")
    add_engine_args(s, files=False)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind; another than loopback without an API key is warned about "
                        "(default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    s.add_argument("--api-key", default=None,
                   help=f"the key clients must send as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, "
                        "else none)")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name requests must give (default: the --checkpoint path as given)")
    s.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most rows (prompts x n) waiting for a decode slot; more get 429 with Retry-After "
                        "(default: %(default)s)")
    s.add_argument("--max-body-bytes", type=int, default=32 * 2**20, metavar="N",
                   help="largest request body; larger ones get 413 (default: %(default)s)")
    add_cache_args(s)
    add_compile_cache_arg(s)
    add_distributed_args(s)
    s.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.served_model_name is None:
        args.served_model_name = args.checkpoint
    use_compile_cache(args)
    fetch_checkpoint(args)
    from ..serve.openai.command import run_serve
    return run_serve(args)
