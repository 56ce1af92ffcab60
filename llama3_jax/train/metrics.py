"""What a run reports: WORKDIR/metrics.jsonl (+ TensorBoard event files) and the FLOP/s figures
behind `tokens_per_second` and `mfu`."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import jax

from ..model.config import ModelConfig
from ..parallel.hardware import PEAK_FLOPS, lookup
from .optim import flops_per_token

# CPU: nominal float32 FMA peak per core, 2 AVX2 FMA units * 8 lanes * 2 flops * 3 GHz = 96 GFLOP/s,
# for the whole host however many (fake) devices it is split into.
CPU_PEAK_FLOPS_PER_CORE = 96e9


class MetricsLog:
    """WORKDIR/metrics.jsonl, appended and flushed per line by process 0. On (re)start it keeps only
    lines with step <= the restored step, so a resumed run has each step once."""

    def __init__(self, workdir: Path, start_step: int, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        self.on = jax.process_index() == 0
        self.tb = None
        if not self.on:
            return
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut by a crash
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            self.tb = _tensorboard_writer(workdir / "tensorboard")

    def write(self, record: dict) -> None:
        if not self.on:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.on:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _tensorboard_writer(logdir: Path):
    """An event-file writer that needs no TensorFlow: tensorboardX (the `tensorboard` extra), else
    torch's; None, with a note, when neither is installed."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            return importlib.import_module(module).SummaryWriter(str(logdir))
        except ImportError:
            continue
    print("tensorboard: no event-file writer is installed (pip install 'llama3-jax[tensorboard]'); "
          "metrics are in metrics.jsonl only", file=sys.stderr)
    return None


def peak_flops(cfg_peak: float, devices) -> float:
    """Peak FLOP/s of the whole job: `peak_flops` per device, else by device kind (CPU: per core)."""
    if cfg_peak > 0:
        return cfg_peak * len(devices)
    if devices[0].platform == "cpu":
        return CPU_PEAK_FLOPS_PER_CORE * (os.cpu_count() or 1)
    per = lookup(PEAK_FLOPS, devices[0].device_kind)
    return per * len(devices) if per else float("nan")  # unknown accelerator: set `peak_flops`


def model_flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """6 N over the matmul weights (no embedding lookup; a tied embedding counts as the output layer,
    except beside a reward model's `score` head, which is counted instead)."""
    n = mc.num_params() - (0 if mc.tie_embeddings and mc.head == "lm" else mc.vocab_size * mc.dim)
    n -= mc.n_layers * 2 * mc.dim + mc.dim  # norm gains
    return flops_per_token(n, mc.n_layers, mc.n_heads, mc.head_dim, seq_len)
