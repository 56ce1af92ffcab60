"""The Llama 3 network in Flax NNX, readable top to bottom.

Parameters (one layout in memory and on disk; the layer weights are stacked on a leading `layers` axis,
so scanning or unrolling the layers is a runtime choice that never changes a checkpoint):

    embed                (vocab, embed)
    layers/attn_norm     (layers, embed)
    layers/wq            (layers, embed, q_heads, head_dim)
    layers/wk, wv        (layers, embed, kv_heads, head_dim)
    layers/wo            (layers, q_heads, head_dim, embed)
    layers/mlp_norm      (layers, embed)
    layers/w_gate, w_up  (layers, embed, mlp)
    layers/w_down        (layers, mlp, embed)
    norm                 (embed,)
    lm_head              (embed, vocab)    absent when embeddings are tied (Llama 3.2), or with a score head
    score                (embed, 1)        cfg.head = "score" only (a reward model): in place of the output
                                           layer, as transformers' LlamaForSequenceClassification(num_labels=1);
                                           `embed` then serves the input only, tied or not

A score head's model gives per-position rewards (B, T, 1); the reward of a sequence is the value at its
last token (`rewards_at`, train/objectives.py pair_last_positions). Int8 quantization refuses a score head
(config.py: a reward model is never the int8 generate/score path).

With cfg.quantization = "int8" the matrices (embed, the seven projections, lm_head) are int8, each with
a float32 `<name>_scale` over its output dims (quant.py); the norms stay float.

q/k use the HF "rotate half" rotary layout; the Meta converter permutes to and from it.
Einsum letters: b batch, t query positions, s key positions, n = b*t tokens, d model dim, h q heads,
k kv heads (or head dim in weight einsums), g heads per kv head, f mlp width, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from . import attention as attn
from . import paged_cache, quant, rope
from .config import ModelConfig
from .kv_cache import KVCache
from .paged_cache import PagedKVCache
from ..parallel.sharding import constrain

Remat = Literal["none", "full", "dots", "save_qkv_proj", "offload"]
# Activations a remat policy may keep (named with jax.ad_checkpoint.checkpoint_name in decoder_layer).
SAVEABLE = ("layer_in", "q_proj", "k_proj", "v_proj", "attn_out")


def remat_policy(name: str):
    """A `remat` name -> (rematerialise?, jax.checkpoint policy), following jax.checkpoint_policies:
    none (store every activation), full (store nothing; recompute the layer in the backward), dots
    (store matmul outputs without batch dims), save_qkv_proj (store only the q/k/v projections),
    offload (store each layer's input, q/k/v projections and attention output in host memory, as
    MaxText does for 405B: the per-layer inputs are what a scanned stack keeps for the backward)."""
    cp = jax.checkpoint_policies
    policies = {
        "none": (False, None),
        "full": (True, None),
        "dots": (True, cp.dots_with_no_batch_dims_saveable),
        "save_qkv_proj": (True, cp.save_only_these_names("q_proj", "k_proj", "v_proj")),
        "offload": (True, cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(SAVEABLE),
            offload_src="device", offload_dst="pinned_host")),
    }
    if name not in policies:
        raise ValueError(f"remat must be one of {', '.join(policies)}; got {name!r}")
    return policies[name]


def rms_norm(x, weight, eps: float):
    """RMSNorm in float32, cast back before the scale (as the reference does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the weights LoRA may adapt
# where each projection's input dims end in the per-layer layout (layer_specs): the rest are outputs
N_IN = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


class Adapters(NamedTuple):
    """LoRA adapters (lora.py) for `Llama.__call__`: `weights` name -> {"a", "b"} stacked on `layers`
    (one layer's slice inside `decoder_layer`); `key` (or None) drives dropout on their input."""
    weights: dict
    scale: float
    dropout: float = 0.0
    key: jax.Array | None = None


def _project(eq: str, h, w: dict, name: str, lora: Adapters | None, layer):
    """`h` through weight `name`, plus the low-rank delta scale * (h A) B when `lora` adapts it. An int8
    weight (its scale beside it in `w`) goes through quant.project."""
    scale = w.get(quant.scale_name(name))
    if scale is not None:
        return quant.project(h, w[name], scale, N_IN[name])
    y = jnp.einsum(eq, h, w[name].astype(h.dtype))
    if lora is None or name not in lora.weights:
        return y
    a, b = lora.weights[name]["a"].astype(h.dtype), lora.weights[name]["b"].astype(h.dtype)
    if lora.dropout and lora.key is not None:
        key = jax.random.fold_in(jax.random.fold_in(lora.key, layer), PROJECTIONS.index(name))
        h = h * jax.random.bernoulli(key, 1.0 - lora.dropout, h.shape).astype(h.dtype) / (1.0 - lora.dropout)
    n_in = a.ndim - 1
    return y + lora.scale * jnp.tensordot(jnp.tensordot(h, a, n_in), b, 1)


def decoder_layer(cfg: ModelConfig, w: dict, x, cos, sin, seg, cache_kv=None, cache_seg=None, index=0, layer=0,
                  lora: Adapters | None = None, attend=attn.reference.attend, cache_attend=None, cache_write=None):
    """One transformer block as a pure function of its weights `w` (one layer's slice).

    `attend` is the attention backend (attention/__init__.py: one interface, proven equal to the
    reference).
    x (B, T, D). Without a cache, keys are this call's tokens; with one, k/v are written at slots
    [index, index + T) of layer `layer` of cache_kv = (k, v), each the whole stacked (L, B, S, KV, K)
    buffer, and attention reads that layer's slots (the paged cache: cache_kv = (pool,), see below). Writing into the whole buffer (not a per-layer
    slice that is stacked again) keeps the update in place: no copy of the cache per decode step.
    `lora`: adapters whose weights are this layer's slices (LoRA fine-tuning), else None.
    `cache_attend`: with a cache, reads the whole stacked buffers itself (attention/decode.py: only the
    filled blocks, no per-layer slice of the cache); None: `attend` over this layer's slots.
    `cache_write(pool, layer, k, v) -> pool`: the paged cache's write (paged_cache.write: each row's
    token into its page); cache_kv is then (pool,) and only `cache_attend` reads it.
    Returns (x, (k, v) or None).
    """
    dt = x.dtype
    b, t, d = x.shape
    # training: the residual stream is split over positions (sharding.py `act_seq`); decoding keeps it
    # whole (nothing is saved for a backward, so splitting would only add collectives)
    resid = ("batch", "act_seq" if cache_kv is None else "seq", "act_embed")
    x = checkpoint_name(x, "layer_in")  # the residual stream a layer scan keeps per layer
    # Projections and the MLP see tokens as one flat axis n = b*t: the same math, but XLA:CPU runs the
    # backward of (n, d) matmuls about 2x faster than of 3-D einsums (benchmarks/train.py).
    h = rms_norm(x, w["attn_norm"], cfg.norm_eps).reshape(b * t, d)
    q = _project("nd,dhk->nhk", h, w, "wq", lora, layer).reshape(b, t, *w["wq"].shape[1:])
    k = _project("nd,dhk->nhk", h, w, "wk", lora, layer).reshape(b, t, *w["wk"].shape[1:])
    v = _project("nd,dhk->nhk", h, w, "wv", lora, layer).reshape(b, t, *w["wv"].shape[1:])
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    q, k, v = checkpoint_name(q, "q_proj"), checkpoint_name(k, "k_proj"), checkpoint_name(v, "v_proj")
    q_idx = index + jnp.arange(t)
    if cache_kv is None:
        keys, values, k_seg, k_idx, new_kv = k, v, seg, jnp.arange(t), None
    else:
        if cache_write is not None:  # the paged cache: one pool (cache_kv a 1-tuple), its own write rule
            new_kv = (cache_write(cache_kv[0], layer, k, v),)
        else:
            ck, cv = cache_kv
            ck = jax.lax.dynamic_update_slice(ck, quant.kv_store(k, ck.dtype)[None], (layer, 0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, quant.kv_store(v, cv.dtype)[None], (layer, 0, index, 0, 0))
            k_seg, k_idx, new_kv = cache_seg, jnp.arange(ck.shape[2]), (ck, cv)
            if cache_attend is None:
                keys, values = quant.kv_load(ck[layer], dt), quant.kv_load(cv[layer], dt)
    if cache_kv is not None and cache_attend is not None:  # reads the filled blocks of the stacked cache
        a = cache_attend(q, *new_kv, layer, seg, cache_seg, index, load=lambda c: quant.kv_load(c, dt)).astype(dt)
    else:
        a = attend(q, keys, values, seg, k_seg, q_idx, k_idx)
    a = checkpoint_name(a, "attn_out").reshape(b * t, *q.shape[2:])
    x = x + _project("nhk,hkd->nd", a, w, "wo", lora, layer).reshape(b, t, d)
    x = constrain(x, resid)
    h = rms_norm(x, w["mlp_norm"], cfg.norm_eps).reshape(b * t, d)
    gate = _project("nd,df->nf", h, w, "w_gate", lora, layer)
    up = _project("nd,df->nf", h, w, "w_up", lora, layer)
    x = x + _project("nf,fd->nd", jax.nn.silu(gate) * up, w, "w_down", lora, layer).reshape(b, t, d)
    return constrain(x, resid), new_kv


def output_logits(hidden, out_weight, scale=None, tied=False):
    """Final-norm hidden (B, T, D) x output projection (D, V) -> float32 logits (B, T, V). With `scale`
    (V,) the weight is int8: lm_head (D, V), or the embedding table (V, D) when `tied`."""
    b, t, d = hidden.shape
    # (b*t, d) x (d, v) as one 2-D matmul: XLA:CPU runs the backward of the 3-D einsum 2x slower
    if scale is not None:
        out = quant.matmul(hidden.reshape(b * t, d), out_weight, scale, contract=1 if tied else 0,
                           out_dtype=jnp.float32)
    else:
        out = jnp.einsum("nd,dv->nv", hidden.reshape(b * t, d), out_weight.astype(hidden.dtype),
                         preferred_element_type=jnp.float32)
    return constrain(out.reshape(b, t, -1), ("batch", "seq", "act_vocab"))


def rewards_at(hidden, score_w, index):
    """The score head at given positions: final-norm hidden (B, T, D), score_w (D, 1), index (B, P) int
    -> float32 rewards (B, P). Picks the P positions first, so the head never runs over all T."""
    picked = jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)  # (B, P, D)
    return jnp.einsum("bpd,d->bp", picked, score_w[:, 0].astype(hidden.dtype), preferred_element_type=jnp.float32)


def _param(rngs, shape, axes, std, dtype):
    if jnp.dtype(dtype) == jnp.int8:  # an int8 model is never initialised: it is restored (shapes only)
        return nnx.Param(jnp.zeros(shape, dtype), axes=axes)
    init = jnp.ones if std is None else (lambda s, d: std * jax.random.normal(rngs.params(), s, d))
    return nnx.Param(init(shape, dtype), axes=axes)


def _with_scales(specs: dict, cfg: ModelConfig, pd) -> dict:
    """name -> (shape, axes, std, dtype); int8 models add each matrix's float32 scale (quant.py)."""
    out = {}
    for name, (shape, axes, std) in specs.items():
        if cfg.quantization is None or std is None:  # float model, or a norm
            out[name] = (shape, axes, std, pd)
            continue
        n_in = N_IN[name]
        out[name] = (shape, axes, std, jnp.int8)
        out[quant.scale_name(name)] = (shape[n_in:], axes[n_in:], None, jnp.float32)
    return out


def layer_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], float | None]]:
    """Per-layer weights: name -> (shape, logical axes, init std or None for ones)."""
    D, H, KV, K, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    std = 0.02
    return {
        "attn_norm": ((D,), ("norm",), None),
        "wq": ((D, H, K), ("embed", "q_heads", "head_dim"), std),
        "wk": ((D, KV, K), ("embed", "kv_heads", "head_dim"), std),
        "wv": ((D, KV, K), ("embed", "kv_heads", "head_dim"), std),
        "wo": ((H, K, D), ("q_heads", "head_dim", "embed"), std),
        "mlp_norm": ((D,), ("norm",), None),
        "w_gate": ((D, F), ("embed", "mlp"), std),
        "w_up": ((D, F), ("embed", "mlp"), std),
        "w_down": ((F, D), ("mlp", "embed"), std),
    }


class _CachePlan(NamedTuple):
    """How one `Llama.__call__` hands the cache to decoder_layer: write slot `index` on, the cache's
    `segment_ids` after this call's write, the buffers `kv` carried through the layers, and the paged
    cache's `write` / the decode backend's `attend` (None: decoder_layer's defaults)."""
    index: jax.Array | int
    segment_ids: jax.Array | None
    kv: tuple | None
    write: Callable | None
    attend: Callable | None


class Llama(nnx.Module):
    """Llama 3. `scan_layers`, `split_layers`, `remat` and `attention` are runtime choices over the same
    weights (`attention`: a backend resolved by attention.resolve, for calls without a cache; cached
    calls run the reference, whose masks handle a partly filled cache; `decode_attention` "window" or
    "ragged" makes one-token decode steps read only the filled cache blocks (attention/decode.py);
    `paged_attention` a resolved attention.PAGED_NAMES backend for decode steps over a paged cache).

    By default the layer weights are stacked (layers, ...) arrays, scanned or unrolled. With
    `split_layers=True` each layer owns separate arrays (an nnx.List, always unrolled): XLA:CPU streams
    those at about twice the bandwidth of slices of a stacked array, which is what decoding is bound
    by (see benchmarks/decode.py). Checkpoints always hold the stacked layout: `split_layer_params` and
    `stack_layer_params` convert at that boundary.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, scan_layers: bool = True, remat: Remat = "none",
                 split_layers: bool = False, attention: str = "reference", decode_attention: str = "reference",
                 paged_attention: str = "blockwise"):
        remat_policy(remat)  # refuse an unknown name here, not at the first call
        attn.get(attention)
        if decode_attention not in attn.DECODE_NAMES:
            raise ValueError(f"decode_attention must be one of {', '.join(attn.DECODE_NAMES)}; "
                             f"got {decode_attention!r}")
        self.cfg = cfg
        self.attention = attention
        self.decode_attention = decode_attention
        attn.paged_backend(paged_attention)  # a resolved name (attention.resolve_paged)
        self.paged_attention = paged_attention
        self.scan_layers = scan_layers and not split_layers
        self.split_layers = split_layers
        self.remat = remat
        pd = jnp.dtype(cfg.param_dtype)
        L, D, V = cfg.n_layers, cfg.dim, cfg.vocab_size
        std = 0.02
        q8 = cfg.quantization is not None
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), std, jnp.int8 if q8 else pd)
        if q8:  # per row: the tied output projection's per-output-channel scale
            self.embed_scale = _param(rngs, (V,), ("vocab",), None, jnp.float32)
        specs = _with_scales(layer_specs(cfg), cfg, pd)
        if split_layers:
            self.layers = nnx.List([nnx.Dict({n: _param(rngs, shape, axes, init, dt)
                                              for n, (shape, axes, init, dt) in specs.items()}) for _ in range(L)])
        else:
            self.layers = nnx.Dict({n: _param(rngs, (L, *shape), ("layers", *axes), init, dt)
                                    for n, (shape, axes, init, dt) in specs.items()})
        self.norm = _param(rngs, (D,), ("norm",), None, pd)
        if cfg.head == "score":  # a reward model: a scalar head, no output layer (int8 refused by config.py)
            self.score = _param(rngs, (D, 1), ("embed", None), std, pd)  # transformers' init: N(0, 0.02)
        elif not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), std, jnp.int8 if q8 else pd)
            if q8:
                self.lm_head_scale = _param(rngs, (V,), ("vocab",), None, jnp.float32)

    def __call__(self, tokens, positions, segment_ids, cache: KVCache | None = None, last_only: bool = False,
                 hidden_only: bool = False, lora: Adapters | None = None):
        """tokens, positions, segment_ids: (B, T) int32 (segment 0 = padding).

        Returns float32 logits (B, T, vocab) and the updated cache (None without one); a score head
        (cfg.head "score") gives float32 rewards (B, T, 1) at every position instead. `last_only` gives
        logits (B, 1, vocab) of the last slot only: prefill of left-padded prompts needs no more, and
        B * T * vocab float32 logits would dominate its memory. `hidden_only` returns the final-norm
        hidden states (B, T, D) in the compute dtype instead of logits: the chunked loss (losses.py)
        applies `output_weight()` a chunk at a time, so the (tokens, vocab) logits never exist at once.
        `lora`: LoRA adapters added to the projections (stacked layouts only; serving uses merged weights).
        """
        x = self._embed(tokens, cache)
        cos, sin = rope.cos_sin(positions, self.cfg)
        plan = self._cache_plan(cache, tokens, positions, segment_ids)
        attend = attn.get("reference" if cache is not None else self.attention)
        self._check_lora(lora)
        layer = self._layer_fn(cos, sin, segment_ids, plan, attend, lora)
        x, new_kv = self._layer_stack(layer, x, plan.kv, None if lora is None else lora.weights)
        x = self._final_norm(x, last_only)
        out = x if hidden_only else self._logits(x)
        return out, None if cache is None else self._new_cache(cache, new_kv, plan.segment_ids, plan.index, tokens)

    def _embed(self, tokens, cache):
        """tokens (B, T) -> embeddings (B, T, D) in the compute dtype, split as the residual stream."""
        dt = jnp.dtype(self.cfg.dtype)
        # gather from the table with its model dim whole (all-gathered over fsdp, as for any weight):
        # a gather whose output is sharded on the model dim cannot be resharded to the batch cheaply
        # cast BEFORE the constraint: the all-gather then moves the table in the compute dtype (half the
        # bytes in bfloat16; for 8B under fsdp the float32 gather was 2.1 GB per device per step)
        if self.cfg.quantization is not None:  # gather int8 rows, then scale them (the table is never float)
            x = quant.embed_lookup(constrain(self.embed[...], ("vocab", None)), self.embed_scale[...], tokens, dt)
        else:
            table = constrain(self.embed[...].astype(dt), ("vocab", None))
            x = jnp.take(table, tokens, axis=0)
        return constrain(x, ("batch", "seq" if cache is not None else "act_seq", "act_embed"))

    def _cache_plan(self, cache, tokens, positions, segment_ids) -> _CachePlan:
        """How this call's layers read and write `cache` (decoder_layer's cache arguments)."""
        one_token = cache is not None and tokens.shape[1] == 1
        cache_attend = attn.decode_backend(self.decode_attention) if one_token else None
        if cache is None:
            return _CachePlan(0, None, None, None, cache_attend)
        if isinstance(cache, PagedKVCache):  # decode steps only: prompts are prefilled contiguous, then placed
            if not one_token:
                raise ValueError("a paged KV cache takes one-token decode steps (prefill into a KVCache, then "
                                 "paged_cache.place)")
            layout = {True: "interleaved", False: "split"}
            wants = attn.reads_interleaved(self.paged_attention)
            if cache.interleaved != wants:
                raise ValueError(f"paged_attention={self.paged_attention} reads the {layout[wants]} pool layout; "
                                 f"this cache is {layout[cache.interleaved]} (paged_cache.py)")
            where = dict(table=cache.table, positions=positions[:, 0])
            return _CachePlan(0, None, (cache.kv,),
                              functools.partial(paged_cache.write, interleaved=cache.interleaved, **where),
                              functools.partial(attn.paged_backend(self.paged_attention), **where))
        cache.check_write(tokens.shape[1])  # dynamic_update_slice would clamp silently
        index = cache.index
        cache_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, index))
        return _CachePlan(index, cache_seg, (cache.k, cache.v), None, cache_attend)

    def _check_lora(self, lora: Adapters | None) -> None:
        if lora is not None and self.split_layers:
            raise ValueError("LoRA adapters need the stacked layer layout (merge them to serve)")
        if lora is not None and self.cfg.quantization is not None:
            raise ValueError("LoRA adapters need float weights, not an int8 model")

    def _layer_fn(self, cos, sin, segment_ids, plan: _CachePlan, attend, lora: Adapters | None):
        """`layer(x, w, kv, i, lw) -> (x, kv)`: decoder_layer with this call's inputs bound, under the
        remat policy; `lw` is layer i's slice of the LoRA weights (or None)."""
        cfg = self.cfg

        def layer(x, w, kv, i, lw=None):
            ad = None if lw is None else lora._replace(weights=lw)
            return decoder_layer(cfg, w, x, cos, sin, segment_ids, kv, plan.segment_ids, plan.index, i, ad,
                                 attend=attend, cache_attend=plan.attend, cache_write=plan.write)

        rematerialise, policy = remat_policy(self.remat)
        return jax.checkpoint(layer, policy=policy) if rematerialise else layer

    def _layer_stack(self, layer, x, kv, lw):
        """x through every layer: scanned over the stacked weights, or unrolled (per-layer arrays, or
        slices of the stacked ones). Returns (x, the updated cache buffers)."""
        # the whole cache is carried through the layers (not scanned as xs/ys, which would copy it)
        if self.scan_layers:
            weights = {name: p[...] for name, p in self.layers.items()}

            def body(carry, xs):
                x, kv = carry
                w, lwi, i = xs
                return layer(x, w, kv, i, lwi), None
            (x, new_kv), _ = jax.lax.scan(body, (x, kv), (weights, lw, jnp.arange(self.cfg.n_layers)))
            return x, new_kv
        if self.split_layers:
            per_layer = [{n: p[...] for n, p in w.items()} for w in self.layers]
        else:
            stacked = {name: p[...] for name, p in self.layers.items()}
            per_layer = [{n: a[i] for n, a in stacked.items()} for i in range(self.cfg.n_layers)]
        new_kv = kv
        for i, w in enumerate(per_layer):
            x, new_kv = layer(x, w, new_kv, i, None if lw is None else jax.tree.map(lambda a: a[i], lw))
        return x, new_kv

    def _final_norm(self, x, last_only: bool):
        """The last layer's output -> final-norm hidden states (B, T or 1, D)."""
        x = constrain(x, ("batch", "seq", "act_embed"))  # positions whole again for the output layer
        if last_only:
            x = x[:, -1:]
        return rms_norm(x, self.norm[...], self.cfg.norm_eps)

    def _logits(self, x):
        """Final-norm hidden (B, T, D) -> float32 logits (B, T, vocab); int8 weights multiply as int8. A
        score head: float32 rewards (B, T, 1)."""
        if self.cfg.head == "score":
            return jnp.einsum("btd,dl->btl", x, self.score[...].astype(x.dtype), preferred_element_type=jnp.float32)
        if self.cfg.quantization is not None:
            tied = self.cfg.tie_embeddings
            w, s = (self.embed, self.embed_scale) if tied else (self.lm_head, self.lm_head_scale)
            return output_logits(x, w[...], s[...], tied=tied)
        return output_logits(x, self.output_weight())

    def output_weight(self):
        """The output projection (D, vocab) in the compute dtype: `lm_head`, or the embedding table
        transposed when tied (Llama 3.2); of an int8 model, dequantised. A reward model has none."""
        if self.cfg.head == "score":
            raise ValueError("head=score: a reward model has no output layer (its `score` head gives rewards, "
                             "not next-token logits)")
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.quantization is not None:
            if self.cfg.tie_embeddings:
                return quant.dequantize(self.embed[...], self.embed_scale[...], (1,), dt).T
            return quant.dequantize(self.lm_head[...], self.lm_head_scale[...], (0,), dt)
        return self.embed[...].astype(dt).T if self.cfg.tie_embeddings else self.lm_head[...].astype(dt)

    @staticmethod
    def _new_cache(cache, new_kv, cache_seg, index, tokens):
        if isinstance(cache, PagedKVCache):
            return dataclasses.replace(cache, kv=new_kv[0])
        return KVCache(k=new_kv[0], v=new_kv[1], segment_ids=cache_seg, index=index + tokens.shape[1])


def split_layer_params(params: dict) -> dict:
    """Stacked pure params (checkpoint layout) -> per-layer arrays for `split_layers=True`.

    Slices one weight name at a time and drops the stacked array at once (the caller should hold no
    other reference), so the peak is the model plus one stacked weight.
    """
    stacked = dict(params["layers"])
    n = next(iter(stacked.values())).shape[0]
    per_layer: list[dict] = [{} for _ in range(n)]
    for name in list(stacked):
        a = stacked.pop(name)
        for i in range(n):
            per_layer[i][name] = jnp.array(a[i])  # a copy: a view would keep the stacked buffer alive
        del a
    return {**params, "layers": dict(enumerate(per_layer))}


def quantize_params(params: dict, cfg: ModelConfig) -> dict:
    """Float params (stacked checkpoint layout) -> the int8 layout of `cfg` with quantization="int8"
    (module docstring; numerics in quant.py). Each float matrix is dropped once its int8 form exists
    (pass the caller's only reference), so the peak is the float model plus one int8 matrix."""
    params, layers = dict(params), dict(params["layers"])
    for name in PROJECTIONS:  # stacked (layers, *in, *out): the inputs are axes 1..n_in
        w = layers.pop(name)
        layers[name], layers[quant.scale_name(name)] = quant.quantize_jit(w, tuple(range(1, 1 + N_IN[name])))
        del w
    params["layers"] = layers
    w = params.pop("embed")
    params["embed"], params["embed_scale"] = quant.quantize_jit(w, (1,))  # per row (vocab)
    del w
    if not cfg.tie_embeddings:
        w = params.pop("lm_head")
        params["lm_head"], params["lm_head_scale"] = quant.quantize_jit(w, (0,))  # per vocab column
        del w
    return params


def stack_layer_params(params: dict) -> dict:
    """The inverse of `split_layer_params`."""
    layers = [params["layers"][i] for i in sorted(params["layers"])]
    return {**params, "layers": {n: jnp.stack([w[n] for w in layers]) for n in layers[0]}}


def abstract_model(cfg: ModelConfig, **kwargs) -> Llama:
    """Shapes only; nothing allocated. Restore and sharded init start from this."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), **kwargs))
