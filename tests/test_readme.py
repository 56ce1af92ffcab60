"""The examples of README.md and docs/*.md run: every ```python block on a tiny converted model, and
every `llama3-jax` command line in a ```bash block names a subcommand, flags and choices the parser has.

A block fenced ```python runs; one fenced ```python notest is only compiled (for an example that
cannot run in a test). Blocks of one page run in order in one temporary directory, each in a fresh
namespace, so a later block may use files an earlier one wrote (the converted checkpoint)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from llama3_jax import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# the paths the Python API example uses -> where the test puts a tiny model of that kind
PATHS = {"hf/Llama-3.2-1B": "hf", "ckpt/llama3.2-1b": "ckpt"}
# `expr  # 405,853,388,800`: a bare expression whose comment is the number it evaluates to
NUMBER_LINE = re.compile(r"(\w[^#=]*\))\s+#\s*([\d,]+)")


def blocks(lang: str, page: Path = README) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if blocks("python", p)], ids=_name)
def test_python_blocks_run_on_a_tiny_model(page, tmp_path):
    """Each block runs with the example paths pointing at a tiny Llama (the real 128K vocabulary, so
    the real tokenizer's ids fit); the logits it computes equal transformers' on the same tokens, and a
    bare expression with a number in its comment evaluates to that number."""
    found = blocks("python", page)
    hf = None
    if any(f'"{path}"' in code for code in found for path in PATHS):
        torch = pytest.importorskip("torch")
        from conftest import make_hf_llama

        hf = make_hf_llama(tmp_path / PATHS["hf/Llama-3.2-1B"], vocab=128256, dim=16, layers=1, heads=2,
                           kv_heads=1, head_dim=8, ffn=32, tie=True, max_pos=64)
    for code in found:
        for path, name in PATHS.items():
            code = code.replace(repr(path).replace("'", '"'), repr(str(tmp_path / name)))
        namespace: dict = {}
        exec(compile(code, f"{page}:python block", "exec"), namespace)
        for line in code.splitlines():  # e.g. `load_model_config("llama3.1-405b").num_params()  # 405,853,388,800`
            m = NUMBER_LINE.fullmatch(line.strip())
            if m:
                assert eval(m.group(1), namespace) == int(m.group(2).replace(",", "")), line
        if "logits" in namespace and hf is not None:
            with torch.no_grad():
                ref = hf(torch.tensor(np.asarray(namespace["tokens"]), dtype=torch.long)).logits.numpy()
            np.testing.assert_allclose(np.asarray(namespace["logits"]), ref, atol=1e-5, rtol=0)
    if hf is not None and any('"ckpt/llama3.2-1b"' in code for code in found):
        assert (tmp_path / "ckpt" / "config.json").exists()  # the example converted into the substituted path


def test_notest_python_blocks_compile():
    for page in PAGES:
        for code in blocks("python notest", page):
            compile(code, f"{page}:python notest block", "exec")


def test_the_examples_still_check_what_they_claim():
    """The 405B parameter count and the logits against transformers are checked somewhere; the example
    paths the test substitutes are still the ones the pages use."""
    codes = [code for page in PAGES for code in blocks("python", page)]
    assert codes, "no ```python block in README.md or docs/"
    assert any(NUMBER_LINE.fullmatch(line.strip()) for code in codes for line in code.splitlines())
    assert any("logits" in code and '"hf/Llama-3.2-1B"' in code for code in codes)
    text = "".join(codes)
    assert all(f'"{path}"' in text for path in PATHS), "the example paths changed: update PATHS"


def command_lines(pages=PAGES) -> list[tuple[Path, str]]:
    """`llama3-jax ...` invocations in the bash blocks, continuation lines (indented) joined."""
    lines: list[tuple[Path, str]] = []
    for page in pages:
        for block in blocks("bash", page):
            for raw in block.splitlines():
                if raw.startswith((" ", "\t")) and lines and lines[-1][0] == page and raw.strip().startswith("["):
                    lines[-1] = (page, lines[-1][1] + " " + raw.strip())
                    continue
                m = re.search(r"(?:^|[\s/])llama3-jax\s+(.*)", raw)
                if m:
                    lines.append((page, re.split(r"&&|;|\|\||#", m.group(1))[0]))
    return lines


def test_bash_blocks_use_only_flags_the_parser_has():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    lines = command_lines()
    assert {line.split()[0] for _, line in command_lines([README])} >= {"convert", "train", "generate", "score"}
    for page, line in lines:
        where = f"{_name(page)}: {line}"
        words = shlex.split(line.replace("[", " ").replace("]", " "))
        assert words[0] in subs, where
        options = subs[words[0]]._option_string_actions
        for i, word in enumerate(words):
            if not word.startswith("--"):
                continue
            assert word in options, f"{word} is not a flag of `llama3-jax {words[0]}`: {where}"
            action = options[word]
            if action.choices and i + 1 < len(words):
                for value in words[i + 1].split("|"):
                    assert value in action.choices, f"{word} {value}: {where}"
