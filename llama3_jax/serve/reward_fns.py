"""Reward functions for `rejection-sample --reward-fn` and `grpo.reward_funcs` (train/rl.py): Python
functions with TRL's signature, loaded by name, called once per prompt, their answers checked and
combined with the other reward sources.

A function is named `MODULE:NAME` (imported: `my_pkg.rewards:length_penalty`) or `path/to/file.py:NAME`
(loaded from that file). It is called as TRL's GRPOTrainer calls a reward function:

    fn(prompts=[prompt] * n, completions=[...], completion_ids=[[ids], ...], **columns) -> list[float | None]

(an `async def` function is awaited, as TRL awaits one) with one entry per sample of one input line:
the prompt as the line gives it (text or messages), each completion as text for a text prompt and as
`[{"role": "assistant", "content": text}]` for a chat prompt, and `columns` the line's other fields (each repeated n times; never "prompt", "completion",
"completion_ids", as TRL leaves them out too). `None` means "not applicable to this sample".

What can go wrong, and what this file does about it:
  * a name that does not load (no module, no file, no such attribute, not callable, the module itself
    raising on import): one line naming the `--reward-fn` value, before the (slow) model restore;
  * a function that raises, returns something not a list, a list of the wrong length, or an entry that
    is not a number or None (a bool, a string, an infinity): one line naming the function and the
    prompt's FILE:LINE, and the command stops. A silently skipped prompt would hide a bug in the
    function behind a data set that is quietly smaller; the run resumes where it stopped;
  * NaN is taken as None (TRL sums the weighted rewards with nansum, skipping NaN the same way);
  * `combine`: the weighted sum over the sources that gave a number; a sample that no source judged is
    NaN, and rejection sampling never keeps it (TRL would count it as 0: as training data, an unjudged
    sample is not "as good as reward 0").
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

NOT_COLUMNS = frozenset({"prompt", "completion", "completion_ids"})


@dataclass(frozen=True)
class RewardFn:
    """One loaded `--reward-fn`: `name` is the value as given (it names the function in errors)."""
    name: str
    fn: Callable

    def __call__(self, prompt, completions: list, completion_ids: list[list[int]], columns: dict,
                 where: str) -> list[float | None]:
        """The function's rewards for the n samples of one prompt, checked; `where` is FILE:LINE."""
        n = len(completions)
        cols = {k: [v] * n for k, v in columns.items() if k not in NOT_COLUMNS}
        try:
            out = self.fn(prompts=[prompt] * n, completions=completions, completion_ids=completion_ids, **cols)
            if inspect.iscoroutine(out):  # an `async def` reward function, which TRL 1.16 awaits too
                out = asyncio.run(out)
        except Exception as e:  # noqa: BLE001 -- whatever it raises is reported as one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{where}: reward function {self.name} raised {type(e).__name__}"
                             f"{': ' + msg if msg else ''}") from None
        return check_rewards(out, n, f"{where}: reward function {self.name}")


def check_rewards(out, n: int, who: str) -> list[float | None]:
    """`out` as n floats or None (NaN -> None); ValueError `who: why` otherwise."""
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):
        out = out.tolist()  # a numpy array or a torch tensor
    if not isinstance(out, (list, tuple)):
        raise ValueError(f"{who} returned {type(out).__name__}, not a list of floats")
    if len(out) != n:
        raise ValueError(f"{who} returned {len(out)} rewards for {n} completions")
    rewards = []
    for i, r in enumerate(out):
        if r is None:
            rewards.append(None)
            continue
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise ValueError(f"{who} returned {r!r} for completion {i}, not a number or None")
        r = float(r)
        if math.isinf(r):
            raise ValueError(f"{who} returned {r} for completion {i}; rewards must be finite (None: not "
                             f"applicable)")
        rewards.append(None if math.isnan(r) else r)
    return rewards


def load(spec: str) -> RewardFn:
    """`MODULE:NAME` or `path/to/file.py:NAME` -> the function. ValueError (one line) when it does not load."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--reward-fn {spec}: expected MODULE:NAME or path/to/file.py:NAME")
    try:
        module = _module_from_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    except (ImportError, OSError) as e:
        raise ValueError(f"--reward-fn {spec}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- the module's own code raising while it is imported
        raise ValueError(f"--reward-fn {spec}: importing {where} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"--reward-fn {spec}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec}: {name} is a {type(fn).__name__}, not a function")
    return RewardFn(spec, fn)


def _module_from_file(path: Path):
    if not path.is_file():
        raise OSError(f"no such file: {path}")
    # a name of its own per file, so two files' `rewards.py` do not replace each other in sys.modules
    mod_name = f"llama3_jax_reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


def weights(values: Sequence[float] | None, n_sources: int) -> list[float]:
    """--reward-weights: one finite weight per reward source (default: 1.0 each)."""
    if values is None:
        return [1.0] * n_sources
    if len(values) != n_sources:
        raise ValueError(f"--reward-weights has {len(values)} values for {n_sources} reward sources (the reward "
                         f"model first, then each --reward-fn in order)")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"--reward-weights must be finite numbers, got {list(values)}")
    return [float(w) for w in values]


def combine(per_source: Sequence[Sequence[float | None]], w: Sequence[float]) -> list[float]:
    """Per sample: sum of weight * reward over the sources that gave one; NaN when none did."""
    out = []
    for rewards in zip(*per_source):
        given = [wi * r for wi, r in zip(w, rewards) if r is not None]
        out.append(math.fsum(given) if given else math.nan)
    return out
