"""`llama3-jax convert|train|generate|score|serve|rejection-sample`: parse, validate, call the modules that do
the work.

One file per command (convert.py, train.py, generate.py for generate and score, serve.py, rejection_sample.py),
each adding its subparser and the function it runs over the packages below; args.py holds the argument groups several
commands share. A new command is a new file here with an `add_parser(sub)` that sets `func`, named
in COMMANDS (whose order is the order of `--help`).

Errors from bad input surface as one line on stderr and exit status 2; nothing else is printed
for them (no traceback), because users run these from scripts over many files. `generate`,
`score` and `rejection-sample` exit with status 1 when every input line failed (bad, or too long for
the context).
"""

from __future__ import annotations

import argparse
import sys

from . import convert, generate, rejection_sample, serve, train

COMMANDS = (convert, train, generate, serve, rejection_sample)

DESCRIPTION = """\
Llama 3 (3, 3.1, 3.2, 3.3) in JAX: convert weights between Hugging Face, Meta and llama3-jax
checkpoints and PEFT LoRA adapters, train from a YAML config, generate or score JSONL batches, serve
an OpenAI-compatible HTTP API, and rejection-sample best-of-N SFT data.
Bad input is reported as one line on stderr with exit status 2.

examples:
  llama3-jax convert --from hf --to jax ~/Meta-Llama-3.1-8B ckpt/llama3.1-8b
  llama3-jax train --config configs/tiny.yaml steps=500
  llama3-jax generate --checkpoint runs/tiny --input prompts.jsonl --output out.jsonl
  llama3-jax serve --checkpoint runs/tiny --port 8000
  llama3-jax rejection-sample --policy runs/sft --reward-model runs/rm --input prompts.jsonl \
      --output best.jsonl --num-samples 8
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama3-jax", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..parallel import distributed
    try:
        if hasattr(args, "coordinator_address"):  # all but train, which starts it from its distributed.* keys
            distributed.initialize(distributed.DistributedConfig(
                args.coordinator_address, args.num_processes, args.process_id))
        rc = args.func(args)
    except (ValueError, KeyError, OSError) as e:  # OSError: also a full disk or a read-only path
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{distributed.error_prefix()}llama3-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama3-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0  # generate/score: 1 when every line failed; train --dry-run: 3
