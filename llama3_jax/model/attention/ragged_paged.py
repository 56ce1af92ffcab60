"""Paged decode attention on TPU: `jax.experimental.pallas.ops.tpu.ragged_paged_attention`.

Why: `decode.attend_paged` gathers each row's pages with XLA and folds them with segment reductions;
on TPU a gather of whole pages is slow next to a kernel that DMAs a row's pages from HBM into VMEM
(double-buffered) and runs flash attention over them, which is what serving engines on TPU use
(vLLM-TPU, tpu-inference). This file is that kernel behind the paged cache's switch
(`paged_attention`, attention/__init__.py), proven equal to `attend_paged` (below).

The pool already has the kernel's layout (paged_cache.py's interleaved layout, which the engine
allocates with this backend: K and V interleaved by kv head). The stacked
pool (L, N, G, 2 KV, K) is handed over whole, reshaped to (L N, G, 2 KV, K), a bitcast, and layer l's
pages are addressed as l N + page: slicing a layer out would copy the layer's whole pool on every decode
step, because a Pallas call takes its operands as materialised buffers.

Each decoding row is one sequence with one query: cu_q_lens = 0, 1, .., B; kv_lens = position + 1 (the
query's own k/v are written before attention). Free slots point at page 0 and are computed like any
row (garbage, never read), as on the XLA path.

Under a mesh the kernel runs once per device (shard_map; XLA cannot partition a Pallas call): rows
split as the batch, heads as `tensor` when the q heads and the pool's kv heads split alike with each
head's K and V on one device, else every device takes all heads.

Limits: float K/V only (the kernel's scales are one static float per cache; our int8 cache keeps a scale
per position and kv head in the row's last 4 bytes, quant.py): an int8 cache keeps `attend_paged`.
Block sizes: the kernel's tuned table on TPU; when compiling for a TPU topology from a CPU host
(libtpu's compile-only mode) it cannot ask the chip its version, so the kernel's own untuned default is
passed.

Proof of equality (tests/test_paged_kernel.py): jax 0.10.2's Pallas interpreters cannot run this
kernel on CPU (the TPU interpreter has no rule for its reshaped VMEM refs, the generic one none for its
DMA indexing), so the test feeds `kernel_inputs` to the kernel's own reference,
`ref_ragged_paged_attention` (the kernel's contract, as jax tests it on TPU), and checks it against
`attend_paged`; and compiles a whole paged decode step with the kernel for a TPU topology (libtpu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..paged_cache import INTERLEAVED_AXES
from ...parallel.sharding import local_shape, logical_spec

DEFAULT_BLOCKS = (128, 32)  # (kv pages, queries) per kernel block: the kernel's untuned default


def kernel_inputs(q, pool, layer, table, positions):
    """The kernel's arguments for one layer's decode step: q (B, 1, H, K) -> queries (B, H, K); the pool
    (L, N, G, 2 KV, K) -> pages (L N, G, 2 KV, K) (a bitcast); kv_lens (B,); page_indices (B, M) into
    the flattened pool; cu_q_lens (B + 1,); num_seqs (1,)."""
    b, t = q.shape[:2]
    assert t == 1, "paged decode attention takes one query per row"
    n_layers, n, g, kv2, width = pool.shape
    m = table.shape[1]
    return (q[:, 0].astype(pool.dtype), pool.reshape(n_layers * n, g, kv2, width),
            jnp.minimum(positions + 1, m * g).astype(jnp.int32), (table + layer * n).astype(jnp.int32),
            jnp.arange(b + 1, dtype=jnp.int32), jnp.full((1,), b, jnp.int32))


def attend(q, pool, layer, q_seg=None, k_seg=None, q_slot=None, *, table, positions, load=None):
    """`decode.attend_paged`'s interface: q (B, 1, H, K), pool (L, N, G, 2 KV, K), table (B, M), positions
    (B,) -> (B, 1, H, K) in q's dtype. `load` must be None or the identity (a float cache)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    del q_seg, k_seg, q_slot, load  # one segment per row; a float pool is read as stored
    d = q.shape[-1]
    width = pool.shape[-1]
    if width != d or jnp.issubdtype(pool.dtype, jnp.integer):
        raise ValueError(f"the ragged_paged_attention kernel reads a float cache of head_dim {d}; this pool is "
                         f"{pool.dtype} of width {width} (use paged_attention=blockwise for an int8 KV cache)")
    tuned = jax.devices()[0].platform == "tpu"  # compiling for a topology from a CPU host: no chip to ask

    def run(q, pool, layer, table, positions):  # one device's rows and heads
        blocks = {} if tuned else dict(num_kv_pages_per_block=min(table.shape[1], DEFAULT_BLOCKS[0]),
                                       num_queries_per_block=min(q.shape[0], DEFAULT_BLOCKS[1]))
        args = kernel_inputs(q, pool, layer, table, positions)
        return ragged_paged_attention(*args, sm_scale=d ** -0.5, **blocks)[:, None]

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:  # a Pallas call is not partitioned by XLA: one call per device
        q_spec = logical_spec(("batch", None, "q_heads", None), q.shape, mesh)
        pool_spec = logical_spec(INTERLEAVED_AXES, pool.shape, mesh)
        if q_spec[2] != pool_spec[3] or local_shape(mesh, INTERLEAVED_AXES, pool.shape)[3] % 2:
            # heads not split alike (or a head's K and V on two devices): every device takes all heads
            q_spec = logical_spec(("batch", None, None, None), q.shape, mesh)
            pool_spec = logical_spec(("layers", None, None, None, None), pool.shape, mesh)
        rows = logical_spec(("batch", None), table.shape, mesh)
        run = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, pool_spec, P(), rows, P(rows[0])),
                            out_specs=q_spec, check_vma=False)
    return run(q, pool, jnp.asarray(layer, jnp.int32), table, positions).astype(q.dtype)
