"""The command line is assembled from one file per command (llama3_jax/cli/): the commands appear in
the order of COMMANDS, each sets the function it runs, and convert hands exactly the flags given to
convert(), in a fixed order (check_options names the first that does not fit the output format)."""

import argparse

import pytest

from llama3_jax import cli


def subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_commands_come_from_their_files_in_order():
    subs = subparsers(cli.build_parser())
    assert list(subs) == ["convert", "train", "generate", "score", "serve", "rejection-sample"]
    assert all(hasattr(command, "add_parser") for command in cli.COMMANDS)
    for name, sub in subs.items():
        assert callable(sub.get_default("func")), name


def test_description_names_every_convert_format():
    text = cli.build_parser().format_help()
    assert "Hugging Face, Meta and llama3-jax" in text and "PEFT LoRA adapters" in text


def test_distributed_flags_on_every_command_but_train():
    subs = subparsers(cli.build_parser())
    for name, sub in subs.items():
        assert ("--coordinator-address" in sub._option_string_actions) == (name != "train"), name


@pytest.mark.parametrize("argv, options", [
    ([], {}),
    (["--shards", "0"], {"shards": 0}),
    (["--keep-adapters", "--base", "B", "--quantize", "int8", "--mesh", "fsdp=2", "--max-shard-size", "5GB"],
     {"max_shard_size": "5GB", "base": "B", "mesh": "fsdp=2", "keep_adapters": True, "quantize": "int8"}),
])
def test_convert_hands_over_the_flags_given(monkeypatch, argv, options):
    calls = []
    monkeypatch.setattr("llama3_jax.convert.convert", lambda *a, **k: calls.append((a, k)))
    assert cli.main(["convert", "--from", "peft", "--to", "jax", "src", "dst", "--quiet", *argv]) == 0
    (args, kwargs), = calls
    assert args == ("src", "dst")
    assert kwargs == {"src_format": "peft", "dst_format": "jax", "dtype": None, "progress": False, **options}
    assert list(kwargs)[4:] == list(options)  # the order check_options reports misfits in
