"""The decoding engine: `Generator`, the public class that restores once and takes requests.

Shapes: B batch, P padded prompt, N max new tokens, S = P + N cache slots, V vocab.

Generator holds the state (parameters, graphdef, jitted programs, the reusable KV cache) and the
request API (generate / request / generate_requests / score); the other jobs live in their own files:
restore.py (parameters: restore, cast, quantise, split), caches.py (new KV caches with their
sharding), scheduler.py + slots.py (continuous batching), static_batch.py (the static path),
scoring.py (log-probs of given completions), request.py (how a row ends), padding.py.

By default rows run through a fixed number of decode slots refilled as rows finish (continuous
batching). The static path (`continuous=False`) decodes whole batches; it is kept for the benchmark
comparison. Per batch, one call of one jitted function does everything:
  * prompts are LEFT-padded to a power-of-two bucket P (few compiles; with `prefill_chunk` a long prompt
    to a multiple of the chunk, prefilled a chunk at a time), so every row's last prompt token
    sits in the same slot and all rows write the same cache slot each step (see kv_cache.py);
  * prefill runs the ragged batch in one pass: per-row positions restart at 0 at the first real token,
    padding has segment 0 and is masked;
  * the decode loop is a `lax.while_loop` with a per-row done mask (stop token hit, or a padding row),
    so there is no Python work per token; it exits when every row is done or after max_new steps;
  * the KV cache (L, B, P + max_new, KV, K) is allocated once per batch shape with the sharding the
    logical rules give (`batch`, `kv_heads`), donated to the call and written in place with
    dynamic_update_slice; the call hands it back and the next batch of the same shape reuses it;
  * without a max_new_tokens each row may run to the end of the context: the batch decodes FIRST_CHUNK
    tokens, then, while a row has room and has not stopped, the cache and out buffer double
    (`static_batch.extend_batch`), so memory follows the longest answer rather than a 128K context.
The model runs as a pure function: `nnx.merge(graphdef, params)` inside jit (no nnx.jit per token).
Prefill asks the model for the last slot's logits only (B x P x V float32 logits would dominate memory).
Several processes (multihost_io.py): every process passes the same host arrays (`device_put` keeps
its shards of them) and reads results back gathered (`to_host`), so each runs the same steps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model import attention as attn
from ..model.config import ModelConfig
from ..model.kv_cache import KVCache
from ..model.llama import abstract_model
from ..model.paged_cache import PagedKVCache
from ..parallel.multihost_io import to_host
from ..parallel.sharding import mesh_scope, put
from ..store import checkpoint
from . import caches, restore
from . import sampling as sampling_lib
from .padding import left_pad, left_padded_batches
from .request import Completion, Request
from .reward import check_policy_model
from .scheduler import Scheduler
from .scoring import Scored, score_batch, scored_rows, top_logprobs_batch
from .slots import bucket
from .static_batch import extend_batch, generate_batch, static_batches

STOP_SLOTS = 8  # stop-id arrays are padded with -1 to a multiple of this: one compile for any stop set

__all__ = ["Completion", "Generator", "Request", "Scored"]


class Generator:
    """Batched generation and scoring with one restored checkpoint.

        gen = Generator("ckpt/", dtype="bfloat16")
        [c] = gen.generate(["The capital of France is"], max_new_tokens=16, sampling=TopP(0.9, 0.7), seed=1)
        c.text, c.tokens, c.finish_reason

    `dtype` is the compute dtype; with bfloat16 the parameters are cast once at restore (orbax casts into
    the abstract target), halving the bytes each decode step reads. `mesh` (sharding.make_mesh) shards
    parameters and the KV cache by the logical rules; None runs on the first device. `split_layers`
    keeps each layer's weights in separate arrays (default: on CPU, where that doubles decode speed;
    stacked and scanned elsewhere). `quantize="int8"` makes the matrices int8 at load (quant.py; a
    checkpoint written by `convert --quantize int8` is int8 already and loads as it is).
    `kv_cache_dtype` (default: the compute dtype) may be "int8": K and V stored int8 with a scale per
    (position, kv head). `decode_attention` ("auto" or attention.DECODE_NAMES): how a decode
    step reads the cache; auto is "window" on one device, with or without a 1-device mesh (only the
    blocks up to the longest live row, attention/decode.py; on CPU ~4x faster than the reference at
    batch 32 over a 2048-slot cache), the reference on a mesh of several devices (not yet tried
    there: its slices run along the unsharded slot axis, so it may well work as is).
    `prefill_chunk` N: prompts longer than N tokens are padded to a multiple of N (not the next power
    of two) and prefilled N tokens at a time (slots.prefill; under continuous batching one chunk per
    host visit while the other rows decode): bounded activation memory.
    `min_prompt_width` N: every prompt is padded as one of at least N tokens (slots.prompt_width), so
    prompts of many lengths share one prefill program and one cache size (RL rollouts: N = the longest
    prompt a run takes, and no step compiles anything after the first).
    `kv_pages` N (continuous batching; one device or a mesh, the pool's kv heads split over `tensor`): a paged KV cache of N pages of `page_size` slots
    shared by all rows (paged_cache.py); a row holds ceil((prompt + max_new_tokens) / page_size) pages
    while it runs, so memory follows the rows' lengths; decode steps read each row's pages only, with
    `paged_attention` (attention.PAGED_NAMES; auto: the TPU ragged_paged_attention kernel on TPU for a
    float cache, XLA's blockwise gather elsewhere).
    """

    def __init__(self, checkpoint_dir: str | Path | None = None, dtype: str = "bfloat16", mesh=None, *,
                 tokenizer=None, cfg: ModelConfig | None = None, params: dict | None = None,
                 split_layers: bool | None = None, quantize: str | None = None, kv_cache_dtype: str | None = None,
                 decode_attention: str = "auto", prefill_chunk: int | None = None, kv_pages: int | None = None,
                 page_size: int = 64, paged_attention: str = "auto", min_prompt_width: int = 0):
        restore.check_options(dtype, quantize, kv_cache_dtype)
        if cfg is not None or checkpoint_dir is not None:  # before the restore: a reward model cannot decode
            check_policy_model(cfg if cfg is not None else restore.model_config(checkpoint_dir))
        cfg, params, split_layers = restore.load_params(checkpoint_dir, dtype, mesh, cfg, params, quantize,
                                                        split_layers)
        self.kv_dtype = jnp.dtype(kv_cache_dtype or dtype)
        self.cfg, self.params, self.mesh, self.dtype = cfg, params, mesh, dtype
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if min_prompt_width < 0:
            raise ValueError(f"min_prompt_width must be >= 0, got {min_prompt_width}")
        self.min_prompt_width = min_prompt_width
        if kv_pages is not None:
            if kv_pages < 1 or page_size < 1:
                raise ValueError(f"kv_pages and page_size must be >= 1, got {kv_pages} and {page_size}")
        self.kv_pages, self.page_size = kv_pages, page_size
        if decode_attention == "auto":
            decode_attention = "window" if mesh is None or mesh.size == 1 else "reference"
        self.decode_attention = decode_attention
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        self.paged_attention = attn.resolve_paged(paged_attention, platform, self.kv_dtype, cfg.head_dim)
        self.graphdef, _ = nnx.split(abstract_model(cfg, split_layers=split_layers, decode_attention=decode_attention,
                                                    paged_attention=self.paged_attention))
        if tokenizer is None and checkpoint_dir is not None and checkpoint.is_checkpoint(checkpoint_dir):
            # the one it was trained with (train records it); a Meta directory has no config.json: Llama 3's
            tokenizer = checkpoint.load_tokenizer_spec(checkpoint_dir)
        self._tokenizer = tokenizer
        self._cache: KVCache | None = None
        self._pool: PagedKVCache | None = None
        self._scheduler: Scheduler | None = None
        self._generate = jax.jit(functools.partial(generate_batch, self.graphdef, prefill_chunk=prefill_chunk),
                                 static_argnames=("max_new",), donate_argnames=("cache",))
        self._extend = jax.jit(functools.partial(extend_batch, self.graphdef),  # no donation: it grows
                               static_argnames=("max_new",))
        self._score = jax.jit(functools.partial(score_batch, self.graphdef))
        self._top = jax.jit(functools.partial(top_logprobs_batch, self.graphdef))

    def set_params(self, params: dict) -> None:
        """Decode with `params` from now on. They must be in the layout this engine holds (its dtype, split
        or stacked layers, int8 or not) with the same shapes, dtypes and shardings, so every compiled
        program is reused (serve/rollout.py swaps in an RL run's live weights each step). Raises
        ValueError naming the first array that differs: a swap that silently recompiled every program, or
        decoded with a wrong layout, is what this catches."""
        have, tree = jax.tree_util.tree_flatten_with_path(self.params)
        got, got_tree = jax.tree_util.tree_flatten_with_path(params)
        if got_tree != tree:
            raise ValueError(f"set_params: the parameter tree differs from the engine's ({len(got)} arrays, "
                             f"the engine holds {len(have)})")
        for (path, a), (_, b) in zip(have, got):
            same = a.shape == b.shape and a.dtype == b.dtype
            if not same or not b.sharding.is_equivalent_to(a.sharding, a.ndim):
                raise ValueError(f"set_params: {jax.tree_util.keystr(path)} is {b.dtype}{list(b.shape)} on "
                                 f"{b.sharding}; the engine holds {a.dtype}{list(a.shape)} on {a.sharding}")
        self.params = params

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self):
        """The Llama 3 tokenizer (loaded on first use; a path or a Tokenizer may be given)."""
        from ..tokenizer import load_tokenizer
        if not hasattr(self._tokenizer, "decode"):
            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def default_stop_ids(self) -> list[int]:
        """The config's eos_ids plus the tokenizer's stop tokens (<|end_of_text|>, <|eom_id|>,
        <|eot_id|>) where they exist in this model's vocabulary."""
        ids = set(self.cfg.eos_ids)
        try:
            ids |= set(self.tokenizer.stop_tokens)
        except (ModuleNotFoundError, FileNotFoundError):
            pass
        return sorted(i for i in ids if 0 <= i < self.cfg.vocab_size)

    def check_ids(self, ids: Sequence[int], field: str | None = None) -> None:
        """Raise ValueError unless `ids` is a non-empty list of in-vocabulary token ids; `field` (e.g.
        "'completion_tokens'") names where they came from in the message."""
        where = f"{field}: " if field else ""
        if len(ids) == 0:
            raise ValueError(f"{field} is empty" if field else "empty prompt")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"{where}token {i} is {t!r}, not an integer id")
            if not 0 <= t < self.cfg.vocab_size:
                raise ValueError(f"{where}token id {t} (position {i}) is outside the model's vocabulary "
                                 f"[0, {self.cfg.vocab_size})")

    def context_error(self, n_prompt: int, max_new_tokens: int = 0) -> str | None:
        """Why a prompt of n_prompt tokens (+ max_new_tokens) does not fit the context, or None."""
        ctx = self.cfg.max_seq_len
        if n_prompt >= ctx:
            return f"prompt of {n_prompt} tokens does not fit the model's context of {ctx} tokens"
        if n_prompt + max_new_tokens > ctx:
            return (f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                    f"context of {ctx} tokens")
        need = -(-(n_prompt + max_new_tokens if max_new_tokens else ctx) // self.page_size)
        if self.kv_pages is not None and need > self.kv_pages:
            return (f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens or ctx - n_prompt} needs {need} "
                    f"KV pages of {self.page_size} slots; kv_pages is {self.kv_pages}")
        return None

    def score_context_error(self, n_prompt: int, n_completion: int) -> str | None:
        """Why a prompt + completion pair does not fit the context (naming the part that is too long),
        or None. score_batch feeds all n = n_prompt + n_completion tokens, at positions 0 .. n - 1 (the
        last one's logits are not used), so a pair fits when n <= max_seq_len."""
        ctx = self.cfg.max_seq_len
        if n_prompt + n_completion <= ctx:
            return None
        if n_prompt > ctx:
            return f"prompt of {n_prompt} tokens is longer than the model's context of {ctx} tokens"
        return (f"completion of {n_completion} tokens after a prompt of {n_prompt} tokens exceeds the model's "
                f"context of {ctx} tokens (at most {ctx - n_prompt} completion tokens fit)")

    def _scope(self):
        return mesh_scope(self.mesh)

    def _put(self, x: np.ndarray, names) -> jax.Array:
        return put(self.mesh, x, names)

    def _cache_for(self, batch: int, slots: int) -> KVCache:
        """Reuse the last batch's cache when the shape matches (it was donated and handed back)."""
        c, self._cache = self._cache, None  # a cache of another shape is freed before the new one exists
        if c is not None and c.k.shape[1:3] == (batch, slots):
            return c
        del c
        return caches.contiguous(self.cfg, self.kv_dtype, self.mesh, batch, slots)

    def _paged_cache(self, batch: int, table_width: int) -> PagedKVCache:
        """The page pool (kv_pages + page 0) with a (batch, table_width) table; reused when it fits."""
        c, self._pool = self._pool, None
        if c is not None and c.table.shape == (batch, table_width):
            return c
        del c
        return caches.paged(self.cfg, self.kv_dtype, self.mesh, self.kv_pages, self.page_size, self.paged_attention,
                            batch, table_width)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True, eos=False)
        return [int(t) for t in prompt]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int | None = None,
                 sampling: sampling_lib.Sampler = sampling_lib.Greedy(), *, seed: int = 0, ignore_eos: bool = False,
                 stop_ids: Sequence[int] | None = None, batch_size: int = 8, decode_text: bool = True,
                 continuous: bool = True) -> list[Completion]:
        """Complete each prompt (text: BOS is added; or a list of token ids, used as given).

        `max_new_tokens` None: until a stop token or the end of the model's context. Results come back in
        input order. Row i samples with keys from (seed, i, step), so a prompt's output does not depend
        on the batch it lands in. Raises ValueError on a bad or too-long prompt.
        """
        ids = [self._encode(p) for p in prompts]
        for i, p in enumerate(ids):
            try:
                self.check_ids(p)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            err = self.context_error(len(p), max_new_tokens or 0)
            if err:
                raise ValueError(f"prompt {i}: {err}")
        results: list[Completion | None] = [None] * len(ids)
        for batch in self.generate_batches(ids, max_new_tokens, sampling, seed=seed, ignore_eos=ignore_eos,
                                           stop_ids=stop_ids, batch_size=batch_size, decode_text=decode_text,
                                           continuous=continuous):
            for i, c in batch:
                results[i] = c
        return results

    def request(self, tokens: Sequence[int], max_new_tokens: int | None = None,
                sampling: sampling_lib.Sampler = sampling_lib.Greedy(), *, seed: int = 0, row_seed: int = 0,
                stop: Sequence[str] = ()) -> Request:
        """A Request for checked prompt ids; max_new_tokens None: the rest of the context."""
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        budget = self.cfg.max_seq_len - len(tokens) if max_new_tokens is None else max_new_tokens
        if budget < 1:
            raise ValueError(f"{len(tokens)} tokens leave no room in the model's context of "
                             f"{self.cfg.max_seq_len} tokens")
        t, k, p = sampling_lib.row_params(sampling)
        return Request(list(tokens), budget, t, k, p, seed, row_seed, tuple(stop))

    def generate_batches(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | None,
                         sampling: sampling_lib.Sampler = sampling_lib.Greedy(), *, seed: int = 0,
                         row_seeds: Sequence[int] | None = None, ignore_eos: bool = False,
                         stop_ids: Sequence[int] | None = None, batch_size: int = 8,
                         decode_text: bool = True, continuous: bool = True
                         ) -> Iterator[list[tuple[int, Completion]]]:
        """Yield [(prompt index, Completion)] as rows finish; prompts are checked token-id lists. `row_seeds`
        (default: the prompt index) picks each row's random stream. One set of knobs for every prompt:
        `generate_requests` takes them per prompt."""
        row_seeds = list(range(len(prompts))) if row_seeds is None else list(row_seeds)
        reqs = []
        for i, p in enumerate(prompts):
            try:
                reqs.append(self.request(p, max_new_tokens, sampling, seed=seed, row_seed=row_seeds[i]))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        yield from self.generate_requests(reqs, ignore_eos=ignore_eos, stop_ids=stop_ids, batch_size=batch_size,
                                          decode_text=decode_text, continuous=continuous)

    def generate_requests(self, requests: Sequence[Request], *, ignore_eos: bool = False,
                          stop_ids: Sequence[int] | None = None, batch_size: int = 8, decode_text: bool = True,
                          continuous: bool = True) -> Iterator[list[tuple[int, Completion]]]:
        """Yield [(request index, Completion)] as rows finish. `continuous` (default): `batch_size` decode
        slots refilled as rows finish (scheduler.py); False: whole static batches sorted by length, each
        decoding until its longest row is done (kept for the benchmark comparison)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not requests:
            return
        stops = [] if ignore_eos else list(self.default_stop_ids() if stop_ids is None else stop_ids)
        width = max(STOP_SLOTS, -(-len(stops) // STOP_SLOTS) * STOP_SLOTS)
        stop_arr = jnp.asarray(np.array(stops + [-1] * (width - len(stops)), np.int32))
        needs_text = decode_text or any(r.stop for r in requests)
        decode = self.tokenizer.decode if needs_text else None
        if self.kv_pages is not None and not continuous:
            raise ValueError("kv_pages: the paged KV cache serves continuous batching, not static batches")
        if not continuous and any(r.ignore_eos for r in requests):
            raise ValueError("a request's ignore_eos needs continuous batching (static batches take ignore_eos "
                             "for the whole run)")
        if continuous:
            if self._scheduler is None or self._scheduler.b != batch_size:
                self._scheduler = Scheduler(self, batch_size)
            batches = self._scheduler.run(requests, stop_arr, decode)
        else:
            batches = static_batches(self, requests, stop_arr, batch_size, decode)
        for batch in batches:
            if decode is not None and not decode_text:
                batch = [(i, dataclasses.replace(c, text=None)) for i, c in batch]
            yield batch

    # ------------------------------------------------------------------ scoring
    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8) -> list[Scored]:
        """Log-probs of each completion given its prompt: pairs of (prompt ids, completion ids)."""
        for i, (p, c) in enumerate(pairs):
            try:
                self.check_ids(p)
                if len(c):
                    self.check_ids(c)
            except ValueError as e:
                raise ValueError(f"pair {i}: {e}") from None
            err = self.score_context_error(len(p), len(c))
            if err:
                raise ValueError(f"pair {i}: {err}")
        results: list[Scored | None] = [None] * len(pairs)
        for batch in self.score_batches(pairs, batch_size):
            for i, s in batch:
                results[i] = s
        return results

    def score_batches(self, pairs, batch_size: int = 8) -> Iterator[list[tuple[int, Scored]]]:
        """Yield [(pair index, Scored)] per batch; sequences are sorted by length and bucketed."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not pairs:
            return
        seqs = [list(p) + list(c) for p, c in pairs]
        for rows, tokens, lengths in left_padded_batches(seqs, batch_size):
            with self._scope():
                logp = to_host(self._score(self.params, self._put(tokens, ("batch", "seq")),
                                           self._put(lengths, ("batch",))))
            yield scored_rows(pairs, rows, tokens.shape[1], logp)

    def top_logprobs(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One checked sequence of n >= 2 ids -> log p(ids[t+1] | ids[:t+1]) (n-1,), and at each position
        the scoring.TOP_LOGPROBS likeliest next tokens, ids and log-probs (n-1, K): the server's `logprobs`
        and `echo`. One row left-padded to its power-of-two bucket: one compile per bucket."""
        tokens, lengths = left_pad([list(ids)], bucket(len(ids)), 1)
        with self._scope():
            picked, top_ids, top_lp = (to_host(x) for x in self._top(
                self.params, self._put(tokens, ("batch", "seq")), self._put(lengths, ("batch",))))
        first = tokens.shape[1] - len(ids)
        return picked[0, first:], top_ids[0, first:], top_lp[0, first:]
