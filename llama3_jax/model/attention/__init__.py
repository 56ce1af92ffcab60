"""Attention backends behind one switch (the `attention` key of a train run).

Every backend has the same interface and the same masking rule (reference.py's docstring):

    attend(q, k, v, q_seg, k_seg, q_idx, k_idx) -> out
    q (B, T, H, K), k/v (B, S, KV, K), q_seg (B, T), k_seg (B, S), q_idx (T,) or (B, T), k_idx (S,)

    reference   plain jnp; float32 (B, H, T, S) scores: the oracle, fastest for short sequences on CPU
    blockwise   pure-JAX online softmax over blocks, custom VJP: O(T * block) memory on any backend
    splash      the Pallas TPU splash-attention kernel (interpret mode off TPU: tests only)
    cudnn       cuDNN flash attention with packed segments (NVIDIA GPU)
    auto        splash on TPU, cudnn on GPU, blockwise on CPU from BLOCKWISE_MIN_LEN tokens, else reference

splash and cudnn compute self-attention from slot 0 (training, prefill without a cache); the model
runs cached calls on the reference path whatever the choice, except one-token decode steps with
`decode_attention` (DECODE_NAMES) "window" or "ragged": decode.py reads only the cache blocks the rows
have filled (window: every row up to the longest, contiguous slices; ragged: each row its own blocks,
a gather). `decode_backend` returns that function (None for the reference). Over the paged KV cache
(paged_cache.py) decode steps take `paged_attention` (PAGED_NAMES): blockwise (decode.attend_paged,
XLA) or ragged_paged (the TPU kernel, ragged_paged.py); `resolve_paged` / `paged_backend`. `resolve` turns the user's choice
into a concrete backend for a platform and sequence length once, when the step is built; `get`
returns its function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp

from . import blockwise, decode, reference
from .reference import NEG_INF, attention, mask

NAMES = ("auto", "reference", "blockwise", "splash", "cudnn")
DECODE_NAMES = ("reference", "window", "ragged")  # cached one-token decode steps (Llama's decode_attention)
# decode steps over the paged KV cache (Llama's paged_attention): XLA's gather + online softmax
# (decode.attend_paged), or the TPU Pallas kernel (ragged_paged.py)
PAGED_NAMES = ("auto", "blockwise", "ragged_paged")
# On CPU the reference is faster for short rows (one big matmul); from here on its (T, T) float32
# scores cost more memory than the blockwise loops cost time (benchmarks/memory.py).
BLOCKWISE_MIN_LEN = 2048


def resolve(name: str, platform: str, seq_len: int) -> str:
    """The user's choice (NAMES) -> the concrete backend for `platform` ("cpu", "gpu", "tpu")."""
    if name not in NAMES:
        raise ValueError(f"attention must be one of {', '.join(NAMES)}; got {name!r}")
    if name == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu":
            try:
                from . import cudnn
                cudnn.check_available()
                return "cudnn"
            except ValueError:
                return "blockwise"
        return "blockwise" if seq_len >= BLOCKWISE_MIN_LEN else "reference"
    if name == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention=cudnn needs an NVIDIA GPU; the devices here are {platform} "
                             f"(use auto, blockwise or reference)")
        from . import cudnn
        cudnn.check_available()
    if name == "splash" and platform != "tpu":
        return "splash_interpret"  # Pallas interpret mode: the same kernel code on CPU, for tests
    return name


def decode_backend(name: str) -> Callable | None:
    """A DECODE_NAMES choice -> decode.py's function reading the whole stacked cache, or None (the
    reference over one layer's slots)."""
    return {"reference": None, "window": decode.attend_window, "ragged": decode.attend}[name]


def resolve_paged(name: str, platform: str, kv_dtype, head_dim: int = 128) -> str:
    """The user's PAGED_NAMES choice -> the backend for `platform` and the cache's dtype. auto: the
    kernel on TPU for a float cache with head_dim a multiple of 128 (every Llama 3), else blockwise. `platform` is the devices' (a compile-only TPU
    topology counts as TPU); the kernel runs nowhere else (jax's Pallas interpreters cannot run it)."""
    if name not in PAGED_NAMES:
        raise ValueError(f"paged_attention must be one of {', '.join(PAGED_NAMES)}; got {name!r}")
    integer = jnp.issubdtype(jnp.dtype(kv_dtype), jnp.integer)
    if name == "auto":
        fits = platform == "tpu" and not integer and head_dim % 128 == 0  # the kernel's lanes: 128 wide
        return "ragged_paged" if fits else "blockwise"
    if name == "ragged_paged":
        if integer:
            raise ValueError("paged_attention=ragged_paged reads a float KV cache; an int8 KV cache needs "
                             "paged_attention=blockwise (or auto)")
        if platform != "tpu":
            raise ValueError(f"paged_attention=ragged_paged is a TPU kernel; the devices here are {platform} "
                             "(use auto or blockwise)")
    return name


def reads_interleaved(name: str) -> bool:
    """Whether a resolved paged backend reads the interleaved pool layout (paged_cache.py): the kernel
    does, XLA's gather reads the split one."""
    return name == "ragged_paged"


def paged_backend(name: str) -> Callable:
    """A resolved paged backend -> its function (decode.attend_paged's interface)."""
    if name == "blockwise":
        return decode.attend_paged
    if name == "ragged_paged":
        from . import ragged_paged
        return ragged_paged.attend
    raise ValueError(f"unknown paged attention backend {name!r}")


def get(backend: str) -> Callable:
    """A resolved backend name -> its attend function."""
    if backend == "reference":
        return reference.attend
    if backend == "blockwise":
        return blockwise.attend
    if backend in ("splash", "splash_interpret"):
        from . import splash
        return functools.partial(splash.attend, interpret=backend == "splash_interpret")
    if backend == "cudnn":
        from . import cudnn
        return cudnn.attend
    raise ValueError(f"unknown attention backend {backend!r}")


__all__ = ["BLOCKWISE_MIN_LEN", "DECODE_NAMES", "NAMES", "PAGED_NAMES", "decode_backend", "paged_backend",
           "reads_interleaved", "resolve_paged", "NEG_INF", "attention", "get", "mask", "resolve"]
