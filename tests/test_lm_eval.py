"""lm-evaluation-harness against `llama3-jax serve`: its `local-completions` model, its CLI, two local tasks.

What a user runs to evaluate a checkpoint (`lm-eval run --model local-completions --model_args
base_url=.../v1/completions,tokenizer=...`), here on a tiny converted model with Llama 3's 128K
vocabulary and nothing downloaded (HF_*_OFFLINE, tasks as YAML over local JSONL). lm-eval tokenizes
with an HF tokenizer (built here from the same `tokenizer.model` our Tokenizer reads, and checked
id-for-id against it) and sends token ids with BOS (`add_bos_token=True`: Llama 3 scores without it
are off-distribution). Its answers are compared with the offline commands on the same checkpoint:
  * a multiple-choice (log-likelihood) task: each choice's log-likelihood equals `score` on the text
    pair (prompt, continuation), to 1e-4 absolute in float32 (the server's scoring pass and `score`
    batch the same rows differently);
  * a generate-until task: each output equals `generate`'s greedy text for the same prompt, cut at
    the first `until` string (two picked from those texts, so that some outputs really are cut; four
    in all, which with the EOS text lm-eval adds is more stop strings than OpenAI's four).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

from conftest import make_hf_llama  # noqa: E402
from serve_helpers import launch_server, stop_server, wait_ready  # noqa: E402

NAME, BATCH, MAX_GEN = "tiny", 8, 20
QUESTIONS = [("The capital of France is", ["Paris", "London", "Rome"], 0),
             ("Water freezes at zero", ["degrees", "apples", "hours"], 0),
             ("One, two, three,", ["four", "five", "six"], 0),
             ("The cat sat on the", ["mat", "moon", "table"], 0)]
PROMPTS = ["Once upon a time", "def main():", "Hello, my name is", "The weather today"]


def hf_tokenizer(path: Path) -> Path:
    """Llama 3's tokenizer as an HF tokenizer directory (what lm-eval's huggingface backend loads):
    transformers' tiktoken converter over llama-models' tokenizer.model, BOS added as Llama 3's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama3_jax.tokenizer import default_tokenizer_path, special_token_names
    tok = TikTokenConverter(vocab_file=str(default_tokenizer_path()), extra_special_tokens=special_token_names()
                            ).converted()
    bos = special_token_names()[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 128000)])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=special_token_names()[1]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The checkpoint, a live server on it (no key), the HF tokenizer directory, the offline Generator."""
    from llama3_jax.convert import convert
    from llama3_jax.serve.engine import Generator
    d = tmp_path_factory.mktemp("lm_eval")
    make_hf_llama(d / "hf", vocab=128256, dim=16, layers=1, heads=2, kv_heads=1, head_dim=8, ffn=32, max_pos=256,
                  init_range=0.5)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    proc, url = launch_server(d / "jax", "--served-model-name", NAME, "--dtype", "float32",
                              "--batch-size", str(BATCH))
    tok = hf_tokenizer(d / "hf_tokenizer")  # while the server starts
    gen = Generator(d / "jax", dtype="float32")
    wait_ready(proc, url)
    yield {"dir": d, "url": url, "tokenizer": tok, "gen": gen}
    stop_server(proc)


def offline(gen, tmp_path: Path, command: str, lines: list[dict], **flags) -> dict:
    """`generate` or `score` (serve/offline.py, the commands' code) on these lines -> {id: record}."""
    import argparse

    from llama3_jax.serve.offline import run_generate, run_score
    inp, out = tmp_path / f"{command}.jsonl", tmp_path / f"{command}.out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = dict(checkpoint=None, input=str(inp), output=str(out), batch_size=BATCH, dtype="float32", tokenizer=None,
                max_new_tokens=None, temperature=0.0, top_k=0, top_p=1.0, seed=0, ignore_eos=False, **flags)
    (run_generate if command == "generate" else run_score)(argparse.Namespace(**args), generator=gen)
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def write_tasks(d: Path, until: list[str]) -> Path:
    """Two lm-eval tasks as YAML over local JSONL: l3j_choice (multiple choice), l3j_gen (generate until)."""
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "choice.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                                for q, c, a in QUESTIONS))
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in PROMPTS))
    common = "test_split: test\ndataset_path: json\n"
    (tasks / "choice.yaml").write_text(
        f"task: l3j_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {tasks / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(
        f"task: l3j_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tasks / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "  temperature: 0\nmetric_list:\n  - metric: exact_match\n")
    return tasks


def run_lm_eval(setup, tasks: Path, out: Path) -> dict[str, list[dict]]:
    """The lm-eval CLI, offline; -> its logged samples per task."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf_home"), "OPENAI_API_KEY": "unused", "TOKENIZERS_PARALLELISM": "false"}
    model_args = (f"model={NAME},base_url={setup['url']}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={setup['tokenizer']},add_bos_token=True,max_length=256,max_retries=1")
    cmd = [str(Path(sys.executable).parent / "lm-eval"), "run", "--model", "local-completions", "--model_args",
           model_args, "--tasks", "l3j_choice", "l3j_gen", "--include_path", str(tasks), "--batch_size", "4",
           "--log_samples", "--output_path", str(out / "results")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = {}
    for task in ("l3j_choice", "l3j_gen"):
        [f] = (out / "results").rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted(map(json.loads, f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return samples


def cut(text: str, until: list[str]) -> str:
    at = [text.find(u) for u in until if u in text]
    return text[:min(at)] if at else text


def test_lm_eval_loglikelihoods_equal_score_and_generations_equal_generate(setup, tmp_path):
    gen = setup["gen"]
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(setup["tokenizer"])
    for text in [q for q, _, _ in QUESTIONS] + PROMPTS:  # lm-eval's token ids are ours
        assert hf(text, add_special_tokens=True).input_ids == gen.tokenizer.encode(text, bos=True, eos=False)

    full = offline(gen, tmp_path, "generate", [{"id": i, "prompt": p, "max_new_tokens": MAX_GEN}
                                               for i, p in enumerate(PROMPTS)])
    texts = [full[i]["text"] for i in range(len(PROMPTS))]
    # two strings the greedy outputs really hold, and two more: with lm-eval's EOS text, five stop strings
    # (OpenAI allows four; many lm-eval tasks send more)
    until = [t[len(t) // 2:len(t) // 2 + 2] for t in texts[:2]] + ["\n\n", "Question:"]
    want = [cut(t, until) for t in texts]
    assert sum(len(w) < len(t) for w, t in zip(want, texts)) >= 2

    samples = run_lm_eval(setup, write_tasks(tmp_path, until), tmp_path)

    got = [s["resps"][0][0] for s in samples["l3j_gen"]]
    assert got == want
    pairs, lls = [], []
    for s, (q, choices, _) in zip(samples["l3j_choice"], QUESTIONS):
        args = [s["arguments"][f"gen_args_{k}"] for k in range(len(choices))]
        assert [(a["arg_0"], a["arg_1"]) for a in args] == [(q, " " + c) for c in choices]
        for a, r in zip(args, s["resps"]):
            pairs.append({"id": len(pairs), "prompt": a["arg_0"], "completion": a["arg_1"]})
            lls.append(float(r[0][0]))
        assert s["acc"] == float(int(np.argmax(lls[-len(choices):])) == 0)  # lm-eval's metric from these
    scored = offline(gen, tmp_path, "score", pairs)
    want_ll = [scored[i]["sum_logprob"] for i in range(len(pairs))]
    np.testing.assert_allclose(lls, want_ll, rtol=0, atol=1e-4)
    assert len(set(np.round(want_ll, 3))) == len(want_ll)  # distinct values: a shuffled answer would show
