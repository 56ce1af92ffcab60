"""The engine thread: HTTP requests fed into ONE live continuous-batching run (the queue feeder).

The HTTP handlers (server.py, on the event loop) `submit` a `Job` (its checked requests, one row per
choice) and read its events from an asyncio queue; this thread owns the Generator and its Scheduler
and is the only one that touches the device. It is the scheduler's `Feed` (scheduler.py):
  * `poll`, at every host visit: the jobs submitted since the last visit join the run (their rows wait
    for free slots like any others), and the rows of jobs whose client went away are cancelled (a
    waiting row leaves the queue, a decoding one frees its slot at this visit);
  * `progress`: each live row's tokens so far -> a text delta for its client (a stream), holding back
    what a stop string could still cut (its length - 1 characters) and an unfinished UTF-8 character,
    so the deltas always add up to the finished text;
  * each visit's finished rows -> the rest of their text and their finish reason.
Log-probs (`logprobs`, `echo`) are one scoring pass over prompt + tokens (Generator.top_logprobs), on
this thread between visits. A row's tokens are those it gets alone (the engine's guarantee): arrival
time, neighbours and cancellations of others never change them.

Back-pressure: at most batch_size + max_queue rows are accepted and unfinished; past that `submit`
raises 429 with Retry-After. An engine failure answers every job in flight with a 500 (the traceback
goes to the server's stderr, never to a client) and the next run starts afresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
import traceback

import numpy as np

from ..request import Request, generated_tokens
from ..scheduler import Scheduler
from ..engine import STOP_SLOTS
from .metrics import Metrics
from .requests import APIError, Parsed
from .responses import token_logprobs

RETRY_AFTER_S = 1


@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP request in flight. Events on `events`: dicts {index, text, logprobs, finish_reason,
    generated} (finish_reason None: more to come), or an APIError (the job failed)."""
    parsed: Parsed
    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    first_token: float | None = None

    @property
    def n_rows(self) -> int:
        return max(1, len(self.requests))

    def push(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


@dataclasses.dataclass(eq=False)
class _Row:
    job: Job
    index: int              # the choice
    prompt: list[int]
    sent_text: str = ""
    sent_tokens: int = 0
    last: float | None = None


def held_back(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing text safe to send: not the last len(longest stop) - 1 characters (a stop
    string may be completing there, and is cut from the final text), nor a trailing U+FFFD (a
    character whose bytes are not all generated yet)."""
    if stops:
        text = text[:max(0, len(text) - (max(len(s) for s in stops) - 1))]
    return text.rstrip("\ufffd")


class Worker:
    """Owns the engine; see the module docstring. `start()` runs the thread, `close()` ends it."""

    def __init__(self, gen, batch_size: int, max_queue: int, metrics: Metrics):
        self.gen, self.b, self.max_queue, self.metrics = gen, batch_size, max_queue, metrics
        self.scheduler = Scheduler(gen, batch_size)
        stops = gen.default_stop_ids()
        width = max(STOP_SLOTS, -(-len(stops) // STOP_SLOTS) * STOP_SLOTS)
        self.stop_ids = np.array(stops + [-1] * (width - len(stops)), np.int32)
        self.decode = gen.tokenizer.decode
        self.cond = threading.Condition()
        self.inbox: list[Job] = []
        self.outstanding = 0  # rows accepted and not finished
        self.closing = False
        self.rows: dict[int, _Row] = {}  # this run's request index -> its row
        self.next_index = 0
        self.scoring: list[Job] = []     # jobs that only score their prompt (echo, max_tokens 0)
        self.thread = threading.Thread(target=self._loop, name="llama3-jax-engine", daemon=True)

    # ------------------------------------------------------------------ the HTTP side
    def submit(self, job: Job) -> None:
        """Queue a job, or raise APIError 429 (queue full) / 400 (more rows than the server ever holds)."""
        cap = self.b + self.max_queue
        if job.n_rows > cap:
            raise APIError(400, f"the request needs {job.n_rows} rows (prompts x n); this server holds at most "
                                f"{cap} (--batch-size {self.b} + --max-queue {self.max_queue})", "n")
        with self.cond:
            if self.closing:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if self.outstanding + job.n_rows > cap:
                raise APIError(429, f"the queue is full ({self.outstanding} rows in flight, at most {cap}); "
                                    f"retry after {RETRY_AFTER_S}s", code="queue_full")
            self.outstanding += job.n_rows
            self.inbox.append(job)
            self.cond.notify()

    def gauges(self) -> dict[str, float]:
        run = self.scheduler.live
        running = 0 if run is None else sum(x is not None for x in run.rows)
        return {"requests_running": running, "requests_waiting": max(0, self.outstanding - running),
                "kv_pages_in_use": self.scheduler.pages_in_use(), "kv_pages_total": self.gen.kv_pages or 0}

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float | None = None) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout)

    def _release(self, n: int) -> None:
        with self.cond:
            self.outstanding -= n

    # ------------------------------------------------------------------ the engine thread
    def warm_up(self) -> None:
        """Compile the programs a first request needs (a prefill, the decode chunk, the scoring pass) by
        running one through the same live path, before the server says it is ready."""
        req = self.gen.request([0, 0, 0], 2)
        once = [[req]]
        feed = type("Once", (), {"poll": lambda s: (once.pop() if once else [], []),
                                 "admitted": lambda s, i: None, "progress": lambda s, r: None})()
        for _ in self.scheduler.run([], self.stop_ids, self.decode, feed=feed):
            pass
        self.gen.top_logprobs([0, 0, 0])

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.inbox and not self.closing:
                    self.cond.wait()
                if not self.inbox:
                    return
            try:
                self.rows, self.next_index = {}, 0
                for finished in self.scheduler.run([], self.stop_ids, self.decode, feed=self):
                    self._finish(finished)
                    self._score_only()
                self._score_only()
            except Exception:  # noqa: BLE001 - one failure must not end the server
                traceback.print_exc(file=sys.stderr)
                self._fail_all()

    def _fail_all(self) -> None:
        err = APIError(500, "internal error: the engine failed on this batch (see the server's log)")
        jobs = {row.job for row in self.rows.values()} | set(self.scoring)
        for job in jobs:
            job.push(err)
        self._release(len(self.rows) + len(self.scoring))
        self.rows, self.scoring = {}, []
        self.gen._cache = self.gen._pool = None
        self.scheduler = Scheduler(self.gen, self.b)

    # Feed: called by Scheduler.run at each host visit
    def poll(self) -> tuple[list[Request], list[int]]:
        with self.cond:
            jobs, self.inbox = self.inbox, []
        new = []
        for job in jobs:
            if job.cancelled:
                self._release(job.n_rows)
                continue
            self.metrics.add_tokens(prompt=sum(len(p) for p in job.parsed.prompts))
            if not job.requests:
                self.scoring.append(job)
            else:
                for j, req in enumerate(job.requests):
                    self.rows[self.next_index] = _Row(job, j, list(req.tokens))
                    self.next_index += 1
                    new.append(req)
        cancelled = [i for i, row in self.rows.items() if row.job.cancelled]
        for i in cancelled:
            del self.rows[i]
        self._release(len(cancelled))
        return new, cancelled

    def admitted(self, indices: list[int]) -> None:
        pass

    def progress(self, rows: list[tuple[int, list[int]]]) -> None:
        for i, toks in rows:
            row = self.rows.get(i)
            if row is None or len(toks) == row.sent_tokens:
                continue
            text = held_back(self.decode(toks), row.job.parsed.stop)
            delta = text[len(row.sent_text):] if text.startswith(row.sent_text) else ""
            self._send(row, toks, delta, None, len(toks) - row.sent_tokens)

    def _finish(self, finished) -> None:
        for i, c in finished:
            row = self.rows.pop(i, None)
            if row is None:
                continue
            text = c.text or ""
            delta = text[len(row.sent_text):] if text.startswith(row.sent_text) else text
            made = generated_tokens(c, row.job.parsed.stop, self.decode)
            self._send(row, c.tokens, delta, c.finish_reason, made - row.sent_tokens, generated=made)
            self._release(1)

    def _send(self, row: _Row, toks: list[int], delta: str, finish_reason: str | None, new: int,
              generated: int = 0) -> None:
        """One event for a row: the text delta, the log-probs of its new tokens, timings and counts."""
        now, job = time.monotonic(), row.job
        if new > 0:
            if job.first_token is None:
                job.first_token = now
                self.metrics.observe(ttft=now - job.arrival)
            if row.last is not None:
                self.metrics.observe(itl=(now - row.last) / new, times=new)
            row.last = now
            self.metrics.add_tokens(generated=new)
        lp = None
        if job.parsed.logprobs is not None:
            lp = token_logprobs(self.gen.top_logprobs, row.prompt, toks, row.sent_tokens, job.parsed.logprobs,
                                job.parsed.echo)
        job.push({"index": row.index, "text": delta, "logprobs": lp, "finish_reason": finish_reason,
                  "generated": generated})
        row.sent_text += delta
        row.sent_tokens = len(toks)

    def _score_only(self) -> None:
        """Jobs with max_tokens 0 (echo): each choice is its prompt, with the prompt's log-probs."""
        jobs, self.scoring = self.scoring, []
        for job in jobs:
            p = job.parsed
            for i, prompt in enumerate(p.prompts):
                lp = None if p.logprobs is None else token_logprobs(self.gen.top_logprobs, prompt, [], 0, p.logprobs,
                                                                    True)
                for k in range(p.n):
                    job.push({"index": i * p.n + k, "text": "", "logprobs": lp, "finish_reason": "length",
                              "generated": 0})
            self._release(job.n_rows)
