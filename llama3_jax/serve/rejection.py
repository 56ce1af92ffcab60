"""`llama3-jax rejection-sample`: N samples per prompt from a policy, scored by a reward model and/or
reward functions, the best kept as SFT records. Resumable after a crash.

Input lines are TRL prompt records: {"prompt": text | [messages], ...} with an optional "id" (a line
without one takes its line number: resuming then needs the same input file). The other fields are the
line's columns, handed to reward functions (reward_fns.py). A text prompt is encoded as `generate`
is the user's turn: it and a chat prompt are rendered in Llama 3's chat format ending in an open
assistant header, and the record written is a chat (with a tokenizer that has no chat format, a text
prompt is continued as `generate` encodes it, BOS + text, and written as prompt-completion).
Sample k of a line is what `generate --num-samples N` draws for it (the same seeds: (id, k), --seed).

A sample's reward: the weighted sum (--reward-weights; the reward model first, then each --reward-fn in
order) over the sources that judged it; a reward model judges the sample's record rendered as SFT
renders it (RewardModel.render), so "reward" equals the reward model's score of the written record.
Output records, best first per prompt:
    {"id", "messages": [...prompt, {"role": "assistant", "content"}], "reward"}   (a text prompt: one user turn)
    {"id", "prompt", "completion", "reward"}   (only a text prompt with a tokenizer without a chat format)
both read by `train` with configs/sft.yaml (data.path=OUTPUT). --keep K keeps the K best of a prompt,
--min-reward X drops samples below X (so a prompt may keep none), a sample no source judged (every
reward None) is never kept. --samples-output FILE gets every sample: {"id", "sample", "text", "reward"}
(reward null when unjudged).

Behaviour the tests pin down, and what can go wrong:
  * a prompt's outcome is written in one order: its records to OUTPUT, its samples to the samples file,
    then its line {"id", "kept"} to OUTPUT.done (each fsynced). The done file, not OUTPUT, says what is
    finished: a prompt may keep no record at all. A rerun reads the done file (a torn last line cut
    off), drops from OUTPUT and the samples file every line of a prompt that is not in it (a kill
    between the writes: written again, never twice) and runs the other prompts: nothing lost, nothing
    duplicated. A done file whose OUTPUT is gone is refused (delete it to start over);
  * the output is locked for the run (OUTPUT.lock), as generate's;
  * a bad line (invalid JSON, no prompt, a duplicate id, ...) is `FILE:LINE: skipped: why`, counted; a
    prompt too long for the policy's context is `FILE:LINE: error: why`, counted and not marked done (a
    rerun with other options tries it again); a sample too long for the reward model's context gets no
    reward from it (counted in the summary);
  * a reward function that fails (raises, returns a wrong length, a non-number) stops the run with one
    line naming it and the prompt's FILE:LINE; everything finished before is kept;
  * the policy and the reward model are restored once each, on the same mesh, and held together;
  * progress over samples, and one summary line: prompts, samples, samples/s, the mean best reward.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from pathlib import Path

from .. import failpoints
from ..parallel.distributed import is_main
from ..parallel.multihost_io import on_main
from ..parallel.sharding import inference_mesh, parse_mesh
from ..store.lock import Lock
from . import restore, reward_fns, sampling
from .engine import Generator
from .jsonl import Appender, Progress, id_key, pieces, read_done, read_lines, report, rewrite_lines
from .offline import generated_tokens
from .reward import NO_OUTPUT_LAYER, RewardModel, check_reward_model, is_reward_model


def done_path(output) -> Path:
    """OUTPUT.done: one {"id", "kept"} line per finished prompt (not .jsonl: never read as data)."""
    return Path(f"{output}.done")


def check_args(args) -> list[reward_fns.RewardFn]:
    """Every flag checked, and the reward functions loaded, before any model is restored."""
    sampling.check_flags(args.temperature, args.top_k, args.top_p)
    for flag, v in (("--num-samples", args.num_samples), ("--keep", args.keep), ("--batch-size", args.batch_size),
                    ("--max-new-tokens", args.max_new_tokens)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.min_reward is not None and not math.isfinite(args.min_reward):
        raise ValueError(f"--min-reward must be a finite number, got {args.min_reward}")
    fns = [reward_fns.load(spec) for spec in args.reward_fn or ()]
    n_sources = len(fns) + (args.reward_model is not None)
    if n_sources == 0:
        raise ValueError("no reward: give --reward-model RM and/or --reward-fn MODULE:NAME")
    args.reward_weights = reward_fns.weights(args.reward_weights, n_sources)
    return fns


# ------------------------------------------------------------------------------------ files, resume


def _keep_done(path: Path, done: set[str]) -> int:
    """Drop the lines of `path` whose prompt is not in `done` (and a torn last line), rewriting it
    atomically; returns how many went."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    body, _, tail = data.rpartition(b"\n")
    kept = []
    for line in body.split(b"\n") if body else []:
        try:
            if id_key(json.loads(line)["id"]) in done:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    dropped = (len(body.split(b"\n")) if body else 0) - len(kept) + bool(tail)
    if dropped:
        rewrite_lines(path, kept)
        report(f"{path}: dropped {dropped} lines of prompts an interrupted run had not finished")
    return dropped


def _open_files(args, held: dict) -> set[str]:
    """Process 0: check the paths, lock OUTPUT, read the done ids and drop unfinished prompts' lines."""
    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        raise FileNotFoundError(f"input file not found: {args.input}")
    paths = [out] + ([Path(args.samples_output)] if args.samples_output else [])
    for p in paths:
        if p.resolve() == inp.resolve():
            raise ValueError(f"{p} is the input file")
    if args.samples_output and paths[1].resolve() == out.resolve():
        raise ValueError("--samples-output is --output")
    held["lock"] = Lock(out.with_name(out.name + ".lock"), f"output {args.output}").acquire()
    done = {k for k in read_done(done_path(out)) if isinstance(k, str)}
    if done and not out.exists():
        raise ValueError(f"{done_path(out)} lists {len(done)} finished prompts but {out} is missing: delete "
                         f"{done_path(out)} to start over")
    for p in paths:
        _keep_done(p, done)
    return done


def _models(args, generator, reward_model):
    """The policy's Generator and the RewardModel (or None), restored on one mesh."""
    mesh = None
    if generator is None and is_reward_model(args.policy):  # each refused before either restore
        raise ValueError(f"--policy {args.policy}: {NO_OUTPUT_LAYER}")
    if reward_model is None and args.reward_model is not None:
        check_reward_model(restore.model_config(args.reward_model), args.reward_model)
    if generator is None or (reward_model is None and args.reward_model is not None):
        mesh = inference_mesh(parse_mesh(args.mesh))
    gen = generator or Generator(args.policy, dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh)
    rm = reward_model
    if rm is None and args.reward_model is not None:
        rm = RewardModel(args.reward_model, dtype=args.dtype, mesh=mesh, batch_size=args.batch_size)
    return gen, rm


# ------------------------------------------------------------------------------------ lines, samples


def _parse(rec: dict, gen: Generator) -> dict:
    """A TRL prompt record -> {"prompt" (as sampled: messages, or a text for a tokenizer without a chat
    format), "given" (as the line has it, for reward functions), "columns", "ids" (checked token ids)}."""
    if "prompt" not in rec:
        raise ValueError("missing 'prompt' (a text or a list of messages)")
    given, tok = rec["prompt"], gen.tokenizer
    prompt = [{"role": "user", "content": given}] if isinstance(given, str) and given and hasattr(
        tok, "encode_header") else given  # a text prompt is the user's turn: the record written is a chat
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("'prompt' is empty")
        ids = tok.encode(prompt, bos=True, eos=False)
    elif isinstance(prompt, list):
        from ..data.chat import ROLES, render_messages  # here: data/ imports grain, serve/ need not
        if not prompt:
            raise ValueError("'prompt' is an empty list of messages")
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"'prompt'[{i}] must be {{\"role\": one of {', '.join(sorted(ROLES))}, "
                                 f"\"content\": text}}")
        if not hasattr(tok, "encode_header"):
            raise ValueError(f"a messages prompt needs Llama 3's chat format, which this tokenizer "
                             f"({type(tok).__name__}) does not have")
        ids = render_messages(tok, prompt)[0] + tok.encode_header("assistant")
    else:
        raise ValueError(f"'prompt' must be a text or a list of messages, got {type(prompt).__name__}")
    gen.check_ids(ids, "'prompt'")
    return {"prompt": prompt, "given": given, "columns": {k: v for k, v in rec.items() if k != "prompt"}, "ids": ids}


def _next_piece_fn(args, gen: Generator, done: set[str]):
    """`next_piece(size)` for process 0: the next lines to run [(lineno, id, parsed)]; it reports the
    prompts too long for the policy's context."""
    reader: dict = {"counts": {}}

    def next_piece(size: int) -> dict:
        if "lines" not in reader:
            reader["lines"] = read_lines(args.input, done, lambda rec: _parse(rec, gen), counts=reader["counts"],
                                         line_ids=True)
        items = list(itertools.islice(reader["lines"], size))
        todo, errors = [], 0
        for lineno, id_, p in items:
            err = gen.context_error(len(p["ids"]), args.max_new_tokens or 0)
            if err:
                report(f"{args.input}:{lineno}: error: {err}")
                errors += 1
            else:
                todo.append((lineno, id_, p))
        return {"lines": todo, "errors": errors, "counts": dict(reader["counts"]), "last": len(items) < size}

    return next_piece


def _request(gen: Generator, args, id_, k: int, ids: list[int]):
    """Sample k of a line: generate's random stream for (id, k) and --seed, whatever the batching."""
    row_seed = zlib.crc32((id_key(id_) + (f"\0{k}" if k else "")).encode()) & 0x7FFFFFFF
    return gen.request(ids, args.max_new_tokens, sampling.from_flags(args.temperature, args.top_k, args.top_p),
                       seed=args.seed, row_seed=row_seed)


def _finished_lines(gen: Generator, args, lines: list, progress: Progress):
    """Generate every sample of `lines`; yield, after each engine batch, the lines whose N samples
    are all done: [(line, [Completion] * N)]."""
    n = args.num_samples
    requests = [_request(gen, args, id_, k, p["ids"]) for _, id_, p in lines for k in range(n)]
    got: dict[int, dict] = {}
    for batch in gen.generate_requests(requests, batch_size=args.batch_size):
        ready = []
        for i, c in batch:
            line, k = divmod(i, n)
            got.setdefault(line, {})[k] = c
            if len(got[line]) == n:
                comps = got.pop(line)
                ready.append((lines[line], [comps[j] for j in range(n)]))
        progress.update(len(batch), sum(generated_tokens(c, (), None) for _, c in batch))
        if ready:
            yield ready


# ------------------------------------------------------------------------------------ rewards, records


def _record(id_, prompt, text: str) -> dict:
    """A sample as an SFT record (without its reward): messages for a chat prompt, else prompt-completion."""
    if isinstance(prompt, str):
        return {"id": id_, "prompt": prompt, "completion": text}
    return {"id": id_, "messages": [*prompt, {"role": "assistant", "content": text}]}


def _model_rewards(rm: RewardModel, records: list[dict], stats: dict) -> list[float | None]:
    """The reward model's score of each record rendered whole; None for one longer than its context."""
    ids = [rm.render({k: v for k, v in r.items() if k != "id"}) for r in records]
    fits = [i for i, x in enumerate(ids) if rm.context_error(len(x)) is None]
    stats["too_long_for_rm"] += len(ids) - len(fits)
    out: list[float | None] = [None] * len(ids)
    for i, r in zip(fits, rm.rewards([ids[i] for i in fits]) if fits else []):
        out[i] = r
    return out


def _rewards(ready: list, rm, fns, args, stats: dict) -> list[tuple[list[dict], list[float]]]:
    """Per finished line: (its N sample records, their combined rewards). The reward model scores all
    the lines' samples in one call (every process: it runs on the mesh); the functions run on process 0."""
    records = [[_record(id_, p["prompt"], c.text) for c in comps] for (_, id_, p), comps in ready]
    sources: list[list[list[float | None]]] = []  # [source][line][sample]
    if rm is not None:
        flat = _model_rewards(rm, [r for recs in records for r in recs], stats)
        n = args.num_samples
        sources.append([flat[j * n:(j + 1) * n] for j in range(len(ready))])
    for fn in fns:
        per_line = []
        for ((lineno, _, p), comps), recs in zip(ready, records):
            completions = [c.text if isinstance(p["given"], str) else r["messages"][-1:]  # TRL's, by prompt kind
                           for r, c in zip(recs, comps)]
            per_line.append(fn(p["given"], completions, [c.tokens for c in comps], p["columns"],
                               f"{args.input}:{lineno}") if is_main() else [None] * len(comps))
        sources.append(per_line)
    return [(recs, reward_fns.combine([s[j] for s in sources], args.reward_weights))
            for j, recs in enumerate(records)]


def select(rewards: list[float], keep: int, min_reward: float | None) -> list[int]:
    """The indices of the samples kept: judged (not NaN), >= min_reward, the `keep` best, best first
    (ties: the lower sample index first)."""
    ok = [i for i, r in enumerate(rewards) if not math.isnan(r) and (min_reward is None or r >= min_reward)]
    return sorted(ok, key=lambda i: (-rewards[i], i))[:keep]


def _write(ready: list, scored: list, args, files: dict, stats: dict) -> None:
    """Records, then samples, then done markers (each fsynced): the order the resume relies on."""
    out, samples, marks = [], [], []
    for ((_, id_, _), comps), (recs, rewards) in zip(ready, scored):
        best = select(rewards, args.keep, args.min_reward)
        out += [{**recs[i], "reward": rewards[i]} for i in best]
        samples += [{"id": id_, "sample": k, "text": c.text, "reward": None if math.isnan(r) else r}
                    for k, (c, r) in enumerate(zip(comps, rewards))]
        marks.append({"id": id_, "kept": len(best)})
        judged = [r for r in rewards if not math.isnan(r)]
        if judged:
            stats["best"].append(max(judged))
        stats["kept"] += len(best)
        stats["none_kept"] += not best
    if files:
        files["out"].write(out)
        if "samples" in files:
            files["samples"].write(samples)
        failpoints.kill_point("rejection.write")  # records written, the prompts not yet marked done
        files["done"].write(marks)


# ------------------------------------------------------------------------------------ the command


def run_rejection_sample(args, generator: Generator | None = None, reward_model: RewardModel | None = None) -> dict:
    """The `rejection-sample` command (argparse Namespace from cli/rejection_sample.py). Returns the
    summary counts."""
    fns = check_args(args)
    held: dict = {}
    try:
        return _run(args, fns, generator, reward_model, held)
    finally:
        if "lock" in held:
            held["lock"].release()


def _run(args, fns, generator, reward_model, held: dict) -> dict:
    done = on_main(lambda: sorted(_open_files(args, held)))
    gen, rm = _models(args, generator, reward_model)
    files = {}
    if is_main():
        files = {"out": Appender(args.output), "done": Appender(done_path(args.output))}
        if args.samples_output:
            files["samples"] = Appender(args.samples_output)
    stats = {"prompts": 0, "errors": 0, "counts": {"bad": 0, "resumed": 0}, "best": [], "kept": 0,
             "none_kept": 0, "too_long_for_rm": 0}
    progress = Progress("sample")
    try:
        for piece in pieces(args, _next_piece_fn(args, gen, set(done))):
            stats["errors"] += piece["errors"]
            stats["counts"] = piece["counts"]
            progress.grow(len(piece["lines"]) * args.num_samples)
            for ready in _finished_lines(gen, args, piece["lines"], progress):
                _write(ready, _rewards(ready, rm, fns, args, stats), args, files, stats)
                stats["prompts"] += len(ready)
    finally:
        progress.close()
        for f in files.values():
            f.close()
    return _summary(args, progress, stats)


def _summary(args, progress: Progress, stats: dict) -> dict:
    n, counts, secs = stats["prompts"], stats["counts"], progress.elapsed()
    samples = n * args.num_samples
    best = stats["best"]
    summary = {"prompts": n, "samples": samples, "tokens": progress.tokens, "seconds": secs,
               "samples_per_s": samples / max(secs, 1e-9), "mean_best_reward": math.fsum(best) / len(best)
               if best else None, "kept": stats["kept"], "prompts_none_kept": stats["none_kept"],
               "too_long_for_reward_model": stats["too_long_for_rm"], "errors": stats["errors"],
               "skipped_lines": counts["bad"], "already_done": counts["resumed"]}
    summary["all_failed"] = n + counts["resumed"] == 0 and stats["errors"] + counts["bad"] > 0
    if is_main():
        mean = "n/a" if summary["mean_best_reward"] is None else f"{summary['mean_best_reward']:.4g}"
        head = ("every line failed: " if summary["all_failed"] else
                "nothing new to run: " if n == 0 and counts["resumed"] else "")
        rm_long = f", {stats['too_long_for_rm']} samples too long for the reward model" \
            if stats["too_long_for_rm"] else ""
        report(f"rejection-sample: {head}{n} prompts, {samples} samples in {secs:.1f}s "
               f"({summary['samples_per_s']:.2f} samples/s, {progress.rate():.1f} tokens/s); mean best reward "
               f"{mean}; {stats['kept']} records kept, {stats['none_kept']} prompts kept none{rm_long}; "
               f"{stats['errors']} too long for the context, {counts['bad']} bad lines skipped, "
               f"{counts['resumed']} already in {args.output}")
    return summary
