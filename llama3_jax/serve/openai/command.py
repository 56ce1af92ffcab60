"""The `serve` command behind cli/serve.py: check the flags, build the engine's loader, run the server."""

from __future__ import annotations

import sys
from pathlib import Path

from ...parallel.distributed import process_count

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check(args) -> None:
    """Refuse what cannot work before anything binds or loads (ValueError, one line); warn when a
    non-loopback address is bound without a key (anyone who reaches it can use the model)."""
    if process_count() > 1:
        raise ValueError("serve runs in one process (several devices: --mesh); serving across processes is not "
                         "built yet: run one server per host")
    for name, v, lo in (("--batch-size", args.batch_size, 1), ("--max-queue", args.max_queue, 0),
                        ("--max-body-bytes", args.max_body_bytes, 1), ("--port", args.port, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"llama3-jax serve: warning: binding {args.host} without an API key: anyone who can reach this "
              f"address can use the model (set --api-key or $LLAMA3_JAX_API_KEY)", file=sys.stderr, flush=True)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint not found: {args.checkpoint}")


def run_serve(args) -> int:
    check(args)
    from .server import Settings, serve

    def load():
        from ...parallel.sharding import inference_mesh, parse_mesh
        from ..engine import Generator
        from ..reward import NO_OUTPUT_LAYER, is_reward_model
        if is_reward_model(args.checkpoint):
            raise ValueError(NO_OUTPUT_LAYER)
        return Generator(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer,
                         mesh=inference_mesh(parse_mesh(args.mesh)), quantize=args.quantize,
                         kv_cache_dtype=args.kv_cache_dtype, prefill_chunk=args.prefill_chunk,
                         kv_pages=args.kv_pages, page_size=args.page_size, paged_attention=args.paged_attention)

    return serve(Settings(host=args.host, port=args.port, model_name=args.served_model_name, api_key=args.api_key,
                          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, batch_size=args.batch_size,
                          load=load))
