"""The manual keeps up with the code: README.md stays a front page, and README.md + docs/ name every flag
of every command, every run-config key, only links and files that exist, only tests that exist, and
the sharding rules table as `RULES` has it. Nothing here runs a model: it reads text and the parser."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from llama3_jax import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250
# the two quick-start commands CI runs from a fresh clone (.ci/run holds the second)
TRAIN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . && "
                 ".venv/bin/llama3-jax train --config configs/tiny.yaml")
TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e ".[test]" && '
                ".venv/bin/python -m pytest -x -q -n 2 --dist loadfile")


def text_of(pages) -> str:
    return "\n".join(p.read_text() for p in pages)


# ---------------------------------------------------------------------------------------- the front page

def test_readme_is_a_front_page():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"
    assert DOCS, "docs/ has no page"


def test_quick_start_commands_are_in_the_readme_exactly():
    lines = README.read_text().splitlines()
    assert TRAIN_COMMAND in lines and TEST_COMMAND in lines
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [TEST_COMMAND], ".ci/run no longer runs the README's test command"
    # a new user who does not activate the venv meets `command not found`: the README says so
    assert "source .venv/bin/activate" in README.read_text()


def test_every_page_is_in_the_readme_table():
    readme = README.read_text()
    missing = [p.name for p in DOCS if f"(docs/{p.name})" not in readme]
    assert not missing, f"docs pages the README's table does not list: {missing}"


# ---------------------------------------------------------------------------------------- flags

def command_flags() -> dict[str, list[str]]:
    """`llama3-jax [SUB]` -> its option strings, walking the subparsers (help flags left out)."""
    out: dict[str, list[str]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out[name] = [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}")
    walk(cli.build_parser(), "llama3-jax")
    return out


def missing_flags(text: str) -> list[str]:
    return [f"{cmd} {flag}" for cmd, flags in command_flags().items() for flag in flags
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]


def test_every_flag_of_every_command_is_documented():
    flags = command_flags()
    assert {"llama3-jax convert", "llama3-jax train", "llama3-jax generate", "llama3-jax score"} <= set(flags)
    assert "--read-lines" in flags["llama3-jax generate"]  # the walk finds the flags
    missing = missing_flags(text_of(PAGES))
    assert not missing, f"flags no page of README.md or docs/ mentions: {missing}"


# ---------------------------------------------------------------------------------------- config keys

def config_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key a run config accepts, as config_loader reads them: a dataclass field is a key,
    a nested dataclass a section of keys, and a field whose metadata names a dataclass (`model`: the
    ModelConfig keys, plus `preset`) a section too."""
    if cls is None:
        from llama3_jax.train.config import TrainConfig
        cls = TrainConfig
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        schema = f.metadata.get("keys")
        if not nested or schema is not None or type(None) in typing.get_args(hints[f.name]):
            keys.append(prefix + f.name)  # a leaf, or a section that may also be set whole (model, rope_scaling)
        if nested:
            keys += config_keys(nested[0], f"{prefix}{f.name}.")
        if schema is not None:
            keys += config_keys(schema, f"{prefix}{f.name}.")
            keys += [f"{prefix}{f.name}.{extra}" for extra in f.metadata.get("extra_keys", ())]
    return keys


def missing_keys(text: str) -> list[str]:
    return [k for k in config_keys() if f"`{k}`" not in text]


def test_every_config_key_is_documented():
    keys = config_keys()
    assert {"data.worker_count", "mesh.fsdp", "optim.lr", "lora.rank", "model.rope_scaling.factor",
            "async_checkpoint"} <= set(keys)
    missing = missing_keys(text_of(DOCS))
    assert not missing, f"run-config keys docs/ does not name (as `key`): {missing}"


def test_the_checks_see_what_is_missing():
    """The checks report what a text leaves out: on the 984-line README of before docs/ they named 40
    keys (`data.worker_count`, `data.prefetch`, `data.packing_bins`, `async_checkpoint`, `optim.b1`,
    the `model.*` keys, ...) and `convert --quiet`; here a stand-in text without them."""
    old = ("`data.path`, `data.eval_fraction`, `mesh.fsdp`, `optim.lr`, `--dtype`, `--max-new-tokens` "
           "llama3-jax convert --from hf --to jax")
    assert {"data.worker_count", "data.prefetch", "data.packing_bins", "async_checkpoint"} <= set(missing_keys(old))
    assert {"llama3-jax generate --read-lines", "llama3-jax generate --tokenizer"} <= set(missing_flags(old))


# ---------------------------------------------------------------------------------------- links and paths

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{page.name}: {bad}"


PATH = re.compile(r"`((?:llama3_jax|tests|tools|configs|benchmarks|docs)/[\w./-]*)(?:::(\w+))?`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_named_exists(page):
    """`llama3_jax/serve/scheduler.py`, `tests/test_pods.py::test_...`: files and tests the pages name
    exist, so a move or a rename shows up here."""
    bad = []
    for path, test in PATH.findall(page.read_text()):
        if re.search(r"[A-Z]{2,}", path):  # a placeholder: configs/models/NAME.yaml
            continue
        if not (ROOT / path).exists():
            bad.append(path)
        elif test and not re.search(rf"^def {test}\(", (ROOT / path).read_text(), flags=re.M):
            bad.append(f"{path}::{test}")
    assert not bad, f"{page.name} names what does not exist: {bad}"


def test_every_test_the_guarantees_cite_exists():
    """The proof column of docs/guarantees.md: `test_x.py::test_y` and `::test_z` (same file as before)."""
    page = ROOT / "docs" / "guarantees.md"
    cited, bad = 0, []
    for row in re.findall(r"^\|.*\|$", page.read_text(), flags=re.M):
        current = None
        for file, name in re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", row.split("|")[-2]):
            current = file or current
            if not current or not (ROOT / "tests" / current).exists():
                bad.append(file or name)
                continue
            cited += 1
            if name and not re.search(rf"^def {name}\(", (ROOT / "tests" / current).read_text(), flags=re.M):
                bad.append(f"{current}::{name}")
    assert cited >= 10 and not bad, bad


# ---------------------------------------------------------------------------------------- the rules table

def test_the_rules_table_in_architecture_is_rules():
    from llama3_jax.parallel.sharding import RULES

    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The sharding rules table", 1)[1]
    documented = {}
    for name, axes in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, flags=re.M):
        found = tuple(re.findall(r"`(\w+)`", axes))
        documented[name] = found or None
    assert documented == dict(RULES), "docs/architecture.md's rules table differs from sharding.RULES"
