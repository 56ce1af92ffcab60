"""`llama3-jax rejection-sample`: N samples per prompt from a policy, scored by a reward model and/or
reward functions, the best written as SFT records (serve/rejection.py). Exit status 1 when every input
line failed, 2 on bad usage."""

from __future__ import annotations

import argparse

from .args import add_compile_cache_arg, add_distributed_args, add_mesh_arg, use_compile_cache


def add_parser(sub) -> None:
    r = sub.add_parser("rejection-sample", help="best-of-N SFT data: sample, score with a reward, keep the best",
                       description="Rejection sampling: for each prompt of a JSONL file of TRL prompt records "
                                   "({\"prompt\": text | messages, ...}, optional \"id\"), draw --num-samples "
                                   "samples from --policy, score them with --reward-model and/or --reward-fn, and "
                                   "write the best as SFT records (resumable). Exit status 1 when every input "
                                   "line failed, 2 on bad usage.")
    r.add_argument("--policy", required=True, help="the policy that samples: a jax checkpoint or an HF or Meta "
                                                   "directory")
    r.add_argument("--reward-model", default=None, metavar="RM",
                   help="a reward checkpoint (train objective: reward, or an HF LlamaForSequenceClassification "
                        "directory): the score of each sample's record, rendered as SFT renders it")
    r.add_argument("--reward-fn", action="append", default=None, metavar="MODULE:NAME",
                   help="a Python reward function with TRL's signature fn(prompts, completions, **columns) -> "
                        "list[float | None], as MODULE:NAME or path/to/file.py:NAME; may be repeated")
    r.add_argument("--reward-weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per reward source: the reward model first, then each --reward-fn in order "
                        "(default: 1 each); a sample's reward is the weighted sum over the sources that judged it")
    r.add_argument("--input", required=True, help="input JSONL of prompt records")
    r.add_argument("--output", required=True,
                   help="output JSONL of the kept SFT records (appended; OUTPUT.done records the prompts "
                        "finished, which a rerun skips)")
    r.add_argument("--num-samples", type=int, default=4, metavar="N",
                   help="samples per prompt (default: %(default)s)")
    r.add_argument("--keep", type=int, default=1, metavar="K",
                   help="records kept per prompt: its K best samples (default: %(default)s)")
    r.add_argument("--min-reward", type=float, default=None, metavar="X",
                   help="drop samples whose reward is below X (a prompt may then keep none) (default: none)")
    r.add_argument("--samples-output", default=None, metavar="FILE",
                   help="also write every scored sample to FILE: {id, sample, text, reward} (default: none)")
    _add_engine_args(r)
    add_compile_cache_arg(r)
    add_distributed_args(r)
    r.set_defaults(func=run)


def _add_engine_args(r: argparse.ArgumentParser) -> None:
    """generate's sampling and engine flags (the defaults differ in one place: --temperature is 1.0,
    as greedy decoding would draw the same sample N times)."""
    r.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    r.add_argument("--top-k", type=int, default=0, help="sample among the k best; 0 = off (default: %(default)s)")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default: %(default)s)")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="most new tokens per sample (default: until a stop token or the end of the context)")
    r.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    r.add_argument("--batch-size", type=int, default=8,
                   help="decode slots, and rows per reward-model batch (default: %(default)s)")
    r.add_argument("--read-lines", type=int, default=None, metavar="N",
                   help="read and run the input N lines at a time (default: 4096)")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="compute dtype of both models (default: %(default)s)")
    r.add_argument("--tokenizer", default=None,
                   help="tokenizer.model path, or bytes, for both models (default: the one each checkpoint "
                        "records, else llama-models' Llama 3)")
    add_mesh_arg(r, "both models' parameters, the KV cache and batch rows")


def run(args: argparse.Namespace) -> int:
    use_compile_cache(args)
    from ..store.paths import is_remote, resolve
    for flag in ("policy", "reward_model"):
        path = getattr(args, flag)
        if path is not None:
            path = resolve(path, "--" + flag.replace("_", "-"))
            if is_remote(path):
                from ..store.remote import fetch
                path = fetch(path, "--" + flag.replace("_", "-"))
            setattr(args, flag, path)
    from ..serve.rejection import run_rejection_sample
    return 1 if run_rejection_sample(args)["all_failed"] else 0
