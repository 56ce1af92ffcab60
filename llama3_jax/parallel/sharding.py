"""Meshes and the ONE table of logical-axis rules. No other file names a mesh axis.

Parameters and activations carry logical names (`vocab`, `embed`, `q_heads`, ...); `RULES` maps each to
mesh axes. A dimension that a mesh axis does not divide is replicated instead (a 2-KV-head model on
tensor=4 still runs), and a mesh axis is never used twice in one spec.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
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
    # the residual stream between and around the layers in training (sequence parallelism): each
    # tensor shard keeps 1/tensor of the positions, so what a layer scan saves for the backward (each
    # layer's input, 1 GiB per layer for 405B at 4 x 8192 tokens per chip) is split `tensor` ways; the
    # partitioner all-gathers positions before the projections and reduce-scatters after them
    "act_seq": ("tensor",),
    "act_embed": None,  # activations keep the model dim whole: fsdp shards weights, not activations
    "act_vocab": ("tensor",),
    "cache_seq": None,
    "lora_rank": None,  # LoRA adapters (lora.py): the rank is tiny, never split
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None, *, dcn_data: int = 1,
              dcn_fsdp: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh. One size may be -1: "the rest of the devices".

    With `dcn_data` / `dcn_fsdp` > 1 the devices form that many slices (TPU slices, or hosts joined by the
    data-center network) and data/fsdp/tensor give the mesh of ONE slice: the mesh axis `data` is then
    dcn_data * data long, its outer factor crossing slices, so only the gradient reduction (data) or the
    weight gathers (fsdp) travel over the slow network while tensor stays inside a slice."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = (dcn_data, dcn_fsdp, 1)
    if min(dcn) < 1:
        raise ValueError(f"mesh: dcn_data and dcn_fsdp must be >= 1, got {dcn_data}, {dcn_fsdp}")
    n_slices = math.prod(dcn)
    if len(devices) % n_slices:
        raise ValueError(f"mesh: {len(devices)} devices do not split into dcn_data*dcn_fsdp = {n_slices} slices")
    ici = _resolve_sizes([data, fsdp, tensor], len(devices) // n_slices,
                         " per slice" if n_slices > 1 else "")
    if n_slices == 1:
        arr = np.asarray(devices).reshape(ici)
    else:
        arr = hybrid_device_array(devices, ici, dcn)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


MESH_KEYS = (*MESH_AXES, "dcn_data", "dcn_fsdp")


def parse_mesh(text: str | None) -> dict[str, int]:
    """`--mesh data=1,fsdp=1,tensor=-1` -> {"data": 1, "fsdp": 1, "tensor": -1} (None or "" -> {}).
    ValueError naming the bad part; sizes are checked against the devices by `make_mesh`."""
    sizes: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in MESH_KEYS:
            raise ValueError(f"--mesh {text!r}: {part.strip()!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_KEYS)}")
        if key in sizes:
            raise ValueError(f"--mesh {text!r}: {key} given twice")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: {key}={value.strip()!r} is not an integer") from None
        if sizes[key] < 1 and not (sizes[key] == -1 and key in MESH_AXES):
            raise ValueError(f"--mesh {text!r}: {key} must be >= 1" + (" (or -1: the rest)" * (key in MESH_AXES)))
    return sizes


def inference_mesh(sizes: dict[str, int] | None = None) -> Mesh:
    """The mesh of generate, score and convert: `sizes` (parse_mesh; axes not named are 1), or by default
    the model split over each host's devices (`tensor` = local devices: a model too big for one device
    fits on a multi-device host) and the batch over the hosts (`data` = processes)."""
    if not sizes:
        sizes = {"data": jax.process_count(), "tensor": jax.local_device_count()}
    return make_mesh(**{k: sizes.get(k, 1) for k in MESH_KEYS})


def _resolve_sizes(sizes: list[int], n: int, where: str) -> tuple[int, ...]:
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices{where} are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)}, "
            f"but there are {n} devices{where}")
    return tuple(sizes)


def hybrid_device_array(devices, ici: tuple[int, ...], dcn: tuple[int, ...]) -> np.ndarray:
    """Devices laid out as an ICI x DCN mesh: axis i has dcn[i] * ici[i] entries, slice-major.

    TPU devices know their slice (`slice_index`): mesh_utils.create_hybrid_device_mesh also orders each
    slice by its physical torus. Elsewhere (CPU, GPU) a slice is one process's devices, or with one
    process, consecutive runs of devices (how a test fakes two slices), laid out the same way by hand."""
    n_slices = math.prod(dcn)
    if all(hasattr(d, "slice_index") for d in devices) and len({d.slice_index for d in devices}) > 1:
        from jax.experimental import mesh_utils
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    if len(by_process) > 1:
        groups = [by_process[p] for p in sorted(by_process)]
        if len(groups) != n_slices:
            raise ValueError(f"mesh: dcn_data*dcn_fsdp = {n_slices} slices, but the devices belong to "
                             f"{len(groups)} processes (each process is a slice here)")
    else:
        per = len(devices) // n_slices
        groups = [devices[i * per:(i + 1) * per] for i in range(n_slices)]
    blocks = np.empty((n_slices, len(groups[0])), dtype=object)
    for i, g in enumerate(groups):
        blocks[i, :] = g
    # (dcn0, dcn1, dcn2, ici0, ici1, ici2) -> (dcn0, ici0, dcn1, ici1, dcn2, ici2) -> (dcn0*ici0, ...)
    arr = blocks.reshape(*dcn, *ici).transpose(0, 3, 1, 4, 2, 5)
    return arr.reshape([a * b for a, b in zip(dcn, ici)])


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


def local_shape(mesh: Mesh, names: tuple[str | None, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one device's shard of an array with these logical names (what the rules give)."""
    spec = logical_spec(names, shape, mesh)
    out = []
    for size, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        out.append(size // math.prod(mesh.shape[a] for a in axes))
    return tuple(out)


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


def mesh_scope(mesh: Mesh | None):
    """`with mesh_scope(mesh):` the mesh jit and the sharding constraints see; no mesh, no scope."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def put(mesh: Mesh | None, x: np.ndarray, names: tuple[str | None, ...]) -> jax.Array:
    """A host array on the devices, laid out by logical `names` over `mesh` (no mesh: the default device)."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, named_sharding(mesh, names, x.shape))


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
