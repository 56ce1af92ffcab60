"""The server's Prometheus metrics, written as the text exposition format (`GET /metrics`).

Counters and histograms are updated from two threads (the HTTP event loop counts requests, the engine
thread tokens and latencies), so every update takes one lock; the gauges are read when scraped. The
names (`llama3_jax_*`) are an interface dashboards key on (docs/serving.md lists them):

    llama3_jax_requests_total{route, status}          counter   HTTP requests answered, by status
    llama3_jax_requests_running                       gauge     rows in decode slots (a request with n: n)
    llama3_jax_requests_waiting                       gauge     rows accepted, waiting for a slot
    llama3_jax_prompt_tokens_total                    counter   prompt tokens of accepted requests
    llama3_jax_generation_tokens_total                counter   tokens generated
    llama3_jax_time_to_first_token_seconds            histogram arrival -> a request's first token
    llama3_jax_inter_token_latency_seconds            histogram between a row's successive tokens
    llama3_jax_kv_pages_in_use / llama3_jax_kv_pages_total  gauge  paged KV cache (--kv-pages) use
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float, times: int = 1) -> None:
        i = next((k for k, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += times
        self.sum += v * times

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        acc += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {self.sum:.6f}", f"{name}_count {acc}"]
        return out


class Metrics:
    """`gauges()` (set by the server once the engine runs) returns {name: value} at scrape time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.gauges: Callable[[], dict[str, float]] = lambda: {}

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def observe(self, ttft: float | None = None, itl: float | None = None, times: int = 1) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl, times)

    def render(self) -> str:
        g = {"requests_running": 0, "requests_waiting": 0, "kv_pages_in_use": 0, "kv_pages_total": 0,
             **self.gauges()}
        with self.lock:
            out = ["# HELP llama3_jax_requests_total HTTP requests answered, by route and status",
                   "# TYPE llama3_jax_requests_total counter"]
            out += [f'llama3_jax_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            for name, what in (("requests_running", "rows in decode slots"),
                               ("requests_waiting", "rows accepted, waiting for a decode slot"),
                               ("kv_pages_in_use", "KV cache pages held by rows (--kv-pages)"),
                               ("kv_pages_total", "KV cache pages in the pool (--kv-pages)")):
                out += [f"# HELP llama3_jax_{name} {what}", f"# TYPE llama3_jax_{name} gauge",
                        f"llama3_jax_{name} {g[name]}"]
            for name, v, what in (("prompt_tokens_total", self.prompt_tokens, "prompt tokens of accepted requests"),
                                  ("generation_tokens_total", self.generation_tokens, "tokens generated")):
                out += [f"# HELP llama3_jax_{name} {what}", f"# TYPE llama3_jax_{name} counter",
                        f"llama3_jax_{name} {v}"]
            for name, h, what in (("time_to_first_token_seconds", self.ttft, "arrival to a request's first token"),
                                  ("inter_token_latency_seconds", self.itl, "time between a row's tokens")):
                out += [f"# HELP llama3_jax_{name} {what}", f"# TYPE llama3_jax_{name} histogram",
                        *h.lines(f"llama3_jax_{name}")]
        return "\n".join(out) + "\n"
