"""Pretraining documents -> tokens: BOS text EOS, read in grain's reader threads (or workers)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .sources import Document, read_record

_REPORTED_NOT_TEXT: set[str] = set()


def read_text(doc: Document, text_field: str) -> str | None:
    if doc.offset < 0:
        try:
            return Path(doc.path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # not text: dropped the same way on every run, reported once
            if doc.path not in _REPORTED_NOT_TEXT:
                _REPORTED_NOT_TEXT.add(doc.path)
                print(f"data: {doc.path}: not UTF-8 text, skipped", file=sys.stderr, flush=True)
            return None
    return read_record(doc)[text_field]


class TokenizerHolder:
    """Pickles a tokenizer by its file: grain worker processes rebuild it rather than unpickling it."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getstate__(self):
        tok = self._tokenizer
        tok = ("path", str(tok.model_path)) if isinstance(tok, Tokenizer) else ("obj", tok)
        return {**self.__dict__, "_tokenizer": tok}

    def __setstate__(self, state):
        kind, tok = state.pop("_tokenizer")
        self.__dict__.update(state)
        self._tokenizer = Tokenizer(tok) if kind == "path" else tok


class ReadAndTokenize(TokenizerHolder):
    """Document -> ``{"tokens": int32[n]}`` = BOS, text, EOS (None if unreadable)."""

    def __init__(self, tokenizer, text_field: str):
        super().__init__(tokenizer)
        self._text_field = text_field

    def __call__(self, doc: Document) -> dict[str, np.ndarray] | None:
        text = read_text(doc, self._text_field)
        if text is None:
            return None
        return {"tokens": np.asarray(self._tokenizer.encode(text, bos=True, eos=True), np.int32)}
