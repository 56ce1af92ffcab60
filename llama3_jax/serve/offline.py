"""`llama3-jax generate` and `score`: JSONL in, JSONL out, resumable after a crash.

generate input lines (one of prompt / messages / tokens):
    {"id": ..., "prompt": "text"}                 BOS is added
    {"id": ..., "messages": [{"role", "content"}]} Llama 3 chat format, ends in an open assistant header
    {"id": ..., "tokens": [ids]}                  used as given
optional per-line knobs, overriding the command line: "max_new_tokens", "temperature", "top_p", "top_k",
"seed", "stop" (a list of strings: generation ends at the first one, cut from "text"), "n" (samples of
this line, overriding --num-samples).
output lines: {"id", "text", "tokens", "finish_reason": "stop" | "length"}; tokens exclude a stop token
(with a stop string they end with the token that completed it).
--num-samples N > 1 (or a line's "n" > 1): N lines per input line, each with its "sample" index 0..N-1
(best-of-N data sets: generate, then score, then keep the best as SFT data); sample k's random stream
comes from (id, k) (or from (the line's seed, k)), so it is the same whatever the batching, and sample 0
is what a single-sample run draws.
score input lines: {"id", "prompt", "completion"} (text; BOS before the prompt) or
{"id", "prompt_tokens", "completion_tokens"}; output {"id", "tokens", "logprobs", "sum_logprob"}.

Behaviour the tests pin down:
  * rows run through --batch-size decode slots refilled as rows finish (--static-batching: whole batches
    sorted by length); finished rows are appended to the output at once (flush + fsync), so output
    order is not input order;
  * a rerun with the same output skips ids already there; a torn last line from a crash is cut off;
  * a bad input line (invalid JSON, missing or duplicate id, no prompt, a token id outside the
    vocabulary, ...) is reported on stderr as `FILE:LINE: skipped: why` and skipped;
  * a prompt that does not fit the context (prompt + max_new_tokens > max_seq_len) is not a crash: it
    gets an output line {"id", "error": "..."} (and a stderr report); a rerun drops those lines from the
    output and tries those ids again (with other options they may fit);
  * without --max-new-tokens each prompt generates until a stop token or the end of the context;
  * the summary line says when every line failed, and the command then exits with status 1;
  * the input is read, checked and run --read-lines lines at a time (each piece's rows are done before
    the next piece is read; several processes: process 0 reads each piece and sends it to the others),
    so no host holds the whole input; only the ids seen are kept, to report duplicates.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

from . import sampling
from ..parallel.distributed import is_main
from .engine import Generator
from ..parallel.multihost_io import on_main
from ..parallel.sharding import inference_mesh, parse_mesh

# ------------------------------------------------------------------------------------ JSONL plumbing


def _key(id_) -> str:
    """Ids are compared by their JSON text, so 1 and "1" are different ids."""
    return json.dumps(id_)


def _report(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_done(path: Path) -> set[str]:
    """Ids already in an output file. A torn last line (no newline: the writer died mid-line) is cut off
    the file, so the lines appended next start clean; it was never counted as done. Error lines
    ({"id", "error"}) are not done either: they are dropped from the file (rewritten atomically) and
    their ids are tried again."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    body, _, tail = data.rpartition(b"\n")
    done, kept, errors = set(), [], 0
    for lineno, line in enumerate(body.split(b"\n") if body else [], start=1):
        try:
            rec = json.loads(line)
            key = _key(rec["id"]) if "sample" not in rec else (_key(rec["id"]), int(rec["sample"]))
        except (ValueError, KeyError, TypeError):
            if line.strip():
                _report(f"{path}:{lineno}: unreadable output line ignored")
            kept.append(line)
            continue
        if isinstance(rec, dict) and "error" in rec:
            errors += 1
            continue
        done.add(key)
        kept.append(line)
    if tail:
        _report(f"{path}: dropping a torn last line ({len(tail)} bytes) left by an interrupted run")
    if errors:
        _report(f"{path}: trying again {errors} ids whose earlier output was an error line")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    elif tail:
        os.truncate(path, len(data) - len(tail))
    return done


class Appender:
    """Appends records and makes each batch durable (flush + fsync) before the next one starts."""

    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if records:
            self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def read_lines(path: Path, done: set[str], parse, keep=None, counts: dict | None = None
               ) -> Iterator[tuple[int, object, object]]:
    """Parse each input line with `parse(record) -> payload` (raises ValueError on a bad line);
    `keep(lineno)` False: the line is another shard's, not read at all.

    Yields (lineno, id, payload) one line at a time, so the input is read a piece at a time (the ids
    seen are kept, to find duplicates). Bad lines are reported and skipped; lines whose id is already
    in the output are skipped quietly; both are counted in `counts` ({"bad", "resumed"}) as they pass.
    """
    path = Path(path)  # its existence is checked before the model restore (_open)
    seen = {}
    counts = counts if counts is not None else {}
    counts.setdefault("bad", 0)
    counts.setdefault("resumed", 0)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip() or (keep is not None and not keep(lineno)):
                continue
            try:
                # without its newline, so an unfinished line's error points into that line
                rec = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))  # UnicodeDecodeError is a ValueError too
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                if "id" not in rec:
                    raise ValueError("missing 'id'")
                id_ = rec["id"]
                if isinstance(id_, bool) or not isinstance(id_, (str, int)):
                    raise ValueError(f"'id' must be a string or an integer, got {id_!r}")
                key = _key(id_)
                if key in seen:
                    raise ValueError(f"duplicate id {id_!r} (first on line {seen[key]})")
                seen[key] = lineno
                if key in done:
                    counts["resumed"] += 1
                    continue
                item = (lineno, id_, parse(rec))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                msg = f"invalid JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else e
                _report(f"{path}:{lineno}: skipped: {msg}")
                counts["bad"] += 1
                continue
            yield item


PIECE_LINES = 4096  # --read-lines default


def _pieces(args, next_piece) -> Iterator[dict]:
    """Every process's copy of each piece of the input that process 0 reads (`next_piece()`: at most
    --read-lines lines to run, checked, their error lines written), until one says it was the last.
    Each piece is run before the next is read, so no host holds the whole input."""
    n = getattr(args, "read_lines", None)
    n = PIECE_LINES if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--read-lines must be >= 1, got {n}")
    while True:
        piece = on_main(lambda: next_piece(n))
        yield piece
        if piece["last"]:
            return


def _token_list(rec: dict, key: str) -> list[int]:
    ids = rec[key]
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise ValueError(f"'{key}' must be a list of integer token ids")
    return ids


def _one_of(rec: dict, keys: tuple[str, ...]) -> str:
    present = [k for k in keys if k in rec]
    if len(present) != 1:
        names = ", ".join(repr(k) for k in keys)
        raise ValueError(f"expected exactly one of {names}, got {present or 'none'}")
    return present[0]


def shard_path(output: str | Path, num_shards: int, shard_index: int) -> Path:
    """Shard I of N writes OUT-0000I-of-0000N.jsonl beside OUT.jsonl (tools/merge_outputs.py joins them)."""
    output = Path(output)
    if num_shards == 1:
        return output
    return output.with_name(f"{output.stem}-{shard_index:05d}-of-{num_shards:05d}{output.suffix}")


def _shard(args):
    """--num-shards N --shard-index I: (args writing to this shard's output, a filter keeping input lines
    I+1, I+1+N, ...), so N machines (a GKE Indexed Job, a SLURM array) split one input file."""
    n, i = getattr(args, "num_shards", 1), getattr(args, "shard_index", 0)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard-index must be in [0, --num-shards) and --num-shards >= 1, got {i} and {n}")
    if n == 1:
        return args, None
    args = copy.copy(args)
    args.output = str(shard_path(args.output, n, i))
    return args, lambda lineno: (lineno - 1) % n == i


def _open(args, generator: Generator | None) -> tuple[set[str], Generator]:
    """Check the shared flags and paths before the (slow) model restore, then read the ids already
    in the output and restore the model on --mesh (default: sharding.inference_mesh). Returns (done
    ids, generator). Several processes: the files are process 0's (the others get its errors and an
    empty done set); every process restores its shards of the model."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sizes = parse_mesh(getattr(args, "mesh", None))
    mine = {}

    def check():
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"input file not found: {args.input}")
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise ValueError(f"--output {args.output} is the input file")
        mine["done"] = read_done(args.output)

    on_main(check)
    gen = generator or Generator(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer,
                                 mesh=inference_mesh(sizes), quantize=getattr(args, "quantize", None),
                                 kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
                                 prefill_chunk=getattr(args, "prefill_chunk", None),
                                 kv_pages=getattr(args, "kv_pages", None), page_size=getattr(args, "page_size", 64),
                                 paged_attention=getattr(args, "paged_attention", "auto"))
    return mine.get("done", set()), gen


def _fitting(items, context_error, input_path, out: Appender) -> tuple[list[tuple[object, object]], list[dict]]:
    """Split parsed lines into those that fit the model's context ([(id, payload)]) and per-row errors,
    which are reported with their line numbers and written to the output at once (a rerun skips them)."""
    todo, errors = [], []
    for lineno, id_, payload in items:
        err = context_error(payload)
        if err:
            _report(f"{input_path}:{lineno}: error: {err}")
            errors.append({"id": id_, "error": err})
        else:
            todo.append((id_, payload))
    out.write(errors)
    return todo, errors


class Progress:
    """tqdm over prompts with generated tokens/s in the postfix. The input arrives a piece at a time, so
    the total grows by each piece's rows (`grow`); the bar appears with the first row."""

    def __init__(self, what: str):
        self.what, self.bar = what, None
        self.start, self.tokens = time.perf_counter(), 0

    def grow(self, n: int) -> None:
        if n and self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=n, unit=self.what, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                            disable=not is_main())
        elif n:
            self.bar.total += n
            self.bar.refresh()

    def update(self, n: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(n)
        self.bar.set_postfix_str(f"{self.rate():.1f} tokens/s", refresh=False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ generate


KNOBS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n")


def line_knobs(rec: dict, args) -> dict:
    """A line's knobs over the command line's: {max_new_tokens, temperature, top_k, top_p, seed, stop, n}.
    Raises ValueError naming the bad key."""
    k = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
         "top_p": args.top_p, "seed": None, "stop": (), "n": getattr(args, "num_samples", 1)}
    k.update({n: rec[n] for n in KNOBS if n in rec})
    for name in ("max_new_tokens", "n"):
        m = k[name]
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"'{name}' must be an integer >= 1, got {m!r}")
    sampling.check_flags(k["temperature"], k["top_k"], k["top_p"], where="'")
    if k["seed"] is not None and (isinstance(k["seed"], bool) or not isinstance(k["seed"], int)
                                  or not -2**31 <= k["seed"] < 2**31):
        raise ValueError(f"'seed' must be a 32-bit integer, got {k['seed']!r}")
    stop = k["stop"]
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or any(not isinstance(x, str) or not x for x in stop):
        raise ValueError(f"'stop' must be a list of non-empty strings, got {stop!r}")
    k["stop"] = tuple(stop)
    return k


def run_generate(args, generator: Generator | None = None) -> dict:
    """The `generate` command (argparse Namespace from cli.py). Returns the summary counts."""
    sampling.check_flags(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    args, keep = _shard(args)
    done, gen = _open(args, generator)

    def parse(rec):
        kind = _one_of(rec, ("prompt", "messages", "tokens"))
        if kind == "prompt":
            if not isinstance(rec["prompt"], str) or not rec["prompt"]:
                raise ValueError("'prompt' must be a non-empty string")
            ids = gen.tokenizer.encode(rec["prompt"], bos=True, eos=False)
        elif kind == "messages":
            if isinstance(rec["messages"], list) and not rec["messages"]:
                raise ValueError("'messages' is empty")
            if not hasattr(gen.tokenizer, "encode_dialog"):
                raise ValueError(f"'messages' needs Llama 3's chat format, which this checkpoint's tokenizer "
                                 f"({type(gen.tokenizer).__name__}) does not have")
            ids = gen.tokenizer.encode_dialog(rec["messages"])
        else:
            ids = _token_list(rec, "tokens")
        gen.check_ids(ids, repr(kind))
        return ids, line_knobs(rec, args)

    n_cli = getattr(args, "num_samples", 1)
    if n_cli < 1:
        raise ValueError(f"--num-samples must be >= 1, got {n_cli}")
    out = Appender(args.output) if is_main() else None

    reader: dict = {"counts": {}}

    def next_piece(size: int) -> dict:  # process 0: the next rows to run; it writes their error lines
        # a line of n == 1 is done when its id is in the output; one of n > 1 (its own 'n' or
        # --num-samples) when all its samples are: that needs the line's n, so those lines are parsed first
        if "lines" not in reader:
            reader["lines"] = read_lines(args.input, {k for k in done if isinstance(k, str)}, parse, keep,
                                         reader["counts"])
        items = list(itertools.islice(reader["lines"], size))
        counts = reader["counts"]
        missing = {}  # line id -> the sample indices not yet written
        for _, id_, (_, knobs) in items:
            n = knobs["n"]
            missing[_key(id_)] = [k for k in range(n) if n == 1 or (_key(id_), k) not in done]
        counts["resumed"] += sum(1 for _, id_, _ in items if not missing[_key(id_)])
        last = len(items) < size
        items = [it for it in items if missing[_key(it[1])]]
        todo, errors = _fitting(items, lambda p: gen.context_error(len(p[0]), p[1]["max_new_tokens"] or 0),
                                args.input, out)
        # one row per (id, sample) not yet written; sample 0 draws what a single sample would
        samples = [(id_, k, p) for id_, p in todo for k in missing[_key(id_)]]
        return {"samples": samples, "counts": dict(counts), "todo": len(todo), "errors": len(errors), "last": last}

    def request(id_, k, ids, knobs):
        # each row's random stream comes from its id (and --seed), or from its own 'seed' alone, and the
        # sample index: the same output whatever batch it lands in, and after a resume
        if knobs["seed"] is None:
            seed, row_seed = args.seed, zlib.crc32((_key(id_) + (f"\0{k}" if k else "")).encode()) & 0x7FFFFFFF
        else:
            seed, row_seed = knobs["seed"], k
        return gen.request(ids, knobs["max_new_tokens"],
                           sampling.from_flags(knobs["temperature"], knobs["top_k"], knobs["top_p"]),
                           seed=seed, row_seed=row_seed, stop=knobs["stop"])

    n_todo = n_errors = 0
    counts = {"bad": 0, "resumed": 0}
    progress = Progress("sample" if n_cli > 1 else "prompt")
    try:
        for piece in _pieces(args, next_piece):  # (on an error, `out` is closed when collected)
            samples, counts = piece["samples"], piece["counts"]
            n_todo, n_errors = n_todo + piece["todo"], n_errors + piece["errors"]
            progress.grow(len(samples))
            requests = [request(id_, k, ids, knobs) for id_, k, (ids, knobs) in samples]
            for batch in gen.generate_requests(requests, ignore_eos=args.ignore_eos, batch_size=args.batch_size,
                                               continuous=not getattr(args, "static_batching", False)):
                if out is not None:
                    out.write([{"id": samples[i][0], **({"sample": samples[i][1]} if samples[i][2][1]["n"] > 1 else {}),
                                "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}
                               for i, c in batch])
                progress.update(len(batch), sum(len(c.tokens) + (c.finish_reason == "stop") for _, c in batch))
            del samples, requests
    finally:
        progress.close()
        if out is not None:
            out.close()
    summary = {"prompts": n_todo, "tokens": progress.tokens, "seconds": progress.elapsed(),
               "errors": n_errors, "skipped_lines": counts["bad"], "already_done": counts["resumed"]}
    summary["all_failed"] = _all_failed(summary, n_todo)
    if is_main():
        _report(f"generate: {_failed_prefix(summary)}{n_todo} prompts, {progress.tokens} tokens generated in "
                f"{progress.elapsed():.1f}s ({progress.rate():.1f} tokens/s); {n_errors} too long for the "
                f"context, {counts['bad']} bad lines skipped, {counts['resumed']} already in {args.output}")
    return summary


def _all_failed(summary: dict, n_ok: int) -> bool:
    """Every input line that was not already done failed (bad or too long), and there was at least one:
    the commands then exit with status 1, so a script sees it without reading the output."""
    return n_ok == 0 and summary["errors"] + summary["skipped_lines"] > 0


def _failed_prefix(summary: dict) -> str:
    return "every line failed: " if summary["all_failed"] else ""


# --------------------------------------------------------------------------------------------- score


def run_score(args, generator: Generator | None = None) -> dict:
    """The `score` command: per-token log-probs of given completions. Returns the summary counts."""
    done, gen = _open(args, generator)

    def parse(rec):
        if "messages" in rec:
            raise ValueError("score takes 'prompt' + 'completion' (text) or 'prompt_tokens' + "
                             "'completion_tokens', not 'messages'")
        text = "prompt" in rec or "completion" in rec
        ids = "prompt_tokens" in rec or "completion_tokens" in rec
        if text == ids:
            raise ValueError("expected 'prompt' + 'completion' (text) or 'prompt_tokens' + 'completion_tokens'")
        if text:
            for k in ("prompt", "completion"):
                if not isinstance(rec.get(k), str):
                    raise ValueError(f"'{k}' must be a string")
            prompt = gen.tokenizer.encode(rec["prompt"], bos=True, eos=False)
            completion = gen.tokenizer.encode(rec["completion"], bos=False, eos=False)
        else:
            for k in ("prompt_tokens", "completion_tokens"):
                if k not in rec:
                    raise ValueError(f"missing {k!r}")
            prompt, completion = _token_list(rec, "prompt_tokens"), _token_list(rec, "completion_tokens")
        names = ("'prompt'", "'completion'") if text else ("'prompt_tokens'", "'completion_tokens'")
        gen.check_ids(prompt, names[0])
        if completion:
            gen.check_ids(completion, names[1])
        return prompt, completion

    out = Appender(args.output) if is_main() else None

    reader: dict = {"counts": {}}

    def next_piece(size: int) -> dict:  # process 0: the next pairs to score; it writes their error lines
        if "lines" not in reader:
            reader["lines"] = read_lines(args.input, done, parse, counts=reader["counts"])
        items = list(itertools.islice(reader["lines"], size))
        todo, errors = _fitting(items, lambda pair: gen.score_context_error(len(pair[0]), len(pair[1])),
                                args.input, out)
        return {"todo": todo, "counts": dict(reader["counts"]), "errors": len(errors), "last": len(items) < size}

    n_todo = n_errors = 0
    counts = {"bad": 0, "resumed": 0}
    progress = Progress("seq")
    try:
        for piece in _pieces(args, next_piece):  # (on an error, `out` is closed when collected)
            todo, counts = piece["todo"], piece["counts"]
            n_todo, n_errors = n_todo + len(todo), n_errors + piece["errors"]
            progress.grow(len(todo))
            for batch in gen.score_batches([pair for _, pair in todo], batch_size=args.batch_size):
                if out is not None:
                    out.write([{"id": todo[i][0], "tokens": s.tokens, "logprobs": s.logprobs,
                                "sum_logprob": s.sum_logprob} for i, s in batch])
                progress.update(len(batch), sum(len(todo[i][1][0]) + len(s.tokens) for i, s in batch))
            del todo
    finally:
        progress.close()
        if out is not None:
            out.close()
    summary = {"sequences": n_todo, "tokens": progress.tokens, "errors": n_errors,
               "skipped_lines": counts["bad"], "already_done": counts["resumed"]}
    summary["all_failed"] = _all_failed(summary, n_todo)
    if is_main():
        _report(f"score: {_failed_prefix(summary)}{n_todo} sequences, {progress.tokens} tokens in "
                f"{progress.elapsed():.1f}s ({progress.rate():.1f} tokens/s); {n_errors} too long for the "
                f"context, {counts['bad']} bad lines skipped, {counts['resumed']} already in {args.output}")
    return summary
