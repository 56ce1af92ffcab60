"""Our Llama 3 tokenizer must give the same ids as Meta's llama_models (the oracle)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from llama3_jax import tokenizer as tokmod
from llama3_jax.tokenizer import Tokenizer, default_tokenizer_path

meta_tok_mod = pytest.importorskip("llama_models.llama3.tokenizer")
meta_chat_mod = pytest.importorskip("llama_models.llama3.chat_format")
from llama_models.datatypes import RawMessage  # noqa: E402

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 3:14pm, isn't it? I'd say 12345678!"
CHINESE = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
    "大语言模型通过预测下一个词元来生成文本，分词器决定了模型看到的基本单位。"
)
EMOJI = "Hello 👋🏽 world 🌍! Family: 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, ∑∫√, café naïve"
CODE = 'def f(x):\n\tif x:\n\t\treturn "a\\tb"\r\n\n\n    pass  # trailing   \n'
SPECIAL_LOOKING = (
    "hi <|eot_id|> there<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>"
)

TEXTS = {
    "empty": "",
    "english": ENGLISH,
    "chinese": CHINESE,
    "emoji": EMOJI,
    "code": CODE,
    "special_looking": SPECIAL_LOOKING,
    "spaces_30000": " " * 30_000,
    "run_25000": "a" * 25_000 + " b",
    "run_25001": "a" * 25_001 + " b",
    "spaces_50001_mixed": "x" + " " * 50_001 + "y\n" * 3,
    "newlines_30000": "\n" * 30_000 + "end",
    "text_100k": (ENGLISH + " " + CHINESE + "\n" + EMOJI + "\t") * 400,  # ~100k chars
    "chunk_400k_boundary": ("word " * 79_999) + "a" * 30_000 + " z",  # crosses 400k cut
}


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def meta():
    return meta_tok_mod.Tokenizer(default_tokenizer_path())


@pytest.fixture(scope="module")
def chat_format(meta):
    return meta_chat_mod.ChatFormat(meta)


def test_default_path_is_the_packaged_meta_file():
    path = default_tokenizer_path()
    assert path.is_file()
    assert path == Path(meta_tok_mod.__file__).parent / "tokenizer.model"


def test_special_tokens_match_meta(ours, meta):
    assert ours.special_tokens == meta.special_tokens  # same names, ids and order
    assert list(ours.special_tokens) == list(meta.special_tokens)
    assert len(ours.special_tokens) == 256
    assert ours.n_words == meta.n_words == 128_256
    for attr in ("bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "python_tag_id"):
        assert getattr(ours, attr) == getattr(meta, attr), attr
    assert set(ours.stop_tokens) == set(meta.stop_tokens)
    # The well-known Llama 3 values, as a cross-check of the oracle itself.
    assert (ours.bos_id, ours.eos_id, ours.eom_id, ours.eot_id) == (128000, 128001, 128008, 128009)
    assert ours.special_tokens["<|reserved_special_token_245|>"] == 128255


@pytest.mark.parametrize("name", list(TEXTS))
def test_encode_matches_meta(ours, meta, name):
    text = TEXTS[name]
    expected = meta.encode(text, bos=False, eos=False)
    got = ours.encode(text, bos=False, eos=False)
    assert got == expected
    assert all(i < ours.bos_id for i in got)  # user text never yields a control id


@pytest.mark.parametrize("bos,eos", [(True, True), (True, False), (False, True)])
def test_bos_eos_flags(ours, meta, bos, eos):
    got = ours.encode(ENGLISH, bos=bos, eos=eos)
    assert got == meta.encode(ENGLISH, bos=bos, eos=eos)
    assert (got[0] == ours.bos_id) == bos
    assert (got[-1] == ours.eos_id) == eos


def test_encode_defaults_to_a_prompt_bos_and_no_eos(ours, meta):
    assert ours.encode(ENGLISH) == meta.encode(ENGLISH, bos=True, eos=False)


def test_special_looking_text_is_plain_text(ours, meta):
    got = ours.encode(SPECIAL_LOOKING, bos=False, eos=False)
    assert max(got) < 128_000
    assert ours.decode(got) == SPECIAL_LOOKING
    # Meta's defaults (allowed_special=None -> set(), disallowed_special=()) agree ...
    assert got == meta.encode(SPECIAL_LOOKING, bos=False, eos=False)
    # ... and the check is meaningful: allowing specials would produce control ids.
    assert meta.eot_id in meta.encode(SPECIAL_LOOKING, bos=False, eos=False, allowed_special="all")


@pytest.mark.parametrize(
    "name", ["english", "chinese", "emoji", "code", "special_looking", "spaces_30000"]
)
def test_decode_round_trip(ours, meta, name):
    ids = ours.encode(TEXTS[name], bos=False, eos=False)
    assert ours.decode(ids) == TEXTS[name] == meta.decode(ids)


def test_decode_specials_arrays_and_range(ours):
    assert ours.decode([ours.bos_id, ours.eot_id]) == "<|begin_of_text|><|eot_id|>"
    ids = ours.encode(ENGLISH, bos=False, eos=False)
    assert ours.decode(np.asarray(ids, dtype=np.int32)) == ENGLISH
    with pytest.raises(ValueError, match="128256"):
        ours.decode([1, 128_256])
    with pytest.raises(TypeError):
        ours.encode(b"bytes", bos=False, eos=False)


DIALOG = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2? Say <|eot_id|> if unsure."},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And in 中文?\n\n"},  # surrounding whitespace kept
]


def _meta_dialog(chat_format, messages):
    raw = [RawMessage(role=m["role"], content=m["content"]) for m in messages]
    return chat_format.encode_dialog_prompt(raw).tokens


def test_dialog_matches_chat_format(ours, chat_format):
    got = ours.encode_dialog(DIALOG)
    assert got == _meta_dialog(chat_format, DIALOG)
    assert got[0] == ours.bos_id
    assert got.count(ours.eot_id) == len(DIALOG)
    assert max(t for t in got if t not in ours.special_tokens.values()) < 128_000


def test_dialog_ends_with_assistant_header(ours):
    got = ours.encode_dialog(DIALOG[:2])
    header = ours.encode_header("assistant")
    assert got[-len(header):] == header
    assert ours.decode(header) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    no_prompt = ours.encode_dialog(DIALOG[:2], add_generation_prompt=False)
    assert no_prompt == got[: -len(header)] and no_prompt[-1] == ours.eot_id


def test_tool_role_and_single_message_match_chat_format(ours, chat_format):
    msgs = [{"role": "user", "content": "run it"}, {"role": "tool", "content": '{"result": 42}'}]
    assert ours.encode_dialog(msgs) == _meta_dialog(chat_format, msgs)
    assert "<|start_header_id|>ipython<|end_header_id|>" in ours.decode(ours.encode_dialog(msgs))
    assert ours.encode_dialog([{"role": "ipython", "content": "x"}]) == ours.encode_dialog(
        [{"role": "tool", "content": "x"}]
    )
    meta_ids, _ = chat_format.encode_message(RawMessage(role="user", content="hi"), None)
    assert ours.encode_message({"role": "user", "content": "hi"}) == meta_ids
    with pytest.raises(ValueError, match=r"^message is missing key 'content'$"):
        ours.encode_message({"role": "user"})
    assert ours.encode_dialog([]) == _meta_dialog(chat_format, [])


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ({"content": "x"}, r"messages\[1\] is missing key 'role'"),
        ({"role": "user"}, r"messages\[1\] is missing key 'content'"),
        ({"role": "user", "content": ["x"]}, r"messages\[1\]\['content'\] must be str"),
        ({"role": "bot", "content": "x"}, r"messages\[1\]\['role'\] must be one of"),
        ("just a string", r"messages\[1\] must be a mapping"),
        ({"role": ["user"], "content": "x"}, r"messages\[1\]\['role'\] must be one of"),
    ],
)
def test_bad_message_names_index_and_key(ours, bad, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        ours.encode_dialog([DIALOG[0], bad])
    assert "\n" not in str(info.value)


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        Tokenizer(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        Tokenizer(tmp_path)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_text("IQ== 0\nthis is not base64 at all\n")
    with pytest.raises(ValueError, match="line 2") as info:
        Tokenizer(str(corrupt))
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)
    gappy = tmp_path / "gappy.model"
    gappy.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match="gappy.model"):
        Tokenizer(gappy)


def test_small_custom_file_gets_specials_after_its_ranks(tmp_path):
    path = tmp_path / "bytes.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = Tokenizer(path)
    assert tok.n_words == 512 and tok.bos_id == 256 and tok.eot_id == 265
    assert tok.decode(tok.encode("héllo", bos=False, eos=False)) == "héllo"


def test_loading_is_cached(monkeypatch):
    Tokenizer()  # make sure the default file is cached
    calls = []
    real = tokmod._read_bpe_ranks
    monkeypatch.setattr(tokmod, "_read_bpe_ranks", lambda p: calls.append(p) or real(p))
    a, b = Tokenizer(), Tokenizer(default_tokenizer_path())
    assert calls == []
    assert a.model is b.model
    assert a.special_tokens is not b.special_tokens  # instances don't share mutable state
