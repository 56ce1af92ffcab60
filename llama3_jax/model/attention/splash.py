"""Splash attention (TPU): the Pallas kernel of jax.experimental.pallas.ops.tpu.splash_attention.

A fused flash-attention kernel with block-sparse masks: the causal mask is static (its all-masked
blocks are never visited) and packed documents come in as segment ids, so neither the (T, T) scores
nor a (T, T) mask ever exists. GQA is native (q head h reads kv head h // (H / KV), the grouping the
reference uses). The kernel works on one sequence (heads, T, head_dim); batches are a vmap, and a
mesh is handled with `shard_map` over the batch and head axes of the rules table (sharding.py), so
each device runs the kernel on its own rows and heads with no communication.

Only self-attention from slot 0 (training, and prefill without a cache): slot i of the queries is
slot i of the keys, which is what the kernel's causal mask assumes. The model keeps cached decoding
on the reference path. T is padded up to the block size with segment 0 (never seen by real tokens).
Rows of segment 0 (padding) attend to other padding rows instead of giving the reference's mean of
the values; no real token reads them.

Off TPU the kernel runs in Pallas interpret mode (`interpret=True`): slow, for tests only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from ...parallel.sharding import logical_spec

BLOCK = 512  # largest block; the TPU lane width (128) is the smallest


def _kernel(heads: int, t: int, block: int, interpret: bool):
    """Built inside each trace (not cached: the kernel holds arrays that must belong to that trace)."""
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, seg, *, block: int, interpret: bool):
    """One device's share: q (B, T, H, K), k/v (B, T, KV, K), seg (B, T); T a multiple of `block`."""
    kernel = _kernel(q.shape[2], q.shape[1], block, interpret)

    def one(q, k, v, seg):  # (T, H, K) -> the kernel's (H, T, K)
        out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), segment_ids=sa.SegmentIds(seg, seg))
        return out.swapaxes(0, 1)
    return jax.vmap(one)(q, k, v, seg)


def attend(q, k, v, q_seg, k_seg, q_idx=None, k_idx=None, *, interpret: bool = False, block: int = BLOCK):
    """q (B, T, H, K), k/v (B, T, KV, K), q_seg == k_seg (B, T) -> (B, T, H, K). Slots are 0..T-1 for
    both queries and keys (q_idx/k_idx are accepted for the common interface and not read)."""
    del k_seg, q_idx, k_idx  # self-attention: the same segments and slots (see the docstring)
    b, t, h, d = q.shape
    block = min(block, 128 * math.ceil(t / 128))
    tp = block * math.ceil(t / block)
    pad = ((0, 0), (0, tp - t))
    q = jnp.pad((q * d ** -0.5).astype(q.dtype), pad + ((0, 0), (0, 0)))
    k, v = (jnp.pad(x, pad + ((0, 0), (0, 0))) for x in (k, v))
    seg = jnp.pad(q_seg.astype(jnp.int32), pad)
    run = functools.partial(_local, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        q_spec = logical_spec(("batch", "seq", "q_heads", "head_dim"), q.shape, mesh)
        k_spec = logical_spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, mesh)
        if q_spec[2] != k_spec[2]:  # kv heads not divisible by the head shards: keep heads whole
            q_spec = k_spec = logical_spec(("batch", "seq", None, None), q.shape, mesh)
        seg_spec = logical_spec(("batch", "seq"), seg.shape, mesh)
        run = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec), out_specs=q_spec,
                            check_vma=False)
    return run(q, k, v, seg)[:, :t]
