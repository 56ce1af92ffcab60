"""OpenAI request bodies -> checked engine requests, and the one error shape (validation at the edge).

`parse(route, body, gen, model_name)` reads a `/v1/completions` or `/v1/chat/completions` body into a
`Parsed` (prompts as token ids, the knobs), and `rows(parsed, gen)` into the engine's Requests: one per
(prompt, sample), prompt-major, so choice `index` = prompt * n + sample. Everything wrong with a body
raises `APIError`, whose `body()` is OpenAI's `{"error": {"message", "type", "param", "code"}}`: the
server answers it with its status, and OpenAI batch files (`generate`, later) will write the same
body into their error lines, without HTTP. Nothing here imports the web framework.

What a body may hold (OpenAI's names; unknown keys are ignored, as OpenAI's SDKs send extras):
  completions: prompt (text, list of texts, token ids, list of token-id lists), max_tokens (default
    16; 0 only with echo), echo, logprobs (0-20 alternatives), suffix/best_of refused;
  chat: messages (Llama 3's chat format, content as text or text parts), max_completion_tokens /
    max_tokens (default: the rest of the context), logprobs (bool) + top_logprobs (0-20);
  both: model (must be the served name: 404 otherwise), temperature (default 1), top_p, n, stop (a
    string or up to 16: OpenAI allows 4, but lm-evaluation-harness sends a task's `until` strings plus the
    EOS text, often more), seed, stream, stream_options.include_usage, and the extensions top_k and
    ignore_eos. Penalties, logit_bias and tools are refused unless at their neutral values.
Sampling: sample k of a prompt draws from fold_in(key(seed), k), so with a `seed` a choice equals the
`generate` line {"seed": seed} sample k; without one the server draws a random seed per request.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

from .. import sampling
from ..request import Request

MAX_LOGPROBS = 20  # OpenAI's most alternatives per position (scoring.TOP_LOGPROBS computes this many)
MAX_STOP = 16
MAX_N = 128

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer in OpenAI's error shape: `status` (HTTP), message, param (the field at fault), code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_value" if param else None)


@dataclasses.dataclass(frozen=True)
class Parsed:
    """One checked body. `prompts`: token ids per prompt; `prompt_texts`: what `echo` gives back."""
    route: str                 # "completions" or "chat"
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    max_tokens: int | None     # None: the rest of the context
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None       # alternatives per position; None: no log-probs
    echo: bool
    ignore_eos: bool

    @property
    def n_rows(self) -> int:
        """Engine rows: n per prompt (none when only the prompt is scored: max_tokens 0)."""
        return 0 if self.max_tokens == 0 else len(self.prompts) * self.n


# ------------------------------------------------------------------------------------ field readers


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(f"'{name}' must be an integer {rng}, got {v!r}", name)
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise bad(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {v!r}", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or any(not isinstance(s, str) or not s for s in stop):
        raise bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stop)


def _refuse_unsupported(body: dict, route: str) -> None:
    neutral = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "suffix": "", "tools": [],
               "functions": [], "repetition_penalty": 1}
    for k, ok in neutral.items():
        if body.get(k) not in (None, ok):
            raise bad(f"'{k}' is not supported by this server", k)
    if route == "completions" and body.get("best_of") not in (None, body.get("n", 1)):
        raise bad("'best_of' other than n is not supported by this server", "best_of")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("'response_format' other than text is not supported by this server", "response_format")


# ---------------------------------------------------------------------------------------- prompts


def _completion_prompts(body: dict, gen) -> tuple[list[list[int]], list[str]]:
    """prompt: a text, a list of texts, a list of token ids, or a list of token-id lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad("'prompt' must be a non-empty string, a list of strings, a list of token ids or a list of "
                  "token-id lists", "prompt")
    ids, texts = [], []
    for i, x in enumerate(p):
        where = "prompt" if len(p) == 1 else f"prompt[{i}]"
        if isinstance(x, str):
            if not x:
                raise bad(f"'{where}' is empty", "prompt")
            ids.append(gen.tokenizer.encode(x, bos=True, eos=False))
            texts.append(x)
        elif isinstance(x, list):
            try:
                gen.check_ids(x, f"'{where}'")
            except ValueError as e:
                raise bad(str(e), "prompt") from None
            ids.append([int(t) for t in x])
            texts.append(gen.tokenizer.decode(ids[-1]))
        else:
            raise bad(f"'{where}' must be a string or a list of token ids", "prompt")
    return ids, texts


def _chat_prompt(body: dict, gen) -> list[int]:
    """messages -> Llama 3's chat format, ending in an open assistant header."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} messages", "messages")
    if not hasattr(gen.tokenizer, "encode_dialog"):
        raise bad("this checkpoint's tokenizer has no Llama 3 chat format", "messages")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(c, dict) or c.get("type") != "text" or not isinstance(c.get("text"), str)
                   for c in content):
                raise bad(f"messages[{i}]['content']: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        flat.append({"role": m.get("role"), "content": content if content is not None else ""})
    try:
        ids = gen.tokenizer.encode_dialog(flat)
        gen.check_ids(ids, "'messages'")
    except ValueError as e:
        raise bad(str(e), "messages") from None
    return ids


def _check_fit(gen, ids: Sequence[int], max_tokens: int | None, where: str) -> None:
    """400 when a prompt (+ max_tokens) does not fit the context, saying by how much."""
    ctx, n = gen.cfg.max_seq_len, len(ids)
    head = f"This model's maximum context length is {ctx} tokens; {where} has {n} tokens"
    if max_tokens == 0:
        if n > ctx:
            raise bad(f"{head}: {n - ctx} too many", "prompt")
        return
    if max_tokens is None and n >= ctx:
        raise bad(f"{head}, which leaves no room for a completion: {n - ctx + 1} tokens too many", "messages")
    if max_tokens is not None and n + max_tokens > ctx:
        raise bad(f"{head} and max_tokens is {max_tokens}: {n + max_tokens - ctx} tokens too many", "max_tokens")
    err = gen.context_error(n, max_tokens or 0)  # the paged cache's own limit
    if err:
        raise bad(err, "max_tokens")


# ------------------------------------------------------------------------------------------- parse


def parse(route: str, body, gen, model_name: str) -> Parsed:
    """A checked request of `route` ("completions" or "chat") for the served model `gen`. Raises APIError."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if body.get("model") is None:
        raise bad("you must provide a model parameter", "model")
    if body["model"] != model_name:
        raise APIError(404, f"The model '{body['model']}' does not exist; this server serves '{model_name}'",
                       "model", "model_not_found")
    _refuse_unsupported(body, route)
    chat = route == "chat"
    if chat:
        ids = [_chat_prompt(body, gen)]
        texts = [""]
        max_tokens = _int(body, "max_completion_tokens", None, 1)
        max_tokens = _int(body, "max_tokens", None, 1) if max_tokens is None else max_tokens
        logprobs = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS) if _bool(body, "logprobs") else None
        if not _bool(body, "logprobs") and body.get("top_logprobs") is not None:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        echo = False
    else:
        ids, texts = _completion_prompts(body, gen)
        max_tokens = _int(body, "max_tokens", 16, 0)
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        echo = _bool(body, "echo")
        if max_tokens == 0 and not echo:
            raise bad("'max_tokens' must be >= 1 (0 only with 'echo')", "max_tokens")
    for i, p in enumerate(ids):
        _check_fit(gen, p, max_tokens, "the prompt" if len(ids) == 1 else f"prompt[{i}]")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", 0, -1)
    top_k = 0 if top_k == -1 else top_k  # vLLM's "off"
    try:
        sampling.check_flags(temperature, top_k, top_p, where="'")
    except ValueError as e:
        raise bad(str(e), "top_p") from None
    seed = _int(body, "seed", None, -2**31, 2**31 - 1)
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not body.get("stream")):
        raise bad("'stream_options' must be an object, and only with 'stream': true", "stream_options")
    return Parsed(route, ids, texts, n=_int(body, "n", 1, 1, MAX_N), max_tokens=max_tokens,
                  temperature=temperature, top_p=top_p, top_k=top_k,
                  seed=secrets.randbits(31) if seed is None else seed, stop=_stop(body),
                  stream=_bool(body, "stream"), include_usage=bool((opts or {}).get("include_usage")),
                  logprobs=logprobs, echo=echo, ignore_eos=_bool(body, "ignore_eos"))


def rows(parsed: Parsed, gen) -> list[Request]:
    """The engine's Requests: prompt-major, sample k of a prompt on stream (seed, k)."""
    if parsed.max_tokens == 0:
        return []
    sampler = sampling.from_flags(parsed.temperature, parsed.top_k, parsed.top_p)
    return [dataclasses.replace(gen.request(p, parsed.max_tokens, sampler, seed=parsed.seed, row_seed=k,
                                            stop=parsed.stop), ignore_eos=parsed.ignore_eos)
            for p in parsed.prompts for k in range(parsed.n)]
