"""Continuous batching: a fixed number of decode slots, refilled as rows finish (the host loop).

Why: a static batch decodes until its longest row is done, so every finished row's slot idles. Here a
row that stops frees its slot at the next host visit, and the next waiting prompts take the free slots
while the others keep decoding. The device programs are in slots.py; this loop decides what runs.

At each host visit:
  * finished rows are written out (stop strings are checked here, on the decoded text);
  * free slots take the next waiting prompts (longest padded width first). All prompts admitted at one
    visit are prefilled together, one call per padded width (`slots.insert`, at most PREFILL_TOKENS
    prompt slots per call, the row count a power of two: few compiles). One call per row cost ~30% of
    a ragged run's time;
  * with `prefill_chunk`, a prompt longer than the chunk is prefilled one chunk per visit (`_Prefill`)
    while the other slots keep decoding, and joins them when its last chunk is done;
  * the device runs up to `steps` decode steps (`slots.decode_chunk`), leaving early when enough rows
    have finished for refills to pay, or when the contiguous cache is full.

Cache layouts. Contiguous (kv_cache.py): every row writes the shared slot `index`; when it reaches the
end, every row is shifted left by the same amount (one roll) so the longest live row starts at slot 0,
or the cache doubles when that frees too little; it halves when the long rows are gone. Paged
(paged_cache.py, Generator(kv_pages=...)): a PagePool hands a row ceil((prompt + max_new_tokens) / page)
pages when it is admitted, admitting the next prompt (in order) only while enough are free, and takes
them back when the row finishes; the page table lives here and goes with each decode call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import slots as programs
from ..parallel.multihost_io import to_host
from .slots import ROW_FIELDS, bucket, prompt_width

DECODE_STEPS = 32  # most decode steps per host visit
PREFILL_TOKENS = 4096  # most prompt slots (rows x padded width) prefilled in one call: bounds its activations


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and its knobs. `seed` and `row_seed` pick the random stream: fold_in(key(seed), row_seed)."""
    tokens: Sequence[int]
    max_new_tokens: int       # the row's budget (the rest of the context when the caller gave none)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    row_seed: int = 0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]     # generated ids, without the stop token
    finish_reason: str    # "stop" (a stop token or string was generated) or "length" (its budget or the context's end)
    text: str | None = None



def cut_at_stop(tokens: list[int], stops: Sequence[str], decode: Callable[[list[int]], str],
                checked: int = 0) -> tuple[int, str] | None:
    """The first stop string in decode(tokens): (tokens kept, text before the stop string), or None.

    Kept are the fewest tokens whose text holds a stop string: a stop string may span two or more
    tokens, and the last kept token may carry text past it (cut from `text`, kept in `tokens`).
    `checked`: a prefix of that many tokens is known to hold none.
    """
    if not stops or not any(s in decode(tokens) for s in stops):
        return None
    for n in range(checked + 1, len(tokens) + 1):
        text = decode(tokens[:n])
        found = [text.find(s) for s in stops if s in text]
        if found:
            return n, text[:min(found)]
    return None  # not prefix-stable (an incomplete character completed later): no cut



class PagePool:
    """The paged cache's free pages, on the host. Page 0 is never handed out (paged_cache.py)."""

    def __init__(self, pages: int, page_size: int):
        self.pages, self.size = pages, page_size
        self.free = list(range(pages, 0, -1))  # pop() hands out the low pages first

    def need(self, n_tokens: int) -> int:
        return -(-n_tokens // self.size)

    def take(self, n: int) -> list[int]:
        return [self.free.pop() for _ in range(n)]

    def give(self, pages: list[int]) -> None:
        self.free.extend(pages)


@dataclasses.dataclass
class _Prefill:
    """Prompts of one padded width, admitted together, prefilled one chunk per host visit."""
    members: list[int]  # their slots
    p: int              # padded width
    args: dict          # tokens, slots, rows, pages: device arrays for the final `place`
    tmp: object         # the temporary KVCache the chunks fill
    j: int              # next chunk
    logits: object = None


class Scheduler:
    """Runs requests through `batch_size` decode slots of one generator (engine.Generator: its graphdef,
    params, cfg, prefill_chunk, kv_pages / page_size, `_cache_for`, `_paged_cache` and `_scope`).
    Yields [(request index, Completion)] as rows finish."""

    def __init__(self, generator, batch_size: int, steps: int = DECODE_STEPS):
        self.g, self.b, self.steps = generator, batch_size, steps
        self.chunk = generator.prefill_chunk
        gd = generator.graphdef
        donate = dict(donate_argnames=("state",))
        self._insert = jax.jit(functools.partial(programs.insert, gd, chunk=self.chunk), **donate)
        self._place = jax.jit(programs.place, **donate)
        self._open = jax.jit(functools.partial(programs.open_prefill, generator.cfg, generator.kv_dtype,
                                               chunk=self.chunk))
        self._piece = jax.jit(functools.partial(programs.prefill_step, gd, chunk=self.chunk),
                              donate_argnames=("tmp",))
        self._decode = jax.jit(functools.partial(programs.decode_chunk, gd), static_argnames=("steps",), **donate)
        self._shift = jax.jit(programs.shift, **donate)
        self._resize = jax.jit(programs.resize, static_argnames=("slots",))
        self.prefill_calls = 0  # prefill programs run (`insert` calls and chunks): tests
        self.interleaved = 0    # prefill chunks run while other rows were decoding: tests
        self.page_waits = 0     # host visits at which the next prompt waited for free pages: tests
        self.peak_pages = 0     # most pages held at once in the last run (benchmarks)

    def compiles(self) -> int:
        """Compiled programs so far (tests: distinct knobs must not add any)."""
        fs = (self._insert, self._place, self._open, self._piece, self._decode, self._shift, self._resize)
        return sum(f._cache_size() for f in fs)

    def _group_args(self, requests, members, rows, p, pages_of, m, b):
        """Host arrays of one prefill call: n = a power of two >= len(members) rows; padding rows go to
        slot b (out of range: dropped by `place`) with one token."""
        n = bucket(len(members), 1)
        tokens = np.zeros((n, p), np.int32)
        slot = np.full((n,), b, np.int32)
        cols = {f: np.zeros((n,), np.float32 if f in ("temperature", "top_p") else np.int32) for f in ROW_FIELDS}
        cols["lengths"][:], cols["top_p"][:], cols["limit"][:] = 1, 1.0, 1
        pages = None if m is None else np.full((n, m), self.g.kv_pages + 1, np.int32)
        for k, r in enumerate(members):
            req = requests[rows[r]]
            tokens[k, p - len(req.tokens):] = req.tokens
            slot[k] = r
            for f, v in zip(ROW_FIELDS, (len(req.tokens), req.seed, req.row_seed, req.temperature, req.top_k,
                                         req.top_p, req.max_new_tokens)):
                cols[f][k] = v
            if pages is not None:
                pages[k, :len(pages_of[r])] = pages_of[r]
        rows_d = {f: jnp.asarray(a) for f, a in cols.items()}
        return dict(tokens=jnp.asarray(tokens), slots=jnp.asarray(slot), rows=rows_d,
                    pages=None if pages is None else jnp.asarray(pages))

    def run(self, requests: Sequence[Request], stop_ids, decode: Callable[[list[int]], str] | None
            ) -> Iterator[list[tuple[int, Completion]]]:
        if not requests:
            return
        g = self.g
        b = min(self.b, len(requests))
        width = functools.partial(prompt_width, chunk=self.chunk)
        paged = g.kv_pages is not None
        with g._scope():
            if paged:
                pool = PagePool(g.kv_pages, g.page_size)
                self.peak_pages = 0
                needs = [pool.need(len(r.tokens) + r.max_new_tokens) for r in requests]
                m = max(needs)
                if m > g.kv_pages:
                    i = needs.index(m)
                    raise ValueError(f"request {i}: {len(requests[i].tokens)} prompt tokens + max_new_tokens "
                                     f"{requests[i].max_new_tokens} need {m} KV pages of {g.page_size} slots; "
                                     f"the pool has {g.kv_pages} (kv_pages)")
                table = np.zeros((b, m), np.int32)
                state = programs.empty_state(g._paged_cache(b, m), b, g.cfg.vocab_size)
            else:
                m = None
                longest = max(width(len(r.tokens)) for r in requests)
                slots = bucket(longest + min(max(r.max_new_tokens for r in requests), 256))
                state = programs.empty_state(g._cache_for(b, slots), b, g.cfg.vocab_size)
        # the longest budgets first, then the longest prompts (longest-processing-time-first): a slot is
        # held for about max_new_tokens steps, so the long rows start early and the short ones fill the
        # gaps at the end instead of a few long rows decoding alone (2 x batch ragged rows, batch 32:
        # ~1.4x tokens/s against prompt order). The tokens do not depend on the order.
        key = lambda i: (-requests[i].max_new_tokens, -width(len(requests[i].tokens)))  # noqa: E731
        waiting = collections.deque(sorted(range(len(requests)), key=key))
        rows: list[int | None] = [None] * b           # request in each slot
        toks: list[list[int]] = [[] for _ in range(b)]
        checked = [0] * b
        pos = np.zeros(b, np.int64)                    # tokens of each live row in the cache
        pages_of: list[list[int]] = [[] for _ in range(b)]
        pending: list[_Prefill] = []
        index = 0

        def finish(r, reason, n=None, text=None):
            i, t = rows[r], toks[r] if n is None else toks[r][:n]
            if text is None and decode is not None:
                text = decode(t)
            rows[r] = None
            if paged:
                pool.give(pages_of[r])
                pages_of[r], table[r] = [], 0
            return i, Completion(t, reason, text)

        while waiting or any(x is not None for x in rows):
            finished = []
            with g._scope():
                admitted = []
                for r in range(b):  # free slots take the next prompts
                    if rows[r] is not None or not waiting:
                        continue
                    req = requests[waiting[0]]
                    if paged:
                        need = pool.need(len(req.tokens) + req.max_new_tokens)
                        if need > len(pool.free):
                            self.page_waits += 1
                            break  # in order: wait for rows to finish
                        pages_of[r] = pool.take(need)
                        self.peak_pages = max(self.peak_pages, pool.pages - len(pool.free))
                    rows[r], pos[r], checked[r], toks[r] = waiting.popleft(), len(req.tokens), 0, []
                    admitted.append(r)
                ready = []  # (width, place kwargs or insert kwargs, is a finished _Prefill)
                groups: dict[int, list[int]] = {}
                for r in admitted:
                    groups.setdefault(width(len(requests[rows[r]].tokens)), []).append(r)
                for p, members in groups.items():
                    most = 1 << (max(1, PREFILL_TOKENS // p).bit_length() - 1)
                    k = 0
                    while k < len(members):  # power-of-two parts (5 rows: 4 + 1): no padding rows to compute
                        part = members[k:k + min(most, 1 << (len(members) - k).bit_length() - 1)]
                        k += len(part)
                        args = self._group_args(requests, part, rows, p, pages_of, m, b)
                        if self.chunk is not None and p > self.chunk:
                            lengths = args["rows"]["lengths"]
                            first = (p - max(len(requests[rows[r]].tokens) for r in part)) // self.chunk
                            pending.append(_Prefill(part, p, args, self._open(args["tokens"], lengths), first))
                        else:
                            ready.append((p, part, args, None))
                prefilling = {r for job in pending for r in job.members}
                decoding = any(x is not None and r not in prefilling for r, x in enumerate(rows))
                for job in list(pending):  # one chunk of each long prefill per visit
                    job.logits, job.tmp = self._piece(g.params, job.tmp, job.args["tokens"],
                                                      job.args["rows"]["lengths"], jnp.int32(job.j))
                    job.j += 1
                    self.prefill_calls += 1
                    self.interleaved += decoding
                    if job.j == job.p // self.chunk:
                        pending.remove(job)
                        ready.append((job.p, job.members, job.args, job))
                if ready and not paged:  # room for the widest window below the write slot
                    p_max = max(p for p, *_ in ready)
                    if p_max + 1 > slots:
                        slots = bucket(p_max + 1 + self.steps)
                        state = self._resize(state, slots=slots)
                    if index < p_max:
                        state, index = self._shift(state, jnp.int32(p_max)), p_max
                for p, part, args, job in ready:
                    if job is None:
                        self.prefill_calls += 1
                        state = self._insert(g.params, state, args["tokens"], args["slots"], args["rows"],
                                             args["pages"])
                    else:
                        state = self._place(state, job.tmp, job.logits, args["slots"], args["rows"], args["pages"])
                    for r in part:
                        if paged:
                            table[r, :len(pages_of[r])] = pages_of[r]
                waiting_rows = {r for job in pending for r in job.members}
                live = [r for r in range(b) if rows[r] is not None and r not in waiting_rows]
                if live:
                    if not paged and index >= slots:  # full: shift the rows to the front; double or halve it
                        longest_live = int(pos[live].max())
                        need = max(longest_live, width(len(requests[waiting[0]].tokens)) if waiting else 0)
                        if slots - longest_live < slots // 4:
                            slots *= 2
                            state = self._resize(state, slots=slots)
                        else:
                            state, index = self._shift(state, jnp.int32(longest_live)), longest_live
                            if bucket(2 * need) < slots:
                                slots = bucket(2 * need)
                                state = self._resize(state, slots=slots)
                    refill = min(len(waiting), max(1, b // 8)) if waiting else b + 1
                    kw = dict(table=jnp.asarray(table)) if paged else {}
                    state, out, n_out = self._decode(g.params, state, stop_ids, jnp.int32(refill),
                                                     steps=self.steps, **kw)
                    # gathered from every host: each process takes the same decisions (multihost_io.py)
                    out, n_out, done = to_host(out), to_host(n_out), to_host(state["done"])
                    if not paged:
                        new_index = int(to_host(state["cache"].index))
                        pos[live] += new_index - index
                        index = new_index
                    for r in live:
                        toks[r] += out[r, :n_out[r]].tolist()
                        got = self._check_strings(r, requests, rows, toks, checked, decode, finish)
                        if got:
                            finished += got
                        elif done[r]:
                            req = requests[rows[r]]
                            finished.append(finish(r, "length" if len(toks[r]) >= req.max_new_tokens else "stop"))
                    if any(rows[r] is None and not done[r] for r in range(b)):  # ended by a stop string
                        state = {**state, "done": jnp.asarray(done | np.array([x is None for x in rows]))}
            if finished:
                yield finished
        if paged:
            g._pool = state["cache"]
        else:
            g._cache = state["cache"]

    @staticmethod
    def _check_strings(r, requests, rows, toks, checked, decode, finish):
        req = requests[rows[r]]
        if not req.stop or decode is None:
            return []
        cut = cut_at_stop(toks[r], req.stop, decode, checked[r])
        if cut is None:
            checked[r] = len(toks[r])
            return []
        return [finish(r, "stop", *cut)]
