"""Blockwise ("flash") attention in pure JAX: online softmax over key blocks, one query block at a time.

Memory is O(T * block) instead of the reference's O(T * S): the float32 scores exist for one
(query block, key block) pair at a time. The gradient is a custom VJP that recomputes the scores
block by block from the saved log-sum-exp (FlashAttention-2's backward), so the backward is also
O(T * block); the residuals are q, k, v, the output and the (B, H, T) log-sum-exp.

Masking follows the reference (same non-zero segment, key slot <= query slot). A block pair in which
no query may see any key (above the causal diagonal, or between different packed documents, or all
padding) is skipped with `lax.cond`: its scores are never computed, forward or backward, which halves
the work of causal attention. Rows with nothing to attend (padding, segment 0) come out as zeros; the
reference gives them the mean of the values instead; no real token ever reads a padding row.

Works on every backend (the CPU default above a length threshold, see attention/__init__.py).
Einsum letters as in model/llama.py: b batch, t query slots, s key slots, k kv heads, g heads per kv head,
d head dim; a leading n is the block number.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .reference import NEG_INF

BLOCK = 512  # default query and key block (slots); scores per block pair: B*H*BLOCK^2 float32
F32 = jnp.float32


def _allowed(q_seg, q_idx, k_seg, k_idx):
    """(B, bq) x2, (B, bk) x2 -> bool (B, bq, bk): the reference's rule on one block pair (a negative
    key segment: a shared prefix)."""
    same = ((q_seg[:, :, None] == k_seg[:, None, :]) | (k_seg[:, None, :] < 0)) & (q_seg[:, :, None] != 0)
    return same & (k_idx[:, None, :] <= q_idx[:, :, None])


def _forward(scale, qb, kb, vb, qs, qi, ks, ki):
    """Blocked inputs (leading block axis n) -> out (nq, B, bq, KV, G, K), lse (nq, B, KV, G, bq)."""
    nk = kb.shape[0]

    def q_block(_, xs):
        q, s_q, i_q = xs
        b, bq, kv, g, _ = q.shape

        def kv_block(j, carry):
            allowed = _allowed(s_q, i_q, ks[j], ki[j])

            def compute(carry):
                m, l, acc = carry
                s = jnp.einsum("btkgd,bskd->bkgts", q, kb[j], preferred_element_type=F32) * scale
                s = jnp.where(allowed[:, None, None], s, NEG_INF)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(allowed[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgts,bskd->btkgd", p.astype(vb.dtype), vb[j], preferred_element_type=F32)
                return m_new, l * corr + p.sum(-1), acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv

            return jax.lax.cond(jnp.any(allowed), compute, lambda c: c, carry)

        init = (jnp.full((b, kv, g, bq), NEG_INF, F32), jnp.zeros((b, kv, g, bq), F32),
                jnp.zeros(q.shape, F32))
        # a traced trip count makes this a while loop, not a scan: differentiating an enclosing layer
        # scan would otherwise stack this loop's per-block scores as residuals (quadratic memory)
        m, l, acc = jax.lax.fori_loop(0, jnp.int32(nk), kv_block, init)
        safe = jnp.where(l == 0, 1.0, l)
        out = acc / jnp.moveaxis(safe, -1, 1)[..., None]
        return None, (out.astype(q.dtype), m + jnp.log(safe))

    _, (out, lse) = jax.lax.scan(q_block, None, (qb, qs, qi))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(scale, qb, kb, vb, qs, qi, ks, ki):
    return _forward(scale, qb, kb, vb, qs, qi, ks, ki)[0]


def _blocked_fwd(scale, qb, kb, vb, qs, qi, ks, ki):
    out, lse = _forward(scale, qb, kb, vb, qs, qi, ks, ki)
    return out, (qb, kb, vb, qs, qi, ks, ki, out, lse)


def _blocked_bwd(scale, res, dout):
    """Outer scan over key blocks (dk, dv finished per block), inner loop over query blocks adding
    into one float32 dq buffer carried in place."""
    qb, kb, vb, qs, qi, ks, ki, out, lse = res
    nq = qb.shape[0]
    delta = jnp.einsum("nbtkgd,nbtkgd->nbkgt", dout.astype(F32), out.astype(F32))

    def k_block(dq, xs):
        k, v, s_k, i_k = xs

        def q_block(i, carry):
            allowed = _allowed(qs[i], qi[i], s_k, i_k)

            def compute(carry):
                dq, dk, dv = carry
                q, do = qb[i], dout[i]
                s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) * scale
                p = jnp.where(allowed[:, None, None], jnp.exp(s - lse[i][..., None]), 0.0)
                dv = dv + jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), do, preferred_element_type=F32)
                dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=F32)
                ds = (p * (dp - delta[i][..., None]) * scale).astype(q.dtype)
                dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=F32)
                dq = dq.at[i].add(jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=F32))
                return dq, dk, dv

            return jax.lax.cond(jnp.any(allowed), compute, lambda c: c, carry)

        zero = jnp.zeros(k.shape, F32)
        dq, dk, dv = jax.lax.fori_loop(0, jnp.int32(nq), q_block, (dq, zero, zero))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(qb.shape, F32), (kb, vb, ks, ki))
    return dq.astype(qb.dtype), dk, dv, None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _to_blocks(x, block: int, fill=0):
    """(B, T, ...) -> (ceil(T / block), B, block, ...), padded at the end with `fill`."""
    t = x.shape[1]
    n = math.ceil(t / block)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * block - t)
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(x.shape[0], n, block, *x.shape[2:]).swapaxes(0, 1)


def short_block(n: int) -> int:
    """The default block of a sequence shorter than BLOCK: an eighth of its power-of-two bucket, at least
    16 slots. One block would compute every pair; small ones skip the masked pairs, which in GRPO's
    packed rows (train/grpo_batch.py: completions that never see each other) are most of them (a
    224-slot row on CPU: ~2x faster than one block or the reference, backward included)."""
    return n if n >= BLOCK else max(16, (1 << max(n - 1, 0).bit_length()) // 8)


def attend(q, k, v, q_seg, k_seg, q_idx, k_idx, *, block_q: int | None = None, block_k: int | None = None):
    """q (B, T, H, K), k/v (B, S, KV, K), q_seg (B, T), k_seg (B, S), q_idx (T,) or (B, T), k_idx (S,)
    or (B, S) -> (B, T, H, K). T and S need not be multiples of the blocks (padded as segment 0).
    Blocks default to BLOCK, or `short_block` for sequences shorter than that."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    bq = min(block_q or min(BLOCK, short_block(t)), t)
    bk = min(block_k or min(BLOCK, short_block(s)), s)
    q_idx = jnp.broadcast_to(q_idx, (b, t)).astype(jnp.int32)
    k_idx = jnp.broadcast_to(k_idx, (b, s)).astype(jnp.int32)
    qb = _to_blocks(q.reshape(b, t, kv, h // kv, d), bq)
    out = _blocked(d ** -0.5, qb, _to_blocks(k, bk), _to_blocks(v, bk),
                   _to_blocks(q_seg.astype(jnp.int32), bq), _to_blocks(q_idx, bq),
                   _to_blocks(k_seg.astype(jnp.int32), bk), _to_blocks(k_idx, bk))
    out = out.swapaxes(0, 1).reshape(b, -1, h, d)
    return out[:, :t]
