"""cuDNN flash attention (NVIDIA GPU), with packed documents as cuDNN's "packed layout".

Why not `jax.nn.dot_product_attention(implementation="cudnn")` as is: in jax 0.10.2 its only masks are
causal, right padding (`query_seq_lengths`) and a dense (B, N, T, S) boolean `mask`, which is turned
into a bias and brings back the quadratic memory this backend exists to avoid. The cuDNN call under
it (`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`) also takes `q_offsets` /
`kv_offsets`: each row is a list of packed segments, each attended causally and only to itself —
exactly our segment rule. That entry point is private to jax, so it is imported here only and checked
at selection time; it needs a Hopper (sm90) GPU or newer for packed segments, a head dim that is a
multiple of 8 and at most 256, and bfloat16/float16 inputs.

Segments come from the segment ids as runs of equal non-zero ids (the data pipeline packs each
document contiguously); segment 0 (padding, left or right) is in no run and its output rows are
unspecified (no real token reads them). M, the static number of runs per row, is T (every token could
be a one-token document), so no packing is ever cut short.
Like splash: self-attention from slot 0 only (training and prefill); decoding stays on the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _runs(seg):
    """seg (B, T) -> offsets (B, T + 1), lengths (B, T): start and length of each run of one non-zero
    segment id, in order, padded with -1."""
    b, t = seg.shape
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    nxt = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    starts = (seg != 0) & (seg != prev)
    ends = (seg != 0) & (seg != nxt)
    first = jax.vmap(lambda m: jnp.nonzero(m, size=t, fill_value=-1)[0])
    s, e = first(starts), first(ends)
    lengths = jnp.where(s >= 0, e - s + 1, -1).astype(jnp.int32)
    return jnp.pad(s, ((0, 0), (0, 1)), constant_values=-1).astype(jnp.int32), lengths


def attend(q, k, v, q_seg, k_seg=None, q_idx=None, k_idx=None):
    """q (B, T, H, K), k/v (B, T, KV, K), q_seg (B, T) -> (B, T, H, K) (GQA handled by cuDNN)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    del k_seg, q_idx, k_idx  # self-attention: the same segments and slots
    offsets, lengths = _runs(q_seg.astype(jnp.int32))
    return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                 kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                 mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def check_available() -> None:
    """Raise a one-line ValueError when cuDNN attention cannot run in this process."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        check_cudnn_version()
    except Exception as e:  # noqa: BLE001 - any failure means "not here"; say why in one line
        raise ValueError(f"attention=cudnn: cuDNN flash attention is not available here "
                         f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
