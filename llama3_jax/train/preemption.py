"""Stopping a run cleanly: SIGTERM (a preempted VM, a scheduler's time limit) or Ctrl-C asks the loop to
save a checkpoint and exit, rather than die mid-step and lose the steps since the last save.

What can go wrong, and what this design does about it: a signal arriving while the devices run a step
(or compile one) must not interrupt it, so the handler only sets a flag that the loop reads between
steps; with several processes every step is a collective, so one process stopping alone would hang the
others: `agreed` compares the flags of all processes at the same step, and all stop there together.
"""

from __future__ import annotations

import signal
import sys

import jax
import numpy as np


class Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT), sets a flag: the loop saves a checkpoint at the end of the
    step (several processes: of the next step where they compare flags) and exits cleanly. A second
    Ctrl-C stops at once (KeyboardInterrupt), saving nothing more."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal = None  # the name of the first signal received
        self._old = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, _frame):
        self.requested, self.signal = True, self.signal or signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts, whatever SIGINT was set to before
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\ntrain: SIGINT: saving a checkpoint after this step, then stopping "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, step: int, every: int) -> bool:
        """Whether every process stops after `step`. Each step is a collective, so with several
        processes a signal to any one of them stops all at the same step: the flags are compared
        every `every` steps (where the loop waits for the devices anyway), and one checkpoint is saved."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))
