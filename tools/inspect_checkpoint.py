"""Print what a llama3-jax checkpoint holds: config, steps, items, and every parameter's shape/dtype.

    .venv/bin/python tools/inspect_checkpoint.py ckpt/llama3.1-8b        (or a train workdir)

Reads only metadata (config.json and orbax's array metadata): safe on a 405B checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orbax.checkpoint as ocp

from llama3_jax.store import checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--step", type=int, default=None, help="default: the latest")
    args = ap.parse_args()
    try:
        cfg = checkpoint.load_config(args.directory)
    except (FileNotFoundError, ValueError) as e:
        print(f"inspect_checkpoint: error: {e}", file=sys.stderr)
        return 2
    with checkpoint.manager(args.directory, read_only=True) as m:
        steps = list(m.all_steps())
        step = args.step if args.step is not None else m.latest_step()
        if step not in steps:
            print(f"inspect_checkpoint: error: {args.directory}: no step {step} (steps: {steps})", file=sys.stderr)
            return 2
        items = sorted(p.name for p in (Path(args.directory) / str(step)).iterdir() if p.is_dir())
    # The item's handler reads its own array metadata. A Checkpointer pointed at the item directory
    # would also look there for the step's metadata file (kept one level up) and log a spurious
    # absl warning that it does not exist.
    meta = ocp.StandardCheckpointHandler().metadata(Path(args.directory).absolute() / str(step) / "params")
    print(f"{args.directory}: {cfg.num_params():,} parameters; steps {steps}; step {step} items {items}")
    for key, value in cfg.to_dict().items():
        print(f"  {key}: {value}")
    leaves = ocp.tree.to_flat_dict(meta, sep="/")
    for name, leaf in sorted(leaves.items()):
        print(f"  {name:<20} {str(tuple(leaf.shape)):<28} {leaf.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
