"""Meshes and the ONE table of logical-axis rules. No other file names a mesh axis.

Parameters and activations carry logical names (`vocab`, `embed`, `q_heads`, ...); `RULES` maps each to
mesh axes. A dimension that a mesh axis does not divide is replicated instead (a 2-KV-head model on
tensor=4 still runs), and a mesh axis is never used twice in one spec.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (tuple, in order) or None (replicated)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
    "norm": None,
    "seq": None,
    "act_embed": None,  # activations keep the model dim whole: fsdp shards weights, not activations
    "act_vocab": ("tensor",),
    "cache_seq": None,
    "lora_rank": None,  # LoRA adapters (lora.py): the rank is tiny, never split
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One size may be -1: "the rest of the devices"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)}, "
            f"but there are {len(devices)} devices")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_spec(names: tuple[str | None, ...], shape: tuple[int, ...] | None = None, mesh=None) -> P:
    """Logical names -> PartitionSpec; drops mesh axes that do not divide the dimension."""
    mesh_shape = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is not None and name not in RULES:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = []
        size = 1
        for ax in RULES.get(name) or ():
            if ax in used:
                continue
            n = mesh_shape.get(ax, 1) if mesh_shape is not None else 1
            if shape is not None and mesh_shape is not None and shape[i] % (size * n):
                continue
            axes.append(ax)
            size *= n
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def require_divisible(name: str, size: int, mesh: Mesh, what: str) -> None:
    """ValueError unless the mesh axes the rules give logical axis `name` divide `size`. For axes whose
    even split is the point (q heads over tensor, batch rows over data*fsdp): replicating them instead
    would waste the axis silently, so the run is refused before anything is compiled or allocated."""
    axes = [a for a in RULES.get(name) or () if mesh.shape[a] > 1]
    n = math.prod(mesh.shape[a] for a in axes)
    if size % n:
        over = " * ".join(f"mesh.{a} = {mesh.shape[a]}" for a in axes)
        raise ValueError(f"{what} = {size} does not split evenly over {over} (the {name!r} rule)")


def named_sharding(mesh: Mesh, names, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(tuple(names), tuple(shape), mesh))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Constrain an activation's sharding when a mesh is set (`jax.set_mesh`); a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def _is_var(x):
    return isinstance(x, nnx.Variable)


def state_shardings(mesh: Mesh, state):
    """NamedSharding for every Variable of an (abstract) nnx State, from its `axes` metadata."""
    def one(v):
        axes = v.get_metadata().get("axes")
        if axes is None:
            return NamedSharding(mesh, P())
        return named_sharding(mesh, axes, v.shape)
    return jax.tree.map(one, state, is_leaf=_is_var)


def global_batch(mesh: Mesh, local: np.ndarray, names=("batch", "seq")) -> jax.Array:
    """Build a global array from this process's rows (each process holds only its share of the batch)."""
    sharding = NamedSharding(mesh, logical_spec(names, None, mesh))
    return jax.make_array_from_process_local_data(sharding, local)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
