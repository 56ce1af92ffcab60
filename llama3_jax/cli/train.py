"""`llama3-jax train`: a run from a YAML config (train/), or with --dry-run its compile-only fit check."""

from __future__ import annotations

import argparse
import sys

TRAIN_DESCRIPTION = """\
Train (or resume) the run described by a YAML config plus dotted key=value overrides, e.g.
  llama3-jax train --config configs/tiny.yaml data.path=my_docs.jsonl steps=500 optim.lr=1e-3
Rerunning the same command resumes from WORKDIR's latest checkpoint. SIGTERM or Ctrl-C saves a
checkpoint and stops (a second Ctrl-C stops at once). Keys: see configs/tiny.yaml and
docs/configuration.md; an unknown key is refused with the closest valid one.
"""


def add_parser(sub) -> None:
    # no distributed flags: train starts jax.distributed from its distributed.* keys
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
    t.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled XLA programs in DIR for the next run (the compile_cache key; 'none' = off) "
                        "(default: the key, else $JAX_COMPILATION_CACHE_DIR, else $LLAMA3_JAX_COMPILE_CACHE, else "
                        "~/.cache/llama3-jax/xla)")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """0, or 3 when --dry-run finds the step does not fit."""
    overrides = list(args.overrides) + ([f"compile_cache={args.compile_cache}"] if args.compile_cache else [])
    if not args.dry_run:
        if args.topology or args.num_slices != 1:
            raise ValueError("--topology and --num-slices need --dry-run")
        from ..train import run_train
        run_train(args.config, overrides)
        return 0
    from ..config_loader import load_yaml_config
    from ..parallel.compile_cache import enable
    from ..train import TrainConfig
    from ..train.dryrun import DoesNotFit, dry_run
    cfg = load_yaml_config(TrainConfig, args.config, overrides)
    enable(cfg.compile_cache, "compile_cache")
    try:
        dry_run(cfg, args.topology, args.num_slices)
    except DoesNotFit as e:
        print(f"llama3-jax train: does not fit: {e}", file=sys.stderr)
        return 3
    return 0
