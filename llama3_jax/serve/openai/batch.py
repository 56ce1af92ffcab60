"""OpenAI Batch API files through `generate`: request lines in, the server's answers out, resumable.

An input whose first JSON line has a "custom_id" is a batch file (the format of OpenAI's Batch API and
vLLM's run_batch); each line is
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
and its output line is
    {"id": "batch_req_...", "custom_id": "...", "response": {"status_code", "request_id", "body"}, "error"}
where `body` is what `llama3-jax serve` answers that body with (requests.py reads it, responses.py
writes it: the same code), so a batch file and a live server give the same bodies.

What differs from the server, and why:
  * the body's `model` names whatever the batch was written for; one checkpoint runs per job, so it
    is not checked (the answer's `model` repeats it; the checkpoint path when there is none);
  * a body without `seed` draws from a seed made of --seed and its custom_id (the server draws a
    random one): a rerun and a resume give the same output;
  * `stream: true` is refused (a file holds whole answers), as vLLM's run_batch does.
What can go wrong with a line, and what happens:
  * not JSON, not an object, no custom_id, a custom_id seen before: `FILE:LINE: skipped: why` on
    stderr, no output line (generate's rule for bad lines);
  * another method or url, or a body the server would refuse: an output line with the server's status
    and error body in `response` (and its error object in `error`, where vLLM's readers look), and
    the rest of the file goes on. Such lines are tried again by a rerun, as generate's error lines;
  * a crash: lines already written are done (by custom_id); a torn last line is cut off (jsonl.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
import zlib
from pathlib import Path

from ..jsonl import read_lines, report
from ..request import generated_tokens
from . import responses
from .requests import APIError, parse, rows

ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


def is_batch_file(path) -> bool:
    """Whether the input is an OpenAI batch file: its first line that reads as a JSON object has a
    "custom_id" (a bad first line is reported later, by the reader, as any bad line)."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                return "custom_id" in rec
    return False


def _line(rec: dict) -> dict:
    """A batch line's own fields (the body is checked later, into an answer)."""
    if not isinstance(rec["custom_id"], str):
        raise ValueError(f"'custom_id' must be a string, got {rec['custom_id']!r}")
    return {"method": rec.get("method"), "url": rec.get("url"), "body": rec.get("body")}


def output_line(custom_id: str, status: int, body: dict) -> dict:
    error = body["error"] if status != 200 else None
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": error}


def check(custom_id: str, line: dict, args) -> tuple[str, str, dict]:
    """(route, model name, the body to parse) of a line, or APIError as the server would answer it."""
    method, url, body = line["method"], line["url"], line["body"]
    if url not in ROUTES or method != "POST":  # the server's 404 / 405, word for word
        raise APIError(404 if url not in ROUTES else 405, f"no route {method} {url}", code="unknown_url")
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "body")
    if body.get("stream"):
        raise APIError(400, "'stream' is not supported in a batch file: each line gets one whole answer",
                       "stream", "invalid_value")
    model = body["model"] if isinstance(body.get("model"), str) else str(args.checkpoint)
    if body.get("seed") is None:
        body = {**body, "seed": zlib.crc32(json.dumps([args.seed, custom_id]).encode()) & 0x7FFFFFFF}
    return ROUTES[url], model, {**body, "model": model}


def _parsed(custom_id: str, line: dict, gen, args):
    """(model name, Parsed, its engine Requests) of a line, or APIError."""
    route, model, body = check(custom_id, line, args)
    try:
        parsed = parse(route, body, gen, model)
        return model, parsed, rows(parsed, gen)
    except ValueError as e:  # a tokenizer's own refusal: the server answers it as a 400 too
        raise APIError(400, str(e)) from None


def pieces(args, gen, done: set, keep, out):
    """`next_piece(size)` for process 0: the next batch lines to run (their checked bodies), writing
    at once the answers of lines the server would refuse."""
    reader: dict = {"counts": {}}

    def next_piece(size: int) -> dict:
        if "lines" not in reader:
            reader["lines"] = read_lines(args.input, done, _line, keep, reader["counts"], id_field="custom_id")
        items = list(itertools.islice(reader["lines"], size))
        todo, errors = [], []
        for lineno, custom_id, line in items:
            try:
                _parsed(custom_id, line, gen, args)
                todo.append((custom_id, line))
            except APIError as e:
                report(f"{args.input}:{lineno}: error: {e.status}: {e.message}")
                errors.append(output_line(custom_id, e.status, e.body()))
        if out is not None:
            out.write(errors)
        return {"lines": todo, "rows": len(todo), "todo": len(todo), "errors": len(errors),
                "counts": dict(reader["counts"]), "last": len(items) < size}

    return next_piece


@dataclasses.dataclass
class _Job:
    custom_id: str
    model: str
    parsed: object
    choices: list
    left: int


def batches(args, gen, piece):
    """Run a piece's lines on the engine (every process parses them again: the bodies are the piece);
    yields (output lines, generated tokens) as each line's last choice finishes."""
    jobs, reqs, owner = [], [], []
    for custom_id, line in piece["lines"]:
        model, parsed, line_rows = _parsed(custom_id, line, gen, args)
        job = _Job(custom_id, model, parsed, [responses.Choice() for _ in range(len(parsed.prompts) * parsed.n)],
                   parsed.n_rows)
        jobs.append(job)
        for j, r in enumerate(line_rows):
            reqs.append(r)
            owner.append((job, j))
    scored = [_answer(job, gen) for job in jobs if job.left == 0]  # echo with max_tokens 0: no rows
    if scored:
        yield scored, 0
    for batch in gen.generate_requests(reqs, batch_size=args.batch_size,
                                       continuous=not getattr(args, "static_batching", False)):
        done, tokens = [], 0
        for i, c in batch:
            job, j = owner[i]
            made = generated_tokens(c, job.parsed.stop, gen.tokenizer.decode)
            job.choices[j] = responses.Choice(text=c.text, tokens=list(c.tokens), finish_reason=c.finish_reason,
                                              generated=made)
            tokens += made
            job.left -= 1
            if job.left == 0:
                done.append(_answer(job, gen))
        yield done, tokens


def _answer(job: _Job, gen) -> dict:
    """The output line of a finished job: its choices' log-probs (one scoring pass each, as the
    server's), the body the server would send."""
    p, decode = job.parsed, gen.tokenizer.decode
    if p.logprobs is not None:
        for j, c in enumerate(job.choices):
            prompt = p.prompts[j // p.n]
            toks = [] if p.max_tokens == 0 else c.tokens
            c.logprobs = responses.token_logprobs(gen.top_logprobs, prompt, toks, 0, p.logprobs, p.echo)
    if p.max_tokens == 0:
        for c in job.choices:
            c.finish_reason = "length"
    build = responses.chat_body if p.route == "chat" else responses.completion_body
    return output_line(job.custom_id, 200, build(responses.new_id(p.route), job.model, p, job.choices, decode))
