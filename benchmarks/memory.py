"""Compiled memory of one train step against the sequence length: reference vs blockwise + chunked loss.

    python benchmarks/memory.py [--lengths 1024 2048 4096 8192 16384] [--model tiny-yaml]

For each T, one train step (batch 1, float32 compute, the `configs/tiny-128k.yaml` model: real 128,256-token
vocabulary) is compiled from abstract shapes (train/dryrun.py `compile_step`: nothing is allocated)
and XLA's buffer assignment reports its temporaries. Two settings:
    reference   attention=reference, loss_chunk=0: (T, T) float32 scores per layer, (T, vocab) logits
    blockwise   attention=blockwise, loss_chunk=512: O(T * block) attention, 512 x vocab logits at a time
Prints a markdown table and the slope of each column between the last two lengths (bytes per extra
token: linear growth keeps it constant; quadratic growth doubles it with each doubling of T).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = {"reference": ["attention=reference", "loss_chunk=0"],
            "blockwise": ["attention=blockwise", "loss_chunk=512"]}


def temporaries(config: str, seq_len: int, extra: list[str]) -> int:
    from llama3_jax.config_loader import load_yaml_config
    from llama3_jax.train import TrainConfig
    from llama3_jax.train.dryrun import compile_step

    cfg = load_yaml_config(TrainConfig, config, [f"seq_len={seq_len}", "batch_size=1", "compute_dtype=float32",
                                                 *extra])
    compiled, _, _ = compile_step(cfg, jax.devices()[:1])
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "tiny-128k.yaml"))
    args = p.parse_args()
    rows = {}
    for t in args.lengths:
        rows[t] = {name: temporaries(args.config, t, extra) for name, extra in SETTINGS.items()}
        print(f"T={t}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rows[t].items()), file=sys.stderr,
              flush=True)
    print(f"\nCompiled temporaries of one train step, batch 1, {args.config} model, float32 "
          f"(jax {jax.__version__}, {jax.devices()[0].platform}):\n")
    print("| T | " + " | ".join(f"{k} (MiB)" for k in SETTINGS) + " |")
    print("|---:|" + "---:|" * len(SETTINGS))
    for t, r in rows.items():
        print(f"| {t} | " + " | ".join(f"{r[k] / 2**20:,.0f}" for k in SETTINGS) + " |")
    if len(rows) >= 2:
        (t0, r0), (t1, r1) = list(rows.items())[-2:]
        slopes = ", ".join(f"{k} {(r1[k] - r0[k]) / (t1 - t0) / 1024:,.1f} KiB/token" for k in SETTINGS)
        print(f"\nSlope between T={t0} and T={t1}: {slopes}")


if __name__ == "__main__":
    main()
