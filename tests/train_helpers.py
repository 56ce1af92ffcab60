"""Helpers for tests/test_train.py, and the script its multi-device subprocess runs.

`python tests/train_helpers.py OUT_DIR key=value ...` (with XLA_FLAGS giving 8 fake CPU devices):
trains with the overrides on a data=2, fsdp=2, tensor=2 mesh, then restores the final checkpoint onto
a 1-device mesh, an fsdp=4 mesh and the training mesh, and writes OUT_DIR/report.json (losses,
PartitionSpecs, equality checks) and OUT_DIR/final_state.npz (the trained state, for the parent
process to compare with its own 1-device restore).

`python tests/train_helpers.py --backends OUT_DIR key=value ...`: the same training on the same mesh
once per faster attention backend (blockwise, splash in interpret mode), with the loss in chunks;
writes OUT_DIR/backends.json = {backend: {step: loss}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

WORDS = ("the a llama jax mesh shard token grain packs rows of text into batches while orbax saves "
         "steps and optax decays weights").split()
# test-small's shape with room for the byte tokenizer's 258 ids; even, so `vocab` shards over tensor=2.
VOCAB = 262


def write_corpus(path: Path, n_docs: int = 120, seed: int = 0) -> Path:
    """JSONL of short random sentences (3..60 words): packing puts several documents in a row."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_docs):
        words = rng.choice(WORDS, size=int(rng.integers(1, 20)))
        lines.append(json.dumps({"text": f"{i}: " + " ".join(words) + "."}) + "\n")
    path.write_text("".join(lines))
    return path


def base_overrides(workdir, corpus, init_from=None, **extra) -> list[str]:
    """The tests' run: float32, byte tokenizer, tiny batches, per-step metrics, a fixed schedule length
    (decay_steps) so a 10-step run has the same per-step learning rates as the first 10 of a longer one."""
    kv = {
        "workdir": str(workdir), "tokenizer": "bytes", "data.path": str(corpus), "data.eval_fraction": 0.1,
        "steps": 10, "batch_size": 8, "seq_len": 32, "log_every": 1,
        "checkpoint_every": 5, "compute_dtype": "float32", "optim.lr": 3e-3, "optim.warmup_steps": 2,
        "optim.decay_steps": 200, "sample_tokens": 0, "progress": False, "mesh.data": 1, "mesh.fsdp": -1,
        "mesh.tensor": 1,
    }
    if init_from is not None:
        kv["init_from"] = str(init_from)
    else:
        kv["model"] = f"{{preset: test-small, vocab_size: {VOCAB}}}"
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir) -> dict[int, float]:
    """step -> loss of the train lines; fails if a step appears twice."""
    out = {}
    for rec in read_metrics(workdir):
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def flat_state(state: dict) -> dict[str, np.ndarray]:
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _sharded_main(out: Path, overrides: list[str]) -> None:
    import jax

    from llama3_jax.store import checkpoint
    from llama3_jax import train
    from llama3_jax.model.config import load_yaml_config
    from llama3_jax.parallel.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    cfg = load_yaml_config(train.TrainConfig, None, overrides + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    train.train(cfg)
    workdir = Path(cfg.workdir)
    step = checkpoint.latest_step(workdir)
    mc = train.model_config(cfg, workdir)
    report = {"step": step, "losses": train_losses(workdir), "restores": {}}
    states = {}
    for name, devices, shape in [("mesh222", jax.devices(), (2, 2, 2)), ("fsdp4", jax.devices()[:4], (1, 4, 1)),
                                 ("single", jax.devices()[:1], (1, 1, 1))]:
        mesh = make_mesh(*shape, devices=devices)
        setup = train.build(cfg, mc, mesh)
        state, data_state, meta = train.restore_state(workdir, step, setup.abstract)
        # every restored array lands with exactly the target sharding of the new mesh
        assert all(a.sharding == s.sharding for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(setup.abstract)))
        states[name] = flat_state(state)
        report["restores"][name] = {"devices": len(devices), "meta_step": meta["step"],
                                    "specs": {k: list(a.sharding.spec) for k, a in _flat_arrays(state).items()},
                                    "shard_shapes": {k: list(a.sharding.shard_shape(a.shape))
                                                     for k, a in _flat_arrays(state).items()}}
    ref = states["mesh222"]
    for name in ("fsdp4", "single"):
        report["restores"][name]["identical"] = all(np.array_equal(ref[k], states[name][k]) for k in ref)
    np.savez(out / "final_state.npz", **ref)
    (out / "report.json").write_text(json.dumps(report))


def _flat_arrays(state):
    import jax
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _backends_main(out: Path, overrides: list[str]) -> None:
    import jax

    from llama3_jax import train
    from llama3_jax.model.config import load_yaml_config

    assert jax.device_count() == 8, jax.devices()
    report = {}
    for backend in ("blockwise", "splash"):
        extra = [f"workdir={out / backend}", f"attention={backend}", "loss_chunk=8",
                 "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
        cfg = load_yaml_config(train.TrainConfig, None, overrides + extra)
        train.train(cfg)
        report[backend] = train_losses(cfg.workdir)
    (out / "backends.json").write_text(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "--backends":
        _backends_main(Path(sys.argv[2]), sys.argv[3:])
    else:
        _sharded_main(Path(sys.argv[1]), sys.argv[2:])
