"""The update's batch of a GRPO rollout (train/rl.py), in one of two layouts the step reads alike.

Shapes: B prompts, G completions of each (prompt-major: completion r is prompt r // G), C the
max_completion_length (a completion's ids, its stop token included, are at most C: serve/rollout.py),
T = seq_len, P = T - C the longest prompt a run takes (data/prompts.py).

`rows` (any mesh, any attention backend): one row per completion, (B*G, T): tokens = prompt +
completion shifted by one into targets, loss_mask on the completion's targets, the row's advantage on
every column.

`packed` (the prompt computed once per group): one row per prompt, (B, W) with W = P + G*C:
    slots [P - p, P)             the prompt (p ids, left padding: segment 0), segment -1: a shared
                                 prefix every completion of the row sees (attention/reference.py's
                                 rule), positions 0 .. p-1
    slots [P + gC, P + gC + n)   completion g's n ids, segment g + 1, positions p .. p+n-1
and the per-completion arrays (B, G*C), completion g in columns [gC, (g+1)C): `targets` (its ids),
`loss_mask`, `advantages`, and `logit_at`: the slot whose final hidden state predicts that target
(the prompt's last slot for the first id, the slot of the id before for the others). The step
(step.policy_logps) gathers the hidden states at `logit_at`, so the output layer runs on completion
tokens only, and reshapes everything to the (B*G, C) rows grpo_loss takes; `old_logps` are kept in
the (B, G*C) layout, so microbatches and shards (rows of prompts) split every array alike.

Why: the G completions of a prompt share it, and the rows layout computes each prompt G times,
forward and backward (configs/grpo.yaml's toy run: ~80% of an update's tokens). Packed, an update
processes B * (P + G*C) tokens instead of B*G*T; the loss and gradient are the same up to float
rounding (tests/test_grpo_trl.py checks both layouts against TRL's GRPOTrainer). It needs an attention
backend that knows shared prefixes (`SHARED_PREFIX_BACKENDS`) and B rows that split over the
microbatches and the mesh's batch shards (`use_packed`); otherwise the rows layout is used.
"""

from __future__ import annotations

import numpy as np

KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
SHARED_PREFIX_BACKENDS = ("reference", "blockwise")  # the backends whose mask reads segment -1 (attention/)


def use_packed(backend: str, prompts: int, generations: int, seq_len: int, max_completion_length: int,
               batch_shards: int, grad_accum: int, loss_type: str) -> bool:
    """Whether the packed layout applies: the backend masks shared prefixes; the B prompt rows split
    into grad_accum microbatches over the mesh's batch shards; the reference backend's (W, W) scores
    are no larger than the rows layout's G (T, T) (long completions: blockwise, or rows); and bnpo,
    whose loss is a mean per microbatch, keeps the rows layout's microbatches when there are several."""
    width = seq_len - max_completion_length + generations * max_completion_length
    return (backend in SHARED_PREFIX_BACKENDS and prompts % grad_accum == 0
            and (prompts // grad_accum) % batch_shards == 0
            and (backend != "reference" or width ** 2 <= generations * seq_len ** 2)
            and (loss_type != "bnpo" or grad_accum == 1))


def plan(cfg, mesh) -> tuple[str, bool]:
    """(attention backend, packed?) of a grpo run's step (`cfg` a TrainConfig), decided once by
    step.build. attention auto on CPU packs with blockwise: its small blocks skip the pairs of
    completions that never see each other (attention/blockwise.py short_block; the reference computes
    them all: ~2x slower on the toy run's update); elsewhere auto's backend, packed where it can."""
    import math

    from ..model import attention
    from ..parallel.sharding import logical_spec

    platform = mesh.devices.flat[0].platform
    g = cfg.grpo
    axes = logical_spec(("batch",), None, mesh)[0] or ()
    shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    fits = [cfg.batch_size, g.num_generations, cfg.seq_len, g.max_completion_length, shards, cfg.grad_accum,
            g.loss_type]
    if cfg.attention == "auto" and platform == "cpu" and use_packed("blockwise", *fits):
        return "blockwise", True
    backend = attention.resolve(cfg.attention, platform, cfg.seq_len)
    return backend, use_packed(backend, *fits)


def rows(prompts: list[list[int]], ids: list[list[int]], loss_on: np.ndarray, adv: np.ndarray, seq_len: int) -> dict:
    """The (B*G, seq_len) layout. `prompts`: each prompt's ids; `ids`: each completion's ids; `loss_on`:
    (B*G,) bool, whether a completion counts in the loss; `adv` (B*G,) float32."""
    G, T, n = len(ids) // len(prompts), seq_len, len(ids)
    out = {k: np.zeros((n, T), np.int32) for k in KEYS}
    out["advantages"] = np.repeat(adv[:, None], T, axis=1).astype(np.float32)
    for r, c in enumerate(ids):
        p = prompts[r // G]
        seq = p + c
        m = len(seq) - 1  # <= seq_len: prompts are at most seq_len - max_completion_length (prompts.py)
        out["tokens"][r, :m], out["targets"][r, :m] = seq[:-1], seq[1:]
        out["positions"][r, :m], out["segment_ids"][r, :m] = np.arange(m), 1
        if loss_on[r]:
            out["loss_mask"][r, len(p) - 1:m] = 1
    return out


def packed(prompts: list[list[int]], ids: list[list[int]], loss_on: np.ndarray, adv: np.ndarray, seq_len: int,
           max_completion_length: int) -> dict:
    """The (B, P + G*C) layout (module docstring); arguments as `rows`."""
    B, C = len(prompts), max_completion_length
    G, P = len(ids) // B, seq_len - max_completion_length
    out = {k: np.zeros((B, P + G * C), np.int32) for k in ("tokens", "positions", "segment_ids")}
    per = {k: np.zeros((B, G * C), np.int32) for k in ("targets", "loss_mask", "logit_at")}
    per["advantages"] = np.repeat(adv.reshape(B, G), C, axis=1).astype(np.float32)
    for b, p in enumerate(prompts):
        n = len(p)
        if n > P:  # data/prompts.py skips them; a caller that does not gets no silent cut
            raise ValueError(f"prompt of {n} ids: longer than seq_len - max_completion_length = {P}")
        out["tokens"][b, P - n:P], out["positions"][b, P - n:P], out["segment_ids"][b, P - n:P] = p, np.arange(n), -1
        for g in range(G):
            c = ids[b * G + g]
            k, s = len(c), P + g * C  # its ids; its first slot
            if k > C:
                raise ValueError(f"completion of {k} ids: longer than max_completion_length {C}")
            out["tokens"][b, s:s + k], out["positions"][b, s:s + k] = c, n + np.arange(k)
            out["segment_ids"][b, s:s + k] = g + 1
            col = g * C
            per["targets"][b, col:col + k] = c
            per["logit_at"][b, col:col + k] = [P - 1, *range(s, s + k - 1)]
            per["loss_mask"][b, col:col + k] = int(loss_on[b * G + g])
    return {**out, **per}
