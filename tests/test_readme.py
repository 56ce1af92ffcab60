"""The README's examples run: every ```python block on a tiny converted model, and every `llama3-jax`
command line in a ```bash block names a subcommand, flags and choices the parser has."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from llama3_jax import cli

README = Path(__file__).resolve().parent.parent / "README.md"
# the paths the Python API example uses -> where the test puts a tiny model of that kind
PATHS = {"hf/Llama-3.2-1B": "hf", "ckpt/llama3.2-1b": "ckpt"}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_python_blocks_run_on_a_tiny_model(tmp_path, capsys):
    """Each block runs with the example paths pointing at a tiny Llama (the real 128K vocabulary, so
    the real tokenizer's ids fit); the logits it computes equal transformers' on the same tokens, and a
    bare expression with a number in its comment evaluates to that number."""
    torch = pytest.importorskip("torch")
    from conftest import make_hf_llama

    hf = make_hf_llama(tmp_path / PATHS["hf/Llama-3.2-1B"], vocab=128256, dim=16, layers=1, heads=2, kv_heads=1,
                       head_dim=8, ffn=32, tie=True, max_pos=64)
    found = blocks("python")
    assert found, "no ```python block in README.md"
    numbers = 0
    for code in found:
        for path, name in PATHS.items():
            code = code.replace(repr(path).replace("'", '"'), repr(str(tmp_path / name)))
        namespace: dict = {}
        exec(compile(code, f"{README}:python block", "exec"), namespace)
        for line in code.splitlines():  # e.g. `load_model_config("llama3.1-405b").num_params()  # 405,853,388,800`
            m = re.fullmatch(r"(\w[^#=]*\))\s+#\s*([\d,]+)", line.strip())
            if m:
                assert eval(m.group(1), namespace) == int(m.group(2).replace(",", "")), line
                numbers += 1
        if "logits" in namespace:
            with torch.no_grad():
                ref = hf(torch.tensor(np.asarray(namespace["tokens"]), dtype=torch.long)).logits.numpy()
            np.testing.assert_allclose(np.asarray(namespace["logits"]), ref, atol=1e-5, rtol=0)
    assert numbers >= 1  # the parameter count of 405B is checked
    text = README.read_text()
    assert all(f'"{path}"' in text for path in PATHS), "the example paths changed: update PATHS"
    assert (tmp_path / "ckpt" / "config.json").exists()  # the example converted into the substituted path


def command_lines() -> list[str]:
    """`llama3-jax ...` invocations in the bash blocks, continuation lines (indented) joined."""
    lines = []
    for block in blocks("bash"):
        for raw in block.splitlines():
            if raw.startswith((" ", "\t")) and lines and raw.strip().startswith("["):
                lines[-1] += " " + raw.strip()
                continue
            m = re.search(r"(?:^|[\s/])llama3-jax\s+(.*)", raw)
            if m:
                lines.append(re.split(r"&&|;|\|\|", m.group(1))[0])
    return lines


def test_bash_blocks_use_only_flags_the_parser_has():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    lines = command_lines()
    assert {line.split()[0] for line in lines} >= {"convert", "train", "generate", "score"}
    for line in lines:
        words = shlex.split(line.replace("[", " ").replace("]", " "))
        assert words[0] in subs, line
        options = subs[words[0]]._option_string_actions
        for i, word in enumerate(words):
            if not word.startswith("--"):
                continue
            assert word in options, f"{word} is not a flag of `llama3-jax {words[0]}`: {line}"
            action = options[word]
            if action.choices and i + 1 < len(words):
                for value in words[i + 1].split("|"):
                    assert value in action.choices, f"{word} {value}: {line}"
