"""Non-finite losses and loss spikes: the in-step skip (pure, under jit) and the loop's guard.

A NaN or inf loss or gradient norm at step N (a corrupt token id, an overflow, a bad learning rate)
poisons every weight it touches. `nan_policy`:
  * `stop` (default): the loop ends the run with a one-line error naming step N; nothing from step N
    on is saved, so the last checkpoint is the last good state;
  * `skip`: the step keeps the old params and optimizer state (`keep_finite`, inside the jitted step:
    a `jnp.where` on every leaf, no host round trip), the loop counts it (`skipped_updates` in the
    metrics lines) and stops only after `nan_max_consecutive` skips in a row, which means the run is
    broken rather than unlucky.
`spike_factor` k > 0 logs a warning line when a step's loss exceeds k x the mean of the previous
`SPIKE_WINDOW` finite losses (a warning only: spikes often recover).

The guard reads each step's flags one step late (after the next step is dispatched), so checking
costs no device stall; `flush` checks the latest step at once and runs before every checkpoint save.
"""

from __future__ import annotations

import collections
import math
import sys

import jax
import jax.numpy as jnp

POLICIES = ("stop", "skip")
SPIKE_WINDOW = 100
SPIKE_MIN_HISTORY = 5


def keep_finite(ok: jax.Array, new: dict, old: dict) -> dict:
    """`new` where `ok` (a scalar bool), else `old`, leaf by leaf (under jit: a select, no branch)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def is_finite_step(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


class NonFiniteError(ValueError):
    """The run stopped on a non-finite loss or gradient norm (one line, naming the step)."""


class Guard:
    """Host side: stop on (or count skipped) non-finite steps, warn on loss spikes."""

    def __init__(self, policy: str = "stop", max_consecutive: int = 10, spike_factor: float = 0.0, *,
                 last_checkpoint=lambda: None, out=None):
        self.policy, self.max_consecutive, self.spike_factor = policy, max_consecutive, spike_factor
        self.last_checkpoint = last_checkpoint
        self.out = out or sys.stderr
        self.skipped = 0
        self.consecutive = 0
        self.history: collections.deque[float] = collections.deque(maxlen=SPIKE_WINDOW)
        self._pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> None:
        """Record step `step`'s (device) metrics; check the previous step's, which are ready by now."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        if self._pending is not None:
            step, metrics = self._pending
            self._pending = None
            self.check(step, float(metrics["loss"]), float(metrics["grad_norm"]))

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"step {step}: non-finite loss {loss} (grad_norm {grad_norm})"
            ckpt = self.last_checkpoint()
            kept = f"; the last checkpoint (step {ckpt}) is intact" if ckpt is not None else ""
            if self.policy == "stop":
                raise NonFiniteError(f"{what}; stopping (nan_policy=stop){kept}")
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive > self.max_consecutive:
                raise NonFiniteError(f"{what}: {self.consecutive} non-finite steps in a row, more than "
                                     f"nan_max_consecutive={self.max_consecutive}; stopping{kept}")
            print(f"train: warning: {what}: update skipped (nan_policy=skip, {self.skipped} so far)",
                  file=self.out, flush=True)
            return
        self.consecutive = 0
        if self.spike_factor > 0 and len(self.history) >= SPIKE_MIN_HISTORY:
            mean = sum(self.history) / len(self.history)
            if loss > self.spike_factor * mean:
                print(f"train: warning: loss spike at step {step}: {loss:.4f} > {self.spike_factor:g} x "
                      f"running mean {mean:.4f}", file=self.out, flush=True)
        self.history.append(loss)
