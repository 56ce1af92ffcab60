"""The HTTP app: OpenAI's routes over one engine thread (worker.py), served by uvicorn.

    GET  /health               200 once the engine is restored and its first programs compiled, 503 before
    GET  /metrics              Prometheus text (metrics.py)
    GET  /v1/models            the one served model
    POST /v1/completions       requests.py reads the body, responses.py writes the answer
    POST /v1/chat/completions

Why this shape: uvicorn binds at once and answers /health 503 while a loader thread restores the
checkpoint and compiles (minutes on a large model), so an orchestrator can tell "starting" from "dead".
Each handler checks the key (401), the body's size (413) and JSON, parses it into engine requests
(400/404), and submits a Job (429 when the queue is full); the answer is JSON, or server-sent events
for `stream` (a client that goes away cancels its rows at the next host visit). Every error leaves as
OpenAI's `{"error": {...}}` with its status, an unexpected one as a 500 whose traceback goes to the
server's stderr only, and the server goes on. SIGTERM: uvicorn stops accepting, the requests in flight
finish (at most SHUTDOWN_WAIT_S), the engine thread ends, exit status 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import signal
import sys
import threading
import time
import traceback

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import responses
from .metrics import Metrics
from .requests import APIError, parse, rows
from .worker import RETRY_AFTER_S, Job, Worker

SHUTDOWN_WAIT_S = 30  # SIGTERM: the most seconds the requests in flight get to finish


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `llama3-jax serve` was given (cli/serve.py); `load` builds the engine from it."""
    host: str
    port: int
    model_name: str
    api_key: str | None
    max_queue: int
    max_body_bytes: int
    batch_size: int
    load: object  # () -> Generator: the slow restore, run on the loader thread


class State:
    def __init__(self, settings: Settings):
        self.settings, self.metrics = settings, Metrics()
        self.gen = self.worker = self.uvicorn = None
        self.ready, self.failed, self.created = False, None, int(time.time())

    def load(self) -> None:
        """The loader thread: restore, compile a first request, start the engine thread, say ready."""
        try:
            t0 = time.monotonic()
            self.gen = self.settings.load()
            worker = Worker(self.gen, self.settings.batch_size, self.settings.max_queue, self.metrics)
            worker.warm_up()
            worker.start()
            self.worker, self.metrics.gauges = worker, worker.gauges
            self.ready = True
            s = self.settings
            print(f"llama3-jax serve: ready in {time.monotonic() - t0:.1f}s: model '{s.model_name}' on "
                  f"http://{s.host}:{s.port}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - reported as one line by the CLI after uvicorn stops
            msg = str(e).strip().splitlines()
            self.failed = msg[0] if msg else type(e).__name__
            if self.uvicorn is not None:
                self.uvicorn.should_exit = True


def _error(e: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _auth(state: State, request: Request) -> None:
    key = state.settings.api_key
    if key is None:
        return
    got = request.headers.get("authorization", "")
    if not got.startswith("Bearer "):
        raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    if not secrets.compare_digest(got[len("Bearer "):].encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key")


def _ready(state: State) -> None:
    if not state.ready:
        raise APIError(503, "the model is still loading", code="not_ready")


async def _body(state: State, request: Request):
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)",
                       code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


async def _collect(job: Job, request: Request) -> list[responses.Choice] | None:
    """Wait for every choice to finish; None when the client went away (its rows are cancelled)."""
    n = len(job.parsed.prompts) * job.parsed.n
    choices, left = [responses.Choice() for _ in range(n)], n
    while left:
        try:
            ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                return None
            continue
        if isinstance(ev, APIError):
            raise ev
        c = choices[ev["index"]]
        c.text += ev["text"]
        if ev["logprobs"] is not None:
            c.logprobs = ev["logprobs"] if c.logprobs is None else c.logprobs + ev["logprobs"]
        if ev["finish_reason"] is not None:
            c.finish_reason, c.generated, left = ev["finish_reason"], ev["generated"], left - 1
    return choices


async def _stream(state: State, job: Job, rid: str):
    """Server-sent events: a first chunk per choice (chat: the role; echo: the prompt), then each
    delta as the engine delivers it, the usage chunk if asked, `data: [DONE]`."""
    p, name, decode = job.parsed, state.settings.model_name, state.gen.tokenizer.decode
    n = len(p.prompts) * p.n
    choices, offsets, left = [responses.Choice() for _ in range(n)], [0] * n, n
    try:
        for j in range(n):
            if p.route == "chat":
                yield _sse(responses.chat_chunk(rid, name, j, {"role": "assistant", "content": ""}, None, None, decode))
            elif p.echo:
                offsets[j] = len(p.prompt_texts[j // p.n])
                yield _sse(responses.completion_chunk(rid, name, j, p.prompt_texts[j // p.n], None, None, 0, decode))
        while left:
            ev = await job.events.get()
            if isinstance(ev, APIError):
                yield _sse(ev.body())
                break
            j, fr = ev["index"], ev["finish_reason"]
            if fr is not None:
                choices[j].generated, left = ev["generated"], left - 1
            if p.route == "chat":
                yield _sse(responses.chat_chunk(rid, name, j, {"content": ev["text"]}, ev["logprobs"], fr, decode))
            else:
                yield _sse(responses.completion_chunk(rid, name, j, ev["text"], ev["logprobs"], fr, offsets[j], decode))
            offsets[j] += len(ev["text"])
        if p.include_usage and not left:
            yield _sse(responses.usage_chunk(rid, name, p, choices))
        yield "data: [DONE]\n\n"
    finally:
        if left:
            job.cancelled = True


async def _generate(state: State, route: str, request: Request):
    _auth(state, request)
    _ready(state)
    body = await _body(state, request)
    gen = state.gen
    try:
        parsed = await run_in_threadpool(parse, route, body, gen, state.settings.model_name)
        reqs = rows(parsed, gen)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    job = Job(parsed, reqs, asyncio.get_running_loop(), asyncio.Queue())
    state.worker.submit(job)
    rid = responses.new_id(route)
    if parsed.stream:
        return StreamingResponse(_stream(state, job, rid), media_type="text/event-stream")
    choices = await _collect(job, request)
    if choices is None:
        return JSONResponse({}, status_code=499)  # nobody is listening
    build = responses.chat_body if route == "chat" else responses.completion_body
    return JSONResponse(build(rid, state.settings.model_name, parsed, choices, gen.tokenizer.decode))


def create_app(state: State) -> FastAPI:
    """The FastAPI app over `state` (no docs routes: every route is OpenAI's or ours)."""

    async def lifespan(app):
        threading.Thread(target=state.load, name="llama3-jax-load", daemon=True).start()
        yield
        if state.worker is not None:
            state.worker.close(SHUTDOWN_WAIT_S)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def answer(route: str, fn, *args):
        try:
            resp = await fn(*args)
        except APIError as e:
            resp = _error(e)
        except Exception:  # noqa: BLE001 - the traceback stays on the server
            traceback.print_exc(file=sys.stderr)
            resp = _error(APIError(500, "internal error (see the server's log)"))
        state.metrics.count_request(route, resp.status_code)
        return resp

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer("/v1/completions", _generate, state, "completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer("/v1/chat/completions", _generate, state, "chat", request)

    @app.get("/v1/models")
    async def models(request: Request):
        async def listing():
            _auth(state, request)
            _ready(state)
            return JSONResponse(responses.model_list(state.settings.model_name, state.created,
                                                     state.gen.cfg.max_seq_len))
        return await answer("/v1/models", listing)

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok"}) if state.ready else _error(APIError(503, "the model is still loading",
                                                                                 code="not_ready"))

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, exc: HTTPException):
        state.metrics.count_request("other", exc.status_code)
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(APIError(exc.status_code, msg, code="unknown_url").body(), status_code=exc.status_code)

    return app


def serve(settings: Settings) -> int:
    """Run until SIGTERM / SIGINT; raises ValueError (one line) when the engine could not load."""
    state = State(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=settings.host, port=settings.port,
                                           log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=SHUTDOWN_WAIT_S))
    state.uvicorn = server
    # uvicorn raises the signal again after its graceful shutdown; a no-op handler makes that exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if state.failed:
        raise ValueError(state.failed)
    return 0
