#!/usr/bin/env python
"""Tokenize a corpus once into ArrayRecord shards that `llama3-jax train` reads by index.

    python tools/prepare_data.py corpus.jsonl data/corpus-prepared
    python tools/prepare_data.py docs/ data/docs-bytes --tokenizer bytes --eval-fraction 0.05
    llama3-jax train --config configs/tiny-128k.yaml data.path=data/corpus-prepared

SRC is anything `data.path` reads (a .jsonl or .parquet file, a text file, a directory of them, or
"stdlib"); DST is a new directory: metadata.json + train-*/eval-*.array_record, one record per
document (its Llama 3 tokens, BOS text EOS, as int32), written to a temp directory and renamed when
complete. The train/eval split (--eval-fraction), --text-field, --max-documents and the tokenizer
are fixed here; training from DST gives the batches, and so the losses, of training from SRC with the
same settings (llama3_jax/data/prepared.py), with no listing, parsing or tokenizing at start-up or eval.
With --seq-len the rows are packed here instead (records = rows, read by each process for its own rows).
With --objective sft, dpo or reward the records are fine-tuning records (TRL's formats, data/chat.py),
each stored rendered (ids + assistant loss mask; a pair's two sides; a reward pair's two whole sides and
its margin) for `objective: sft|dpo|reward` runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from llama3_jax.convert.tensors import parse_size  # noqa: E402
from llama3_jax.data import DataConfig, skipped_line_count  # noqa: E402
from llama3_jax.data import prepared  # noqa: E402
from llama3_jax.store import remote  # noqa: E402
from llama3_jax.store.paths import filesystem, is_remote, resolve  # noqa: E402
from llama3_jax.tokenizer import load_tokenizer  # noqa: E402


def main(argv=None) -> int:
    defaults = DataConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the corpus: what data.path accepts")
    p.add_argument("dst", help="the new directory of ArrayRecord shards (must not exist)")
    p.add_argument("--tokenizer", default=None,
                   help="bytes, or a tokenizer.model path (default: Llama 3's): the run's `tokenizer` key")
    p.add_argument("--text-field", default=defaults.text_field, help="JSONL/Parquet field (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                   help="held-out documents, by hash: the run's data.eval_fraction (default: %(default)s)")
    p.add_argument("--max-documents", type=int, default=0, help="0 = all (default: %(default)s)")
    p.add_argument("--objective", choices=sorted(set(prepared.OBJECTIVES.values())), default="lm",
                   help="the records' use: lm (pretraining text), sft (chat records: ids + assistant loss mask), "
                        "dpo (preference pairs) or reward (preference pairs, whole sides and margin), as the "
                        "run's `objective` key (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="pack into rows for this seq_len (default: one record per document, any seq_len)")
    p.add_argument("--seed", type=int, default=0,
                   help="--seq-len: the data.seed whose first-epoch document order the rows follow (default: "
                        "%(default)s)")
    p.add_argument("--shard-size", default="512MB", help="about this much per shard file (default: %(default)s)")
    p.add_argument("--threads", type=int, default=4, help="tokenizer threads (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    skipped = skipped_line_count()  # (this process may have listed other files before: a caller's)
    try:
        src, dst = resolve(args.src, "SRC"), resolve(args.dst, "DST")
        src = remote.fetch(src, "SRC") if is_remote(src) else src  # gs://...: into the cache (remote.py)
        if is_remote(dst) and filesystem(dst, "DST")[0].exists(filesystem(dst, "DST")[1]):
            raise ValueError(f"{dst}: already exists")
        out = remote.staging_dir(dst, "DST") if is_remote(dst) else dst  # written here, then uploaded
        cfg = DataConfig(path=src, text_field=args.text_field, eval_fraction=args.eval_fraction,
                         max_documents=args.max_documents, format="raw")
        tok = load_tokenizer(args.tokenizer)
        spec = args.tokenizer if args.tokenizer in (None, "bytes") else str(Path(args.tokenizer).absolute())
        if is_remote(dst):
            shutil.rmtree(out, ignore_errors=True)
        meta = prepared.prepare(cfg, out, tok, tokenizer_spec=spec,
                                seq_len=args.seq_len, seed=args.seed,
                                shard_bytes=parse_size(args.shard_size, "--shard-size"),
                                threads=max(1, args.threads), progress=not args.quiet,
                                kind={v: k for k, v in prepared.OBJECTIVES.items()}[args.objective])
        if is_remote(dst):  # metadata.json is among the last: see remote.upload_key
            remote.upload(out, dst, "DST")
            shutil.rmtree(out, ignore_errors=True)
    except (ValueError, OSError) as e:  # ConvertError (a bad --shard-size) is a ValueError
        print(f"prepare_data: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    s, unit = meta["splits"], "rows" if meta["packed"] else "documents" if args.objective == "lm" else "records"
    skipped = skipped_line_count() - skipped  # each reported above as FILE:LINE: skipped: why
    print(f"prepare_data: {args.dst}: train {s['train']['records']} {unit} ({s['train']['tokens']:,} tokens, "
          f"{len(s['train']['shards'])} shards), eval {s['eval']['records']} {unit} ({s['eval']['tokens']:,} tokens)"
          + (f", {skipped} bad lines skipped" if skipped else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
