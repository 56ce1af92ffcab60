#!/usr/bin/env python
"""Join the outputs of `llama3-jax generate --num-shards N --shard-index I` into one file.

    python tools/merge_outputs.py --input prompts.jsonl --output out.jsonl --num-shards 8
    python tools/merge_outputs.py --input prompts.jsonl --output out.jsonl --shards a.jsonl b.jsonl

The merged file holds each input id once, in input order (a shard writes in completion order); with
`generate --num-samples N`, each id's N lines (its "sample" 0..N-1) in sample order. An (id, sample) in
several shards keeps its first answer, an answer beating an error line (an error line stands for all
of an id's samples). Ids of the input that no shard answered, and the samples missing from an id that
has some, are reported (exit status 1: rerun their shards, which resume, then merge again); ids no
input line has are reported and dropped. N is --num-samples, else the largest sample index found + 1.
The output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _key(id_) -> str:
    return json.dumps(id_)  # as generate compares ids: 1 and "1" differ


def _records(path: Path):
    """(line number, record) for each readable line with an id (and, if any, an integer sample >= 0);
    others are reported."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                rec["id"]  # noqa: B018 (a line without an id is unusable)
            except (ValueError, KeyError, TypeError):
                print(f"{path}:{lineno}: skipped: not a JSON object with an 'id'", file=sys.stderr)
                continue
            sample = rec.get("sample")
            if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 0):
                print(f"{path}:{lineno}: skipped: 'sample' must be an integer >= 0, got {sample!r}", file=sys.stderr)
                continue
            yield lineno, rec


def merge(input_path: Path, shards: list[Path], output: Path, num_samples: int | None = None) -> dict:
    """Write the merged file; returns counts, the missing ids and the missing (id, sample) pairs of ids
    that have some samples (input order)."""
    order = list(dict.fromkeys(_key(rec["id"]) for _, rec in _records(input_path)))
    answers: dict[str, dict[int | None, dict]] = {}  # id -> sample (None: one-sample or error line) -> line
    duplicates = 0
    for shard in shards:
        for _, rec in _records(shard):
            lines = answers.setdefault(_key(rec["id"]), {})
            sample = rec.get("sample")
            if sample in lines:
                duplicates += 1
                if "error" in lines[sample] and "error" not in rec:
                    lines[sample] = rec
                continue
            lines[sample] = rec
    if num_samples is None:
        num_samples = 1 + max((s for lines in answers.values() for s in lines if s is not None), default=0)
    wanted = set(order)
    missing, missing_samples, merged = [], [], []
    for key in order:
        lines = answers.get(key, {})
        samples = sorted(s for s in lines if s is not None)
        if samples:  # --num-samples answers beat an error line for the id
            merged += [lines[s] for s in samples]
            missing_samples += [(json.loads(key), s) for s in range(num_samples) if s not in lines]
        elif None in lines:
            merged.append(lines[None])
        else:
            missing.append(json.loads(key))
    extra = [json.loads(k) for k in answers if k not in wanted]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in merged)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    return {"written": len(order) - len(missing), "lines": len(merged), "missing": missing,
            "missing_samples": missing_samples, "extra": extra, "duplicates": duplicates}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="the input JSONL every shard read")
    p.add_argument("--output", required=True, type=Path, help="merged JSONL (the --output the shards were given)")
    p.add_argument("--num-shards", type=int, default=None, help="find OUTPUT-0000I-of-0000N.jsonl for I < N")
    p.add_argument("--shards", nargs="+", type=Path, default=None, help="or: the shard files themselves")
    p.add_argument("--num-samples", type=int, default=None,
                   help="generate's --num-samples: lines per id (default: the largest 'sample' found + 1)")
    args = p.parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        p.error("--num-samples must be >= 1")
    if (args.num_shards is None) == (args.shards is None):
        p.error("give --num-shards or --shards (one of them)")
    if args.shards is None:
        from llama3_jax.serve.jsonl import shard_path
        shards = [shard_path(args.output, args.num_shards, i) for i in range(args.num_shards)]
    else:
        shards = args.shards
    for path in [args.input, *shards]:
        if not path.is_file():
            print(f"merge_outputs: error: file not found: {path}", file=sys.stderr)
            return 2
    s = merge(args.input, shards, args.output, args.num_samples)
    if s["extra"]:
        print(f"merge_outputs: {len(s['extra'])} ids are in no input line, dropped: "
              f"{', '.join(map(json.dumps, s['extra'][:10]))}{' ...' * (len(s['extra']) > 10)}", file=sys.stderr)
    if s["missing"]:
        print(f"merge_outputs: {len(s['missing'])} input ids have no output in any shard: "
              f"{', '.join(map(json.dumps, s['missing'][:10]))}{' ...' * (len(s['missing']) > 10)}", file=sys.stderr)
    if s["missing_samples"]:
        gaps = s["missing_samples"]
        print(f"merge_outputs: {len(gaps)} samples are in no shard: "
              f"{', '.join(f'{json.dumps(i)} sample {k}' for i, k in gaps[:10])}{' ...' * (len(gaps) > 10)}",
              file=sys.stderr)
    dropped = f", {s['duplicates']} duplicate answers dropped" if s["duplicates"] else ""
    lines = f" ({s['lines']} lines)" if s["lines"] != s["written"] else ""
    print(f"merge_outputs: {s['written']} ids{lines} written to {args.output} from {len(shards)} shards{dropped}",
          file=sys.stderr)
    return 1 if s["missing"] or s["missing_samples"] else 0


if __name__ == "__main__":
    sys.exit(main())
