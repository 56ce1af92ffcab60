"""Continuous batching: a fixed number of decode slots, refilled as rows finish (the host loop).

Why: a static batch decodes until its longest row is done, so every finished row's slot idles. Here a
row that stops frees its slot at the next host visit, and the next waiting prompts take the free slots
while the others keep decoding. The device programs are in slots.py; this loop decides what runs.

Fed from a list (generate, rollouts) or live from a `Feed` (the HTTP server's queue): then at each visit
`_take` appends the requests that arrived (they wait for a slot like the others) and drops those
cancelled (a client gone: a waiting one leaves the queue, a decoding one frees its slot), and every visit
reports the live rows' tokens so far (streaming). A row's tokens never depend on who shares the batch.

At each host visit (`Scheduler.run`, one named step each):
  * `_admit`: free slots take the next waiting prompts (longest budget first, see `_start`);
  * `_open_prefills`: all prompts admitted at one visit are prefilled together, one call per padded
    width (`slots.insert`, at most PREFILL_TOKENS prompt slots per call, the row count a power of two:
    few compiles). One call per row cost ~30% of a ragged run's time;
  * `_prefill_chunks`: with `prefill_chunk`, a prompt longer than the chunk is prefilled one chunk per
    visit (`_Prefill`) while the other slots keep decoding, and joins them when its last chunk is done;
  * `_room_for_prompts` + `_enter`: the prefilled rows go into their slots;
  * `_decode_visit`: the device runs up to `steps` decode steps (`slots.decode_chunk`), leaving early
    when enough rows have finished for refills to pay, or when the contiguous cache is full
    (`_make_room` then shifts or resizes it first);
  * `_collect`: finished rows are handed out (stop strings are checked here, on the decoded text,
    request.py) and their slots freed.

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
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from . import slots as programs
from ..parallel.multihost_io import to_host
from .padding import left_pad
from .request import Completion, Request, ended, row_columns, stop_string_cut
from .slots import bucket, prompt_width

DECODE_STEPS = 32  # most decode steps per host visit
PREFILL_TOKENS = 4096  # most prompt slots (rows x padded width) prefilled in one call: bounds its activations

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


@dataclasses.dataclass
class _Run:
    """One run's host-side state: which request each of the b decode slots holds, its tokens so far,
    and the device state the programs pass along (donated at every call)."""
    requests: list[Request]        # a live run appends the feed's arrivals
    decode: Callable[[list[int]], str] | None
    b: int
    state: dict
    waiting: collections.deque     # request indices not yet admitted, in admission order
    slots: int = 0                 # contiguous cache: its slot count
    index: int = 0                 # contiguous cache: the shared write slot
    pool: PagePool | None = None   # paged cache: the free pages
    table: np.ndarray | None = None  # paged cache: the page table (b, m), owned here
    m: int | None = None           # paged cache: page-table width (most pages one request needs)

    def __post_init__(self):
        b = self.b
        self.rows: list[int | None] = [None] * b          # request in each slot
        self.toks: list[list[int]] = [[] for _ in range(b)]
        self.checked = [0] * b                             # tokens known to hold no stop string
        self.pos = np.zeros(b, np.int64)                   # tokens of each live row in the cache
        self.pages_of: list[list[int]] = [[] for _ in range(b)]
        self.pending: list[_Prefill] = []
        self.cancelling: set[int] = set()                  # live runs: cancelled, not yet out of their slot

    @property
    def paged(self) -> bool:
        return self.pool is not None

    def busy(self) -> bool:
        return bool(self.waiting) or any(x is not None for x in self.rows)

    def prefilling(self) -> set[int]:
        """Slots whose chunked prefill is still running: admitted, not yet decoding."""
        return {r for job in self.pending for r in job.members}


class Feed(Protocol):
    """What feeds a live run (the HTTP server's queue, serve/openai/worker.py), called by
    `Scheduler.run` at each host visit on the thread that runs it."""

    def poll(self) -> tuple[list[Request], list[int]]:
        """The requests that arrived since the last visit, and the indices of those cancelled."""

    def admitted(self, indices: list[int]) -> None:
        """These requests took decode slots at this visit."""

    def progress(self, rows: list[tuple[int, list[int]]]) -> None:
        """(request index, its tokens so far) of each row still decoding after this visit."""


def _power_of_two_parts(members: list[int], most: int) -> Iterator[list[int]]:
    """members cut into parts of power-of-two sizes, largest first, none above `most` (5 rows: 4 + 1):
    no padding rows to compute."""
    k = 0
    while k < len(members):
        part = members[k:k + min(most, 1 << (len(members) - k).bit_length() - 1)]
        k += len(part)
        yield part


class Scheduler:
    """Runs requests through `batch_size` decode slots of one generator (engine.Generator: its graphdef,
    params, cfg, prefill_chunk, kv_pages / page_size, `_cache_for`, `_paged_cache` and `_scope`).
    Yields [(request index, Completion)] as rows finish."""

    def __init__(self, generator, batch_size: int, steps: int = DECODE_STEPS):
        self.g, self.b, self.steps = generator, batch_size, steps
        self.chunk = generator.prefill_chunk
        self.width = functools.partial(prompt_width, chunk=self.chunk, floor=generator.min_prompt_width)
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
        self.prefilled_rows = 0  # prompts prefilled by `insert` calls (identical ones once per call): tests
        self.interleaved = 0    # prefill chunks run while other rows were decoding: tests
        self.page_waits = 0     # host visits at which the next prompt waited for free pages: tests
        self.peak_pages = 0     # most pages held at once in the last run (benchmarks)
        self.shifts = self.grows = self.shrinks = 0  # contiguous cache moves: tests
        self.live: _Run | None = None  # the run in progress

    def compiles(self) -> int:
        """Compiled programs so far (tests: distinct knobs must not add any)."""
        fs = (self._insert, self._place, self._open, self._piece, self._decode, self._shift, self._resize)
        return sum(f._cache_size() for f in fs)

    def run(self, requests: Sequence[Request], stop_ids, decode: Callable[[list[int]], str] | None,
            feed: Feed | None = None) -> Iterator[list[tuple[int, Completion]]]:
        """Yield [(request index, Completion)] as rows finish. With a `feed` (a live run: the server's
        queue) the requests list grows: at every host visit the feed's new requests join the waiting
        ones (their indices follow on) and its cancelled ones leave; every visit yields (perhaps an
        empty list), and the run ends when no row is live or waiting."""
        if not requests and feed is None:
            return
        run = self._start(list(requests), decode, live=feed is not None)
        self.live = run
        try:
            while True:
                if feed is not None:
                    self._take(run, feed)
                if not run.busy():
                    break
                with self.g._scope():
                    admitted = self._admit(run)
                    if feed is not None and admitted:
                        feed.admitted([run.rows[r] for r in admitted])
                    ready = self._open_prefills(run, admitted)
                    ready += self._prefill_chunks(run)
                    self._room_for_prompts(run, ready)
                    self._enter(run, ready)
                    live = [r for r in range(run.b) if run.rows[r] is not None]
                    finished = self._decode_visit(run, stop_ids)
                if feed is not None:
                    feed.progress([(run.rows[r], run.toks[r]) for r in live if run.rows[r] is not None])
                if finished or feed is not None:
                    yield finished
        finally:
            self.live = None
        if run.paged:
            self.g._pool = run.state["cache"]
        else:
            self.g._cache = run.state["cache"]

    def pages_in_use(self) -> int:
        """KV pages the live run's rows hold (0 without a paged cache or a run): the server's gauge."""
        run = self.live
        return 0 if run is None or not run.paged else run.pool.pages - len(run.pool.free)

    def _take(self, run: _Run, feed: Feed) -> None:
        """A live run's arrivals (appended, in order) and cancellations: a waiting request leaves the
        queue, a decoding row frees its slot (marked done on the device, as a stop string does), a row
        still in its chunked prefill leaves once it is in its slot (the next visit)."""
        new, cancelled = feed.poll()
        for req in new:
            run.waiting.append(len(run.requests))
            run.requests.append(req)
        run.cancelling.update(cancelled)
        if not run.cancelling:
            return
        prefilling = run.prefilling()
        freed = np.zeros(run.b, bool)
        for i in list(run.cancelling):
            if i in run.waiting:
                run.waiting.remove(i)
            elif i in run.rows:
                r = run.rows.index(i)
                if r in prefilling:
                    continue
                self._free(run, r)
                freed[r] = True
            run.cancelling.discard(i)
        if freed.any():
            run.state = {**run.state, "done": run.state["done"] | jnp.asarray(freed)}

    # ------------------------------------------------------------------ the steps of a run
    def _start(self, requests: list[Request], decode, live: bool = False) -> _Run:
        """The empty cache (contiguous: room for the widest prompt and up to slots.FIRST_CHUNK new tokens;
        paged: the pool, refusing a request it could never hold) and the admission order. A `live` run
        (fed while it runs) has all its slots, and a paged one a page table as wide as the context."""
        g = self.g
        b = self.b if live else min(self.b, len(requests))
        # the longest budgets first, then the longest prompts (longest-processing-time-first): a slot is
        # held for about max_new_tokens steps, so the long rows start early and the short ones fill the
        # gaps at the end instead of a few long rows decoding alone (2 x batch ragged rows, batch 32:
        # ~1.4x tokens/s against prompt order). The tokens do not depend on the order.
        key = lambda i: (-requests[i].max_new_tokens, -self.width(len(requests[i].tokens)))  # noqa: E731
        waiting = collections.deque(sorted(range(len(requests)), key=key))
        with g._scope():
            if g.kv_pages is None:
                longest = max((self.width(len(r.tokens)) for r in requests), default=1)
                most = max((r.max_new_tokens for r in requests), default=1)
                slots = bucket(longest + min(most, programs.FIRST_CHUNK))
                state = programs.empty_state(g._cache_for(b, slots), b, g.cfg.vocab_size)
                return _Run(requests, decode, b, state, waiting, slots=slots)
            pool = PagePool(g.kv_pages, g.page_size)
            self.peak_pages = 0
            needs = [pool.need(len(r.tokens) + r.max_new_tokens) for r in requests]
            m = min(pool.need(g.cfg.max_seq_len), g.kv_pages) if live else max(needs)
            if m > g.kv_pages:
                i = needs.index(m)
                raise ValueError(f"request {i}: {len(requests[i].tokens)} prompt tokens + max_new_tokens "
                                 f"{requests[i].max_new_tokens} need {m} KV pages of {g.page_size} slots; "
                                 f"the pool has {g.kv_pages} (kv_pages)")
            state = programs.empty_state(g._paged_cache(b, m), b, g.cfg.vocab_size)
            return _Run(requests, decode, b, state, waiting, pool=pool, table=np.zeros((b, m), np.int32), m=m)

    def _admit(self, run: _Run) -> list[int]:
        """Free slots take the next waiting prompts, in order; a paged cache admits one only while the
        pool has its pages (else it waits for rows to finish). Returns the slots filled."""
        admitted = []
        for r in range(run.b):
            if run.rows[r] is not None or not run.waiting:
                continue
            req = run.requests[run.waiting[0]]
            if run.paged:
                need = run.pool.need(len(req.tokens) + req.max_new_tokens)
                if need > len(run.pool.free):
                    self.page_waits += 1
                    break  # in order: wait for rows to finish
                run.pages_of[r] = run.pool.take(need)
                self.peak_pages = max(self.peak_pages, run.pool.pages - len(run.pool.free))
            run.rows[r], run.pos[r], run.checked[r], run.toks[r] = run.waiting.popleft(), len(req.tokens), 0, []
            admitted.append(r)
        return admitted

    def _open_prefills(self, run: _Run, admitted: list[int]) -> list[tuple]:
        """Group the admitted slots by padded width into prefill calls. Returns the groups ready to
        prefill in one call, as (width, slots, args, None); those longer than the chunk join
        `run.pending` instead."""
        ready = []
        groups: dict[int, list[int]] = {}
        for r in admitted:
            groups.setdefault(self.width(len(run.requests[run.rows[r]].tokens)), []).append(r)
        for p, members in groups.items():
            for part in _power_of_two_parts(members, 1 << (max(1, PREFILL_TOKENS // p).bit_length() - 1)):
                args = self._group_args(run, part, p)
                if self.chunk is not None and p > self.chunk:
                    first = (p - max(len(run.requests[run.rows[r]].tokens) for r in part)) // self.chunk
                    tmp = self._open(args["tokens"], args["rows"]["lengths"])
                    run.pending.append(_Prefill(part, p, args, tmp, first))
                else:
                    ready.append((p, part, args, None))
        return ready

    def _prefill_chunks(self, run: _Run) -> list[tuple]:
        """One chunk of each pending long prefill. Returns those now done, as (width, slots, args, job)."""
        prefilling = run.prefilling()
        decoding = any(x is not None and r not in prefilling for r, x in enumerate(run.rows))
        ready = []
        for job in list(run.pending):
            job.logits, job.tmp = self._piece(self.g.params, job.tmp, job.args["tokens"],
                                              job.args["rows"]["lengths"], jnp.int32(job.j))
            job.j += 1
            self.prefill_calls += 1
            self.interleaved += decoding
            if job.j == job.p // self.chunk:
                run.pending.remove(job)
                ready.append((job.p, job.members, job.args, job))
        return ready

    def _room_for_prompts(self, run: _Run, ready: list[tuple]) -> None:
        """Contiguous cache: room for the widest prefilled window below the write slot (grow the cache
        past it, move the write slot up to it)."""
        if not ready or run.paged:
            return
        p_max = max(p for p, *_ in ready)
        if p_max + 1 > run.slots:
            self._resize_to(run, bucket(p_max + 1 + self.steps))
        if run.index < p_max:
            self._shift_to(run, p_max)

    def _enter(self, run: _Run, ready: list[tuple]) -> None:
        """The ready groups into their decode slots: prefilled now in one call (`insert`), or placed
        from their finished chunked prefill (`place`); a paged row's pages go into the table."""
        for _, part, args, job in ready:
            if job is None:
                self.prefill_calls += 1
                shared = args["shared"] or {"tokens": args["tokens"]}  # identical prompts: prefilled once
                self.prefilled_rows += len(part) if args["shared"] is None else int(args["shared"]["n"])
                run.state = self._insert(self.g.params, run.state, shared["tokens"], args["slots"], args["rows"],
                                         args["pages"], src=shared.get("src"), lengths=shared.get("lengths"))
            else:
                run.state = self._place(run.state, job.tmp, job.logits, args["slots"], args["rows"], args["pages"])
            if run.paged:
                for r in part:
                    run.table[r, :len(run.pages_of[r])] = run.pages_of[r]

    def _decode_visit(self, run: _Run, stop_ids) -> list[tuple[int, Completion]]:
        """Up to `steps` decode steps for the live rows (those not still prefilling); returns the rows
        that finished."""
        prefilling = run.prefilling()
        live = [r for r in range(run.b) if run.rows[r] is not None and r not in prefilling]
        if not live:
            return []
        if not run.paged and run.index >= run.slots:
            self._make_room(run, live)
        refill = min(len(run.waiting), max(1, run.b // 8)) if run.waiting else run.b + 1
        kw = dict(table=jnp.asarray(run.table)) if run.paged else {}
        run.state, out, n_out = self._decode(self.g.params, run.state, stop_ids, jnp.int32(refill),
                                             steps=self.steps, **kw)
        # gathered from every host: each process takes the same decisions (multihost_io.py)
        out, n_out, done = to_host(out), to_host(n_out), to_host(run.state["done"])
        if not run.paged:
            new_index = int(to_host(run.state["cache"].index))
            run.pos[live] += new_index - run.index
            run.index = new_index
        return self._collect(run, live, out, n_out, done)

    def _make_room(self, run: _Run, live: list[int]) -> None:
        """The contiguous cache is full (the write slot reached its end). When shifting every row left
        so the longest live row starts at slot 0 would free less than a quarter of it, the cache
        doubles; else the rows shift, and the cache halves (or more) while twice what the live rows
        and the next prompt need still fits."""
        longest_live = int(run.pos[live].max())
        need = max(longest_live, self.width(len(run.requests[run.waiting[0]].tokens)) if run.waiting else 0)
        if run.slots - longest_live < run.slots // 4:
            self._resize_to(run, run.slots * 2)
            return
        self._shift_to(run, longest_live)
        if bucket(2 * need) < run.slots:
            self._resize_to(run, bucket(2 * need))

    def _shift_to(self, run: _Run, index: int) -> None:
        run.state, run.index = self._shift(run.state, jnp.int32(index)), index
        self.shifts += 1

    def _resize_to(self, run: _Run, slots: int) -> None:
        self.grows += slots > run.slots
        self.shrinks += slots < run.slots
        run.slots = slots
        run.state = self._resize(run.state, slots=slots)

    def _collect(self, run: _Run, live: list[int], out, n_out, done) -> list[tuple[int, Completion]]:
        """Append each live row's new tokens; a row ends at a stop string (checked on the new text
        only) or when the device marked it done. A row ended by a stop string is marked done on the
        device too, so its slot stops counting as live."""
        finished = []
        for r in live:
            run.toks[r] += out[r, :n_out[r]].tolist()
            req = run.requests[run.rows[r]]
            c = stop_string_cut(run.toks[r], req.stop, run.decode, run.checked[r])
            if c is None and not done[r]:
                run.checked[r] = len(run.toks[r])
                continue
            # a row that stopped in this call drew its stop token at step n_out (decode_chunk writes every draw)
            stop = int(out[r, n_out[r]]) if n_out[r] < out.shape[1] else None
            finished.append((run.rows[r], c or ended(run.toks[r], req.max_new_tokens, run.decode, stop)))
            self._free(run, r)
        if any(run.rows[r] is None and not done[r] for r in range(run.b)):  # ended by a stop string
            run.state = {**run.state, "done": jnp.asarray(done | np.array([x is None for x in run.rows]))}
        return finished

    def _free(self, run: _Run, r: int) -> None:
        run.rows[r] = None
        if run.paged:
            run.pool.give(run.pages_of[r])
            run.pages_of[r], run.table[r] = [], 0

    def _group_args(self, run: _Run, members: list[int], p: int) -> dict:
        """Device arrays of one prefill call: n = a power of two >= len(members) rows; padding rows go
        to slot b (out of range: dropped by `place`) with one token. `shared`: when some prompts are
        the same (an RL rollout's generations, n samples), the distinct ones (a power of two of rows)
        and each row's (src), for `insert` to prefill each once; None when all differ."""
        n = bucket(len(members), 1)
        reqs = [run.requests[run.rows[r]] for r in members]
        tokens, lengths = left_pad([q.tokens for q in reqs], p, n)
        first: dict[tuple, int] = {}
        src = np.array([first.setdefault(tuple(q.tokens), len(first)) for q in reqs] + [0] * (n - len(reqs)), np.int32)
        shared = None
        if len(first) < len(reqs):
            u_tokens, u_lengths = left_pad([list(t) for t in first], p, bucket(len(first), 1))
            shared = dict(tokens=jnp.asarray(u_tokens), lengths=jnp.asarray(u_lengths), src=jnp.asarray(src),
                          n=len(first))
        slot = np.full((n,), run.b, np.int32)
        slot[:len(members)] = members
        cols = {"lengths": lengths, **row_columns(reqs, n)}
        pages = None
        if run.paged:
            pages = np.full((n, run.m), self.g.kv_pages + 1, np.int32)
            for k, r in enumerate(members):
                pages[k, :len(run.pages_of[r])] = run.pages_of[r]
        return dict(tokens=jnp.asarray(tokens), slots=jnp.asarray(slot),
                    rows={f: jnp.asarray(a) for f, a in cols.items()},
                    pages=None if pages is None else jnp.asarray(pages), shared=shared)
