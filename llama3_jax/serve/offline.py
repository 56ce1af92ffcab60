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
An OpenAI Batch API file instead (its first line has a "custom_id": openai/batch.py) is answered with
the Batch API's output lines, each body what `serve` would answer, resumable by custom_id; the command
line's sampling flags are not used then (each body says its own, with the server's defaults).
score input lines: {"id", "prompt", "completion"} (text; BOS before the prompt) or
{"id", "prompt_tokens", "completion_tokens"}; output {"id", "tokens", "logprobs", "sum_logprob"}.
This file holds the jobs (what a line means, which rows run, the summary); jsonl.py the plumbing
(reading pieces, resuming, appending, sharding, progress).

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
  * the output file is locked for the run (OUTPUT.lock, store/lock.py; process 0's lock): a second
    generate or score writing the same file is refused with one line naming the holder (host, pid,
    start time) before it reads or writes anything;
  * the summary line says when every line failed, and the command then exits with status 1. A line
    whose id is already in the output is done, not failed: a rerun with nothing left to run says
    "nothing new to run", counts the lines still too long for the context (their error lines are
    written again) and exits 0, as the run that wrote the others did; status 1 means that no line of
    the input has a result, none run now and none earlier;
  * the token count (progress bar, summary) is the tokens each row generated: its kept tokens, plus the
    stop token that ended it (not kept); a row ended by a stop string kept the token that completed it,
    so nothing is added;
  * the input is read, checked and run --read-lines lines at a time (each piece's rows are done before
    the next piece is read; several processes: process 0 reads each piece and sends it to the others),
    so no host holds the whole input; only the ids seen are kept, to report duplicates.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

from . import sampling
from ..store.lock import Lock
from ..parallel.distributed import is_main
from ..parallel.multihost_io import on_main
from ..parallel.sharding import inference_mesh, parse_mesh
from .engine import Generator
from .openai import batch as openai_batch
from .jsonl import (Appender, Progress, fitting, id_key, one_of, pieces, read_done, read_lines, report, shard_args,
                    token_list)
from .request import Request, generated_tokens
from .reward import NO_OUTPUT_LAYER, RewardModel, is_reward_model


def _open(args, generator: Generator | RewardModel | None, held: dict, reward: bool = False, batch: bool = False
          ) -> tuple[set[str], Generator | RewardModel]:
    """Check the shared flags and paths before the (slow) model restore, lock the output (the lock
    goes into `held`, for the caller to release), then read the ids already in the output (`batch`: the
    custom_ids of an OpenAI batch output) and restore the model on --mesh (default:
    sharding.inference_mesh); `reward`: a RewardModel instead of a Generator. Returns (done ids, generator). Several
    processes: the files are process 0's (the others get its errors and an empty done set); every
    process restores its shards of the model."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sizes = parse_mesh(getattr(args, "mesh", None))
    mine = {}

    def check():
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"input file not found: {args.input}")
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise ValueError(f"--output {args.output} is the input file")
        out = Path(args.output)
        held["lock"] = Lock(out.with_name(out.name + ".lock"), f"output {args.output}").acquire()
        mine["done"] = read_done(args.output, batch=batch)

    on_main(check)
    if generator is None and reward:
        return mine.get("done", set()), RewardModel(args.checkpoint, dtype=args.dtype, mesh=inference_mesh(sizes),
                                                    batch_size=args.batch_size, tokenizer=args.tokenizer)
    gen = generator or Generator(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer,
                                 mesh=inference_mesh(sizes), quantize=getattr(args, "quantize", None),
                                 kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
                                 prefill_chunk=getattr(args, "prefill_chunk", None),
                                 kv_pages=getattr(args, "kv_pages", None), page_size=getattr(args, "page_size", 64),
                                 paged_attention=getattr(args, "paged_attention", "auto"))
    return mine.get("done", set()), gen


def _run_pieces(args, next_piece, progress: Progress, out: Appender | None, batches) -> dict:
    """Run the input piece by piece (jsonl.pieces): `batches(piece)` yields (output records, tokens) per
    finished batch; the records are appended at once. Returns the totals {"todo", "errors", "counts"}.
    The output is closed even on an error."""
    totals = {"todo": 0, "errors": 0, "counts": {"bad": 0, "resumed": 0}}
    try:
        for piece in pieces(args, next_piece):
            totals["todo"] += piece["todo"]
            totals["errors"] += piece["errors"]
            totals["counts"] = piece["counts"]
            progress.grow(piece["rows"])
            for records, tokens in batches(piece):
                if out is not None:
                    out.write(records)
                progress.update(len(records), tokens)
    finally:
        progress.close()
        if out is not None:
            out.close()
    return totals


def _summary(command: str, unit: str, args, progress: Progress, totals: dict, *, seconds: bool,
             failed: str = "too long for the context") -> dict:
    """The summary counts returned to the CLI ({unit: rows run, "tokens", ("seconds",) "errors",
    "skipped_lines", "already_done", "all_failed"}) and, on process 0, its one stderr line (`failed`:
    what an error line means)."""
    n_todo, n_errors, counts = totals["todo"], totals["errors"], totals["counts"]
    summary = {unit: n_todo, "tokens": progress.tokens, **({"seconds": progress.elapsed()} if seconds else {}),
               "errors": n_errors, "skipped_lines": counts["bad"], "already_done": counts["resumed"]}
    summary["all_failed"] = _all_failed(summary, n_todo)
    if is_main():
        made = " generated" if command == "generate" else ""
        report(f"{command}: {_prefix(summary, n_todo)}{n_todo} {unit}, {progress.tokens} tokens{made} in "
               f"{progress.elapsed():.1f}s ({progress.rate():.1f} tokens/s); {n_errors} {failed}, "
               f"{counts['bad']} bad lines skipped, {counts['resumed']} already in {args.output}")
    return summary


def _all_failed(summary: dict, n_ok: int) -> bool:
    """Every input line failed (bad or too long), and there was at least one: the commands then exit
    with status 1, so a script sees it without reading the output. A line already in the output is
    done, not failed: a rerun exits as the run that wrote it did."""
    return n_ok + summary["already_done"] == 0 and summary["errors"] + summary["skipped_lines"] > 0


def _prefix(summary: dict, n_ok: int) -> str:
    if summary["all_failed"]:
        return "every line failed: "
    return "nothing new to run: " if n_ok == 0 and summary["already_done"] else ""


def _output_lock_released(held: dict) -> None:
    if "lock" in held:
        held["lock"].release()


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


def _prompt_ids(rec: dict, gen: Generator) -> list[int]:
    """A generate line's prompt (one of prompt / messages / tokens) as checked token ids."""
    kind = one_of(rec, ("prompt", "messages", "tokens"))
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
        ids = token_list(rec, "tokens")
    gen.check_ids(ids, repr(kind))
    return ids


def _generate_pieces(args, gen: Generator, done: set, keep, out: Appender | None):
    """`next_piece(size)` for process 0: the next rows to run, one per (line, sample) not yet in the
    output; it writes the error lines of prompts too long for the context."""
    reader: dict = {"counts": {}}

    def next_piece(size: int) -> dict:
        # a line of n == 1 is done when its id is in the output; one of n > 1 (its own 'n' or
        # --num-samples) when all its samples are: that needs the line's n, so those lines are parsed first
        if "lines" not in reader:
            parse = lambda rec: (_prompt_ids(rec, gen), line_knobs(rec, args))  # noqa: E731
            reader["lines"] = read_lines(args.input, {k for k in done if isinstance(k, str)}, parse, keep,
                                         reader["counts"])
        items = list(itertools.islice(reader["lines"], size))
        counts = reader["counts"]
        missing = {}  # line id -> the sample indices not yet written
        for _, id_, (_, knobs) in items:
            n = knobs["n"]
            missing[id_key(id_)] = [k for k in range(n) if n == 1 or (id_key(id_), k) not in done]
        counts["resumed"] += sum(1 for _, id_, _ in items if not missing[id_key(id_)])
        last = len(items) < size
        items = [it for it in items if missing[id_key(it[1])]]
        todo, errors = fitting(items, lambda p: gen.context_error(len(p[0]), p[1]["max_new_tokens"] or 0),
                               args.input, out)
        # one row per (id, sample) not yet written; sample 0 draws what a single sample would
        samples = [(id_, k, p) for id_, p in todo for k in missing[id_key(id_)]]
        return {"samples": samples, "rows": len(samples), "counts": dict(counts), "todo": len(todo),
                "errors": len(errors), "last": last}

    return next_piece


def _sample_request(gen: Generator, args, id_, k: int, ids: list[int], knobs: dict) -> Request:
    """Sample k of a line. Its random stream comes from its id (and --seed), or from its own 'seed'
    alone, and the sample index: the same output whatever batch it lands in, and after a resume."""
    if knobs["seed"] is None:
        seed, row_seed = args.seed, zlib.crc32((id_key(id_) + (f"\0{k}" if k else "")).encode()) & 0x7FFFFFFF
    else:
        seed, row_seed = knobs["seed"], k
    return gen.request(ids, knobs["max_new_tokens"],
                       sampling.from_flags(knobs["temperature"], knobs["top_k"], knobs["top_p"]),
                       seed=seed, row_seed=row_seed, stop=knobs["stop"])


def run_generate(args, generator: Generator | None = None) -> dict:
    """The `generate` command (argparse Namespace from cli/generate.py). Returns the summary counts."""
    if generator is None and is_reward_model(args.checkpoint):  # before the output is locked or read
        raise ValueError(NO_OUTPUT_LAYER)
    sampling.check_flags(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    args, keep = shard_args(args)
    held: dict = {}
    try:
        return _generate(args, keep, generator, held)
    finally:
        _output_lock_released(held)


def _generate(args, keep, generator: Generator | None, held: dict) -> dict:
    # an OpenAI batch file (openai/batch.py: the server's answers) or our lines
    batch = on_main(lambda: Path(args.input).is_file() and openai_batch.is_batch_file(args.input))
    done, gen = _open(args, generator, held, batch=batch)
    if batch:
        out = Appender(args.output) if is_main() else None
        progress = Progress("request")
        totals = _run_pieces(args, openai_batch.pieces(args, gen, done, keep, out), progress, out,
                             lambda piece: openai_batch.batches(args, gen, piece))
        return _summary("generate", "requests", args, progress, totals, seconds=True,
                        failed="answered with an error (400/404/405)")
    n_cli = getattr(args, "num_samples", 1)
    if n_cli < 1:
        raise ValueError(f"--num-samples must be >= 1, got {n_cli}")
    out = Appender(args.output) if is_main() else None

    def batches(piece):
        samples = piece["samples"]
        requests = [_sample_request(gen, args, id_, k, ids, knobs) for id_, k, (ids, knobs) in samples]
        for batch in gen.generate_requests(requests, ignore_eos=args.ignore_eos, batch_size=args.batch_size,
                                           continuous=not getattr(args, "static_batching", False)):
            records = [{"id": samples[i][0], **({"sample": samples[i][1]} if samples[i][2][1]["n"] > 1 else {}),
                        "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason} for i, c in batch]
            yield records, sum(generated_tokens(c, samples[i][2][1]["stop"], gen.tokenizer.decode) for i, c in batch)

    progress = Progress("sample" if n_cli > 1 else "prompt")
    totals = _run_pieces(args, _generate_pieces(args, gen, done, keep, out), progress, out, batches)
    return _summary("generate", "prompts", args, progress, totals, seconds=True)


# --------------------------------------------------------------------------------------------- score


def _score_pair(rec: dict, gen: Generator) -> tuple[list[int], list[int]]:
    """A score line -> (prompt ids, completion ids), checked."""
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
        prompt, completion = token_list(rec, "prompt_tokens"), token_list(rec, "completion_tokens")
    names = ("'prompt'", "'completion'") if text else ("'prompt_tokens'", "'completion_tokens'")
    gen.check_ids(prompt, names[0])
    if completion:
        gen.check_ids(completion, names[1])
    return prompt, completion


def run_score(args, generator: Generator | RewardModel | None = None) -> dict:
    """The `score` command: per-token log-probs of given completions, or with a reward model (a
    checkpoint whose head is "score", or a RewardModel) each line's reward. Returns the summary counts."""
    held: dict = {}
    if isinstance(generator, RewardModel) or (generator is None and is_reward_model(args.checkpoint)):
        if getattr(args, "quantize", None):
            raise ValueError("--quantize: a reward model is scored with its float weights (int8 has no score head)")
        job = _score_rewards
    else:
        job = _score
    try:
        return job(args, generator, held)
    finally:
        _output_lock_released(held)


def _score(args, generator: Generator | None, held: dict) -> dict:
    done, gen = _open(args, generator, held)
    out = Appender(args.output) if is_main() else None
    reader: dict = {"counts": {}}

    def next_piece(size: int) -> dict:  # process 0: the next pairs to score; it writes their error lines
        if "lines" not in reader:
            reader["lines"] = read_lines(args.input, done, lambda rec: _score_pair(rec, gen), counts=reader["counts"])
        items = list(itertools.islice(reader["lines"], size))
        todo, errors = fitting(items, lambda pair: gen.score_context_error(len(pair[0]), len(pair[1])),
                               args.input, out)
        return {"pairs": todo, "rows": len(todo), "todo": len(todo), "counts": dict(reader["counts"]),
                "errors": len(errors), "last": len(items) < size}

    def batches(piece):
        todo = piece["pairs"]
        for batch in gen.score_batches([pair for _, pair in todo], batch_size=args.batch_size):
            records = [{"id": todo[i][0], "tokens": s.tokens, "logprobs": s.logprobs, "sum_logprob": s.sum_logprob}
                       for i, s in batch]
            yield records, sum(len(todo[i][1][0]) + len(s.tokens) for i, s in batch)

    progress = Progress("seq")
    totals = _run_pieces(args, next_piece, progress, out, batches)
    return _summary("score", "sequences", args, progress, totals, seconds=False)


def _score_rewards(args, model: RewardModel | None, held: dict) -> dict:
    """`score` with a reward model: {"id", "reward"} per line, the reward of the line rendered whole
    (RewardModel.render: {"prompt", "completion"} or {"messages"}); a line longer than the context gets
    an error line, as for log-probs."""
    done, rm = _open(args, model, held, reward=True)
    out = Appender(args.output) if is_main() else None
    reader: dict = {"counts": {}}

    def next_piece(size: int) -> dict:  # process 0: the next sequences to score; it writes their error lines
        if "lines" not in reader:
            reader["lines"] = read_lines(args.input, done, rm.render, counts=reader["counts"])
        items = list(itertools.islice(reader["lines"], size))
        todo, errors = fitting(items, lambda ids: rm.context_error(len(ids)), args.input, out)
        return {"seqs": todo, "rows": len(todo), "todo": len(todo), "counts": dict(reader["counts"]),
                "errors": len(errors), "last": len(items) < size}

    def batches(piece):
        todo = piece["seqs"]
        for batch in rm.reward_batches([ids for _, ids in todo]):
            yield [{"id": todo[i][0], "reward": r} for i, r in batch], sum(len(todo[i][1]) for i, _ in batch)

    progress = Progress("seq")
    totals = _run_pieces(args, next_piece, progress, out, batches)
    return _summary("score", "sequences", args, progress, totals, seconds=False)
