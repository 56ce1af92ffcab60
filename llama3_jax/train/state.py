"""Training checkpoints: params, optimizer state, every process's data-iterator state and run meta,
saved asynchronously under one orbax manager and restored into any mesh's shardings; and a new run's
starting weights (`start_params`).

A reward model (head `score`) may start from a language model: its trunk is read, its output layer is
not (a partial restore, or an HF / Meta stream that skips it: convert/load.py restore_trunk_any), and
`score` is what `init_params` draws for the run's seed (transformers' N(0, 0.02)), born sharded. Started
from a reward checkpoint, every weight is restored, the head included."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ..store import checkpoint
from .config import TrainConfig
from .step import Setup, init_params


def gather_data_states(state: dict) -> dict:
    """Every process's iterator state (all equal: each reads the same global order), for process 0 to save:
    {"process_count": P, "states": [state of process 0, ..., state of process P-1]}."""
    if jax.process_count() == 1:
        return {"process_count": 1, "states": [state]}
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return {"process_count": len(sizes),
            "states": [json.loads(bytes(every[i, :sizes[i]]).decode()) for i in range(len(sizes))]}


def this_process_data_state(saved: dict, where: str) -> dict:
    """This process's entry of `gather_data_states`. Every process reads the same global order, so
    their states agree and any process count continues from them (elastic resume); states that differ
    come from an older pipeline whose order was tied to the process count."""
    states = saved.get("states") or []
    if states and all(s == states[0] for s in states):
        return states[0]
    if saved.get("process_count") != jax.process_count():
        raise ValueError(f"{where}: the data iterator state was saved by {saved.get('process_count')} processes, "
                         f"this run has {jax.process_count()} (resume with the same process count)")
    return saved["states"][jax.process_index()]


def save_state(mgr: ocp.CheckpointManager, step: int, state: dict, data_state: dict, meta: dict) -> None:
    """Async save: orbax copies the arrays to host before returning (so the next step may donate them)
    and writes into a temp dir that is renamed only when complete. `data_state` is this process's
    iterator state; every process's is gathered into the checkpoint. PPO's value model (state["value"])
    is the item `value`, beside the policy's `params` (which `generate` and `init_from` read)."""
    trees = {k: ocp.args.StandardSave(state[k], checkpoint.layer_save_args(state[k]))
             for k in ("params", "opt_state", "value") if k in state}
    mgr.save(step, args=ocp.args.Composite(**trees, data=ocp.args.JsonSave(gather_data_states(data_state)),
                                           meta=ocp.args.JsonSave(meta)), force=True)


def restore_state(directory: Path, step: int, abstract: dict) -> tuple[dict, dict, dict]:
    """(state, this process's data iterator state, meta) of a training checkpoint, into `abstract`'s
    shardings (any mesh: a checkpoint from 8 devices restores on 1 or 4)."""
    if not (Path(directory) / str(step) / "opt_state").exists():
        raise ValueError(f"{directory} step {step}: no optimizer state (a converted model? use it as init_from)")
    trees = [k for k in ("params", "value") if k in abstract]
    for k in trees:
        checkpoint.check_shapes(directory, step, k, abstract[k])
    trees.append("opt_state")
    with checkpoint.manager(directory, read_only=True) as m:
        out = m.restore(step, args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(abstract[k]) for k in trees},
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    step_arr = jax.device_put(jnp.int32(out["meta"]["step"]), abstract["step"].sharding)
    data_state = this_process_data_state(out["data"], f"{directory} step {step}")
    return {**{k: out[k] for k in trees}, "step": step_arr}, data_state, out["meta"]


def start_params(cfg: TrainConfig, setup: Setup) -> dict:
    """A new run's starting weights, float32 in the model's sharded target (nothing materialised
    unsharded): `init_from`'s (a checkpoint, or an HF / Meta directory streamed onto the mesh), else
    the seeded init; a reward model on a language model: the trunk, and a fresh `score` (docstring)."""
    mc, mesh = setup.model_cfg, setup.mesh
    target = jax.tree.map(lambda a: a.sharding, checkpoint.abstract_params(mc, mesh))
    if not cfg.init_from:
        return jax.jit(lambda: init_params(mc, cfg.seed), out_shardings=target)()
    from ..convert.load import model_config_of, restore_params_any, restore_trunk_any
    if mc.head != "score" or model_config_of(cfg.init_from).head == "score":
        return restore_params_any(cfg.init_from, mesh, cfg=mc)[1]
    trunk = restore_trunk_any(cfg.init_from, mesh, mc)
    return {**trunk, "score": jax.jit(lambda: init_params(mc, cfg.seed)["score"], out_shardings=target["score"])()}
