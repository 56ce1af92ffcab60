"""OpenAI response bodies and stream chunks, built from finished (or growing) choices.

One builder per shape, so the server's answers and (later) the OpenAI batch output lines of
`generate` are the same JSON: `completion_body` / `chat_body` (a whole answer), `completion_chunk` /
`chat_chunk` (one server-sent event of a stream), `usage_chunk` (stream_options.include_usage),
`model_list`. Log-probs come as `TokenLogprobs` (what Generator.top_logprobs computed for a span of
tokens) and are laid out in the completions format (tokens, token_logprobs, top_logprobs,
text_offset) or the chat format (content: [{token, logprob, bytes, top_logprobs}]).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from .requests import Parsed


@dataclasses.dataclass
class TokenLogprobs:
    """Log-probs of a span of tokens: ids, logprob per id (None: the first prompt token, which has no
    context), and up to k alternatives per position as (id, logprob) pairs, likeliest first."""
    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]

    def __add__(self, other: TokenLogprobs) -> TokenLogprobs:
        return TokenLogprobs(self.ids + other.ids, self.logprobs + other.logprobs, self.top + other.top)


@dataclasses.dataclass
class Choice:
    """One choice as it grows: text and token ids so far, log-probs so far, and how it ended."""
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    generated: int = 0  # tokens generated, a stop token included (usage)


def token_logprobs(top_logprobs, prompt: list[int], toks: list[int], start: int, k: int, echo: bool) -> TokenLogprobs:
    """Log-probs of toks[start:] after `prompt` (+ the prompt's own first, with `echo` and start 0), k
    alternatives each: one scoring pass (`top_logprobs`: Generator.top_logprobs) over prompt + toks. The
    server calls it per delta of a growing row, a batch file once per finished row."""
    seq = list(prompt) + list(toks)
    if len(seq) < 2:
        return TokenLogprobs(list(seq), [None] * len(seq), [[] for _ in seq])
    picked, ids, vals = top_logprobs(seq)

    def span(lo: int, hi: int) -> TokenLogprobs:  # seq positions lo..hi-1, scored at column pos - 1
        cols = range(lo - 1, hi - 1)
        return TokenLogprobs(seq[lo:hi], [float(picked[c]) for c in cols],
                             [list(zip(ids[c, :k].tolist(), vals[c, :k].tolist())) for c in cols])

    out = span(len(prompt) + start, len(seq))
    if echo and start == 0:
        out = TokenLogprobs([prompt[0]], [None], [[]]) + span(1, len(prompt)) + out
    return out


def new_id(route: str) -> str:
    return ("chatcmpl-" if route == "chat" else "cmpl-") + uuid.uuid4().hex


def _completion_logprobs(lp: TokenLogprobs | None, decode, offset: int) -> dict | None:
    if lp is None:
        return None
    tokens = [decode([t]) for t in lp.ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [None if v is None else {decode([t]): p for t, p in alts} for v, alts in zip(lp.logprobs, lp.top)]
    return {"tokens": tokens, "token_logprobs": lp.logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(lp: TokenLogprobs | None, decode) -> dict | None:
    if lp is None:
        return None

    def entry(t: int, p: float) -> dict:
        s = decode([t])
        return {"token": s, "logprob": p, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(t, p), "top_logprobs": [entry(a, q) for a, q in alts]}
                        for t, p, alts in zip(lp.ids, lp.logprobs, lp.top)]}


def usage(parsed: Parsed, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in parsed.prompts)
    completion = sum(c.generated for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, parsed: Parsed, choices: list[Choice], decode) -> dict:
    """/v1/completions: choice i*n + k is prompt i's sample k; echo puts the prompt text in front."""
    out = []
    for j, c in enumerate(choices):
        prefix = parsed.prompt_texts[j // parsed.n] if parsed.echo else ""
        out.append({"index": j, "text": prefix + c.text, "logprobs": _completion_logprobs(c.logprobs, decode, 0),
                    "finish_reason": c.finish_reason})
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage(parsed, choices)}


def chat_body(rid: str, model: str, parsed: Parsed, choices: list[Choice], decode) -> dict:
    out = [{"index": j, "message": {"role": "assistant", "content": c.text},
            "logprobs": _chat_logprobs(c.logprobs, decode), "finish_reason": c.finish_reason}
           for j, c in enumerate(choices)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage(parsed, choices)}


def completion_chunk(rid: str, model: str, index: int, text: str, lp: TokenLogprobs | None,
                     finish_reason: str | None, offset: int, decode) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": _completion_logprobs(lp, decode, offset),
                         "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict, lp: TokenLogprobs | None,
               finish_reason: str | None, decode) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": _chat_logprobs(lp, decode),
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, parsed: Parsed, choices: list[Choice]) -> dict:
    obj = "chat.completion.chunk" if parsed.route == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(parsed, choices)}


def model_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "llama3-jax", "max_model_len": max_model_len}]}
