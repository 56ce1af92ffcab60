#!/usr/bin/env python
"""Join the outputs of `llama3-jax generate --num-shards N --shard-index I` into one file.

    python tools/merge_outputs.py --input prompts.jsonl --output out.jsonl --num-shards 8
    python tools/merge_outputs.py --input prompts.jsonl --output out.jsonl --shards a.jsonl b.jsonl

The merged file holds each input id once, in input order (a shard writes in completion order). An id
in several shards keeps its first answer, an answer beating an error line. Ids of the input that no
shard answered are reported (exit status 1: rerun their shards, which resume, then merge again); ids
no input line has are reported and dropped. The output is written atomically.
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
    """(line number, record) for each readable line with an id; others are reported."""
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
            yield lineno, rec


def merge(input_path: Path, shards: list[Path], output: Path) -> dict:
    """Write the merged file; returns counts and the missing ids (input order)."""
    order = list(dict.fromkeys(_key(rec["id"]) for _, rec in _records(input_path)))
    answers, duplicates = {}, 0
    for shard in shards:
        for _, rec in _records(shard):
            key = _key(rec["id"])
            if key in answers:
                duplicates += 1
                if "error" in answers[key] and "error" not in rec:
                    answers[key] = rec
                continue
            answers[key] = rec
    wanted = set(order)
    missing = [json.loads(k) for k in order if k not in answers]
    extra = [json.loads(k) for k in answers if k not in wanted]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for key in order:
            if key in answers:
                f.write(json.dumps(answers[key], ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    return {"written": len(order) - len(missing), "missing": missing, "extra": extra, "duplicates": duplicates}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="the input JSONL every shard read")
    p.add_argument("--output", required=True, type=Path, help="merged JSONL (the --output the shards were given)")
    p.add_argument("--num-shards", type=int, default=None, help="find OUTPUT-0000I-of-0000N.jsonl for I < N")
    p.add_argument("--shards", nargs="+", type=Path, default=None, help="or: the shard files themselves")
    args = p.parse_args(argv)
    if (args.num_shards is None) == (args.shards is None):
        p.error("give --num-shards or --shards (one of them)")
    if args.shards is None:
        from llama3_jax.generate import shard_path
        shards = [shard_path(args.output, args.num_shards, i) for i in range(args.num_shards)]
    else:
        shards = args.shards
    for path in [args.input, *shards]:
        if not path.is_file():
            print(f"merge_outputs: error: file not found: {path}", file=sys.stderr)
            return 2
    s = merge(args.input, shards, args.output)
    if s["extra"]:
        print(f"merge_outputs: {len(s['extra'])} ids are in no input line, dropped: "
              f"{', '.join(map(json.dumps, s['extra'][:10]))}{' ...' * (len(s['extra']) > 10)}", file=sys.stderr)
    if s["missing"]:
        print(f"merge_outputs: {len(s['missing'])} input ids have no output in any shard: "
              f"{', '.join(map(json.dumps, s['missing'][:10]))}{' ...' * (len(s['missing']) > 10)}", file=sys.stderr)
    dropped = f", {s['duplicates']} duplicate answers dropped" if s["duplicates"] else ""
    print(f"merge_outputs: {s['written']} ids written to {args.output} from {len(shards)} shards{dropped}",
          file=sys.stderr)
    return 1 if s["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
