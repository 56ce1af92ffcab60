"""The JSONL plumbing of the offline jobs (offline.py): input read a piece at a time, output appended
durably, resumable after a crash, split over shards, with a progress bar.

What can go wrong, and what this file does about it:
  * the writer dies mid-line: `read_done` cuts the torn last line off, so the next run appends clean
    lines, and the half-written row is run again;
  * a row could not run (too long for the context): its output line is {"id", "error"}; `read_done`
    drops those lines (rewriting the file atomically) so a rerun, perhaps with other options, tries
    them again;
  * a crash loses at most the batch in flight: `Appender` flushes and fsyncs each batch;
  * a bad input line is one report, `FILE:LINE: skipped: why`, never a crash (`read_lines`);
  * a huge input never sits in memory: `pieces` hands out --read-lines lines at a time (process 0 reads
    them and sends them to the others); only the ids seen are kept, to find duplicates.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from ..parallel.distributed import is_main
from ..parallel.multihost_io import on_main

PIECE_LINES = 4096  # --read-lines default


def id_key(id_) -> str:
    """Ids are compared by their JSON text, so 1 and "1" are different ids."""
    return json.dumps(id_)


def report(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rewrite_lines(path: Path, lines: list[bytes]) -> None:
    """Replace `path` with `lines` (each without its newline), whole or not at all: a temp file,
    fsynced, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _output_key(rec: dict, batch: bool):
    """(the id an output line answers, whether it is an error line). `batch`: OpenAI Batch API output
    ({"custom_id", "response": {"status_code"}, "error"}): an error is a non-null "error" or a status
    other than 200."""
    if batch:
        failed = rec.get("error") is not None or (rec.get("response") or {}).get("status_code") != 200
        return id_key(rec["custom_id"]), failed
    key = id_key(rec["id"]) if "sample" not in rec else (id_key(rec["id"]), int(rec["sample"]))
    return key, "error" in rec


def read_done(path: Path, batch: bool = False) -> set[str]:
    """Ids already in an output file (`batch`: the custom_ids of an OpenAI batch output). A torn last line
    (no newline: the writer died mid-line) is cut off the file, so the lines appended next start clean;
    it was never counted as done. Error lines ({"id", "error"}; a batch line whose status is not 200)
    are not done either: they are dropped from the file (rewritten atomically) and their ids are tried
    again."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    body, _, tail = data.rpartition(b"\n")
    done, kept, errors = set(), [], 0
    for lineno, line in enumerate(body.split(b"\n") if body else [], start=1):
        try:
            rec = json.loads(line)
            key, failed = _output_key(rec, batch)
        except (ValueError, KeyError, TypeError, AttributeError):
            if line.strip():
                report(f"{path}:{lineno}: unreadable output line ignored")
            kept.append(line)
            continue
        if failed:
            errors += 1
            continue
        done.add(key)
        kept.append(line)
    if tail:
        report(f"{path}: dropping a torn last line ({len(tail)} bytes) left by an interrupted run")
    if errors:
        report(f"{path}: trying again {errors} ids whose earlier output was an error line")
        rewrite_lines(path, kept)
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


def read_lines(path: Path, done: set[str], parse, keep=None, counts: dict | None = None, line_ids: bool = False,
               id_field: str = "id") -> Iterator[tuple[int, object, object]]:
    """Parse each input line with `parse(record) -> payload` (raises ValueError on a bad line);
    `keep(lineno)` False: the line is another shard's, not read at all; `line_ids`: a line without an
    "id" takes its line number as its id (rejection-sample's TRL prompt records) instead of being bad;
    `id_field`: the key that holds the id ("custom_id" in OpenAI batch files).

    Yields (lineno, id, payload) one line at a time, so the input is read a piece at a time (the ids
    seen are kept, to find duplicates). Bad lines are reported and skipped; lines whose id is already
    in the output are skipped quietly; both are counted in `counts` ({"bad", "resumed"}) as they pass.
    """
    path = Path(path)  # its existence is checked before the model restore (offline._open)
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
                if id_field not in rec and not line_ids:
                    raise ValueError(f"missing '{id_field}'")
                id_ = rec.get(id_field, lineno)
                if isinstance(id_, bool) or not isinstance(id_, (str, int)):
                    raise ValueError(f"'{id_field}' must be a string or an integer, got {id_!r}")
                key = id_key(id_)
                if key in seen:
                    raise ValueError(f"duplicate id {id_!r} (first on line {seen[key]})")
                seen[key] = lineno
                if key in done:
                    counts["resumed"] += 1
                    continue
                item = (lineno, id_, parse(rec))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                msg = f"invalid JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else e
                report(f"{path}:{lineno}: skipped: {msg}")
                counts["bad"] += 1
                continue
            yield item


def pieces(args, next_piece) -> Iterator[dict]:
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


def token_list(rec: dict, key: str) -> list[int]:
    ids = rec[key]
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise ValueError(f"'{key}' must be a list of integer token ids")
    return ids


def one_of(rec: dict, keys: tuple[str, ...]) -> str:
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


def shard_args(args):
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


def fitting(items, context_error, input_path, out: Appender) -> tuple[list[tuple[object, object]], list[dict]]:
    """Split parsed lines into those that fit the model's context ([(id, payload)]) and per-row errors,
    which are reported with their line numbers and written to the output at once (a rerun skips them)."""
    todo, errors = [], []
    for lineno, id_, payload in items:
        err = context_error(payload)
        if err:
            report(f"{input_path}:{lineno}: error: {err}")
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


