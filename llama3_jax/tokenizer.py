"""Llama 3 tokenizer: tiktoken BPE, Meta's 256 special tokens and the chat template.

The model only gives sensible output if it sees exactly the token ids it was trained
on, so everything here is meant to be id-for-id identical to Meta's reference code in
``llama_models`` (``llama3/tokenizer.py`` and ``llama3/chat_format.py``, version 0.3.0).
The tests check that claim against those classes; this module does not import them at
run time, only the ``tokenizer.model`` data file that ships in the package.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path

import tiktoken

__all__ = ["ByteTokenizer", "Tokenizer", "default_tokenizer_path", "load_tokenizer", "special_token_names"]

# Meta's pre-tokenizer regex; BPE merges never cross the boundaries it draws, so it is
# part of the vocabulary's definition and must not be "improved".
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# The first twelve special tokens have names; the rest are numbered reserved slots.
# Order matters: a token's id is base + its position in this list.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
)  # fmt: skip
# tiktoken's Rust core can panic on very long inputs or very long runs of one
# character class, so Meta cuts text before encoding. The cut points change the tokens,
# so we must cut at exactly the same places Meta does to get identical ids.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# `\s` and str.isspace() (which Meta's splitter uses) agree on every code point.
_RUN_RE = re.compile(r"\s+|\S+")
# Chat roles -> header text. Meta's RawMessage calls tool results "tool" but the
# template spells that header "ipython"; we also accept "ipython" directly.
_ROLE_HEADERS = {r: r for r in ("system", "user", "assistant", "ipython")} | {"tool": "ipython"}


def special_token_names() -> list[str]:
    """All 256 special token strings in id order (the named ones, then reserved 2..)."""
    n_reserved = NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS)
    return list(_NAMED_SPECIAL_TOKENS) + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)
    ]


def default_tokenizer_path() -> Path:
    """The Llama 3 ``tokenizer.model`` shipped in ``llama_models`` (no gated download)."""
    try:
        root = resources.files("llama_models.llama3")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "llama_models is not installed; install it or pass Tokenizer(model_path=...)"
        ) from None
    return Path(os.fspath(root / "tokenizer.model"))


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``<base64 token> <rank>`` per line).

    We parse it ourselves rather than via ``tiktoken.load.load_tiktoken_bpe`` because
    that function copies every file into a temp-dir cache keyed only by the path
    string, so a file edited in place would silently keep its old contents. Unlike
    Meta's loader (which logs and skips bad lines) we reject corrupt files outright:
    a skipped line would shift the special-token ids.
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # covers bad field count, binascii.Error and int() errors
            raise ValueError(f"corrupt tokenizer model file {path}: bad line {lineno}") from None
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"corrupt tokenizer model file {path}: ranks are not 0..N-1 without gaps")
    return ranks


@functools.lru_cache(maxsize=8)
def _load_encoding(path: str, mtime_ns: int, size: int) -> tuple[tiktoken.Encoding, int]:
    """Build the tiktoken Encoding once per file version (mtime/size are in the key).

    Parsing 128k ranks and building the Rust BPE takes ~0.4 s; sharing one Encoding
    makes later ``Tokenizer()`` calls free, while an edited file still loads afresh.
    """
    ranks = _read_bpe_ranks(Path(path))
    base = len(ranks)
    specials = {name: base + i for i, name in enumerate(special_token_names())}
    encoding = tiktoken.Encoding(
        name=f"llama3:{Path(path).name}",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )
    return encoding, base


def _pieces(text: str) -> Iterator[str]:
    """Cut ``text`` exactly where Meta's ``Tokenizer.encode`` cuts it.

    Meta first slices into 400k-char chunks, then, within each chunk, starts a new
    piece every 25000 characters of a run of only-whitespace or only-non-whitespace
    characters (the 25001st char of a run begins a new piece; counts restart at each
    chunk). Runs of <= 25000 chars are never cut, so ordinary text is one piece.
    """
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[start : start + TIKTOKEN_MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:
            yield chunk
            continue
        prev = 0
        for match in _RUN_RE.finditer(chunk):
            run_start, run_end = match.span()
            for cut in range(run_start + MAX_RUN_CHARS, run_end, MAX_RUN_CHARS):
                yield chunk[prev:cut]
                prev = cut
        yield chunk[prev:]


class Tokenizer:
    """Llama 3 tokenizer with the same ids, special tokens and chat template as Meta's.

    Attributes: ``n_words`` (vocab size incl. specials, 128256), ``bos_id``, ``eos_id``
    (``<|end_of_text|>``), ``eot_id``, ``eom_id``, ``pad_id``
    (``<|finetune_right_pad_id|>``), ``python_tag_id``, ``stop_tokens`` (ids that end
    generation), ``special_tokens`` (name -> id), ``model_path``.
    """

    def __init__(self, model_path: str | os.PathLike | None = None):
        path = default_tokenizer_path() if model_path is None else Path(model_path)
        path = path.expanduser().absolute()
        try:
            st = path.stat()
        except OSError:
            raise FileNotFoundError(f"tokenizer model file not found: {path}") from None
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"tokenizer model path is not a regular file: {path}")
        self.model, base = _load_encoding(str(path), st.st_mtime_ns, st.st_size)
        self.model_path = path
        self.special_tokens: dict[str, int] = {
            name: base + i for i, name in enumerate(special_token_names())
        }
        self.n_words: int = base + NUM_SPECIAL_TOKENS
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.stop_tokens: tuple[int, ...] = (self.eos_id, self.eom_id, self.eot_id)

    # ----------------------------------------------------------------- plain text
    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode text; ``bos``/``eos`` add ``<|begin_of_text|>``/``<|end_of_text|>``.

        The defaults are what a prompt needs (and what Meta's generation code passes): BOS, no EOS.

        Text that looks like a special token (e.g. a user typing ``<|eot_id|>``) is
        encoded as ordinary characters, never as the control id -- otherwise user input
        could end a turn or forge a header. This equals Meta's encode with its default
        ``allowed_special=set(), disallowed_special=()``.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for piece in _pieces(text):
            ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids (list, tuple or 1-D numpy/JAX array) to text.

        Special ids decode to their names. Byte sequences that are not valid UTF-8
        (e.g. a sequence cut mid-character) become U+FFFD, as in Meta's decode.
        """
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.n_words), None)
        if bad is not None:
            raise ValueError(f"token id {bad} out of range [0, {self.n_words})")
        return self.model.decode(ids)

    # ---------------------------------------------------------------------- chat
    def encode_header(self, role: str) -> list[int]:
        """``<|start_header_id|>{role}<|end_header_id|>`` + the encoded ``"\\n\\n"``.

        Role text and the blank line are encoded as separate strings (as Meta does),
        so their tokens never merge with the message content.
        """
        header = _ROLE_HEADERS.get(role)
        if header is None:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(_ROLE_HEADERS)}")
        return [
            self.special_tokens["<|start_header_id|>"],
            *self.encode(header, bos=False, eos=False),
            self.special_tokens["<|end_header_id|>"],
            *self.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Mapping[str, str]) -> list[int]:
        """Header, content, ``<|eot_id|>`` for one ``{"role", "content"}`` message.

        The content is NOT stripped: llama_models 0.3.0's ChatFormat encodes it
        verbatim (the older meta-llama/llama3 repo stripped it), and we match 0.3.0.
        Keys other than role/content are ignored.
        """
        return self._message_ids(message, "message")

    def _message_ids(self, message: Mapping[str, str], where: str) -> list[int]:
        """Validate and encode one message; ``where`` names it in error messages."""
        if not isinstance(message, Mapping):
            kind = type(message).__name__
            raise ValueError(f"{where} must be a mapping with 'role' and 'content', got {kind}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where} is missing key {key!r}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in _ROLE_HEADERS:
            allowed = sorted(_ROLE_HEADERS)
            raise ValueError(f"{where}['role'] must be one of {allowed}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}['content'] must be str, got {type(content).__name__}")
        return [*self.encode_header(role), *self.encode(content, bos=False, eos=False), self.eot_id]

    def encode_dialog(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """``<|begin_of_text|>`` + every message + (optionally) an open assistant header.

        With ``add_generation_prompt`` the result equals llama_models'
        ``ChatFormat.encode_dialog_prompt(...).tokens`` and ends where the model should
        start writing its reply.
        """
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            kind = type(messages).__name__
            raise ValueError(f"messages must be a sequence of message dicts, got {kind}")
        ids = [self.bos_id]
        for i, message in enumerate(messages):
            ids.extend(self._message_ids(message, f"messages[{i}]"))
        if add_generation_prompt:
            ids.extend(self.encode_header("assistant"))
        return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, BOS 256, EOS 257 (`tokenizer: bytes` in a run config): a real tokenizer
    for models with a tiny vocabulary (tests, quick experiments), with no 128K-row embedding to pay for.
    Chat fine-tuning data (data/chat.py) renders with Llama 3's message layout over three more ids:
    <|start_header_id|> 258, <|end_header_id|> 259, <|eot_id|> 260."""

    bos_id, eos_id, eot_id, n_words = 256, 257, 260, 261
    stop_tokens = (257, 260)

    def encode_header(self, role: str) -> list[int]:
        return [258, *_ROLE_HEADERS.get(role, role).encode("utf-8"), 259, *b"\n\n"]

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer(spec: str | os.PathLike | None = None):
    """A tokenizer by the name a run config (and a trained checkpoint's config.json) gives it:
    None = Llama 3's tokenizer.model, "bytes" = ByteTokenizer, else a tokenizer.model path."""
    return ByteTokenizer() if spec == "bytes" else Tokenizer(spec)
