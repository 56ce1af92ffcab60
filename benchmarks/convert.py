"""Conversion throughput and peak host memory, each direction in its own process.

    .venv/bin/python benchmarks/convert.py [--workdir /tmp/convert-bench] [--layers 12] [--dim 1024]

Builds a random Llama-3-shaped model in bfloat16 (about 0.85 GB with the defaults: the real 128K
vocabulary, dim 1024, 12 layers), saves it as HF safetensors, then times all six directions. Each
conversion runs in a fresh Python process so its peak RSS (VmHWM) is its own. Prints a markdown
table: input size, seconds, MB/s (input bytes / wall time, imports included), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, time, json
t0 = time.time()
from llama3_jax.convert import convert
convert(sys.argv[1], sys.argv[2], src_format=sys.argv[3], dst_format=sys.argv[4], progress=False)
# VmHWM is this process's own peak (ru_maxrss survives exec and would report the parent's peak)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.time() - t0, "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_model(path: Path, dim: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=dim, intermediate_size=int(3.5 * dim), num_hidden_layers=layers,
                      num_attention_heads=dim // 64, num_key_value_heads=max(1, dim // 256), head_dim=64,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0,
                      bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="400MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/llama3-jax-convert-bench")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--formats", default="hf,jax,meta,hf,meta,jax,hf",
                    help="the chain of conversions: each adjacent pair is one direction")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.time()
    make_model(work / "hf0", args.dim, args.layers)
    print(f"made random model in {time.time() - t:.0f}s: {dir_size(work / 'hf0') / 1e6:.0f} MB", file=sys.stderr)

    chain = args.formats.split(",")
    rows = []
    src = work / "hf0"
    for i, (a, b) in enumerate(zip(chain, chain[1:])):
        dst = work / f"{b}{i + 1}"
        out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), a, b],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"{a} -> {b} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        size = dir_size(src)
        rows.append((f"{a} -> {b}", size / 1e6, r["seconds"], size / 1e6 / r["seconds"], r["peak_rss_mb"]))
        src = dst
    print("| direction | input MB | seconds | MB/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for name, mb, secs, rate, rss in rows:
        print(f"| {name} | {mb:.0f} | {secs:.1f} | {rate:.0f} | {rss:.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
