"""Named kill points, so the fault-injection tests can SIGKILL a real run at an exact moment.

`LLAMA3_JAX_KILL_AT=NAME[:N]` in the environment makes the process send itself SIGKILL the N-th time
(default 1st) it passes `kill_point(NAME)`: no handler, no cleanup, no flush, exactly what a
preempted host or the OOM killer does. A random-time kill from outside rarely lands inside a short
window (an async checkpoint write takes milliseconds on a tiny model); a kill point lands there every
time. Unset (the normal case) it costs one dict lookup.

Points: `train.step` (a step dispatched, its result not yet read), `train.save` (an async checkpoint
write just started in the background), `train.eval` (between eval batches), `train.final_save` (the
last checkpoint's write started, not yet committed), `convert.tensor` (a tensor handed to the writer),
`convert.finish` (every file written to the temp directory, not yet renamed to DST),
`rejection.write` (a group of prompts' records and samples written, their done lines not yet),
`grpo.rollout` (an RL step's completions drawn, not yet rewarded), `ppo.rollout` (likewise for
objective ppo: drawn, not yet scored).
"""

from __future__ import annotations

import os
import signal

ENV = "LLAMA3_JAX_KILL_AT"


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, n = spec.partition(":")
    return name, int(n or 1)


_TARGET = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if `name` is the armed point and this is its N-th pass."""
    if _TARGET is None or _TARGET[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
