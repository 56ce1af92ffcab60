"""Prompt records for online RL (`objective: grpo`, train/rl.py): TRL's prompt format, one batch of
prompts per step, in an order a checkpoint resumes exactly.

    {"prompt": "text"}                                   a text prompt: the user's turn
    {"prompt": [{"role": ..., "content": ...}, ...]}     a conversation to continue
    any other fields                                     columns, handed to the reward functions

A prompt is rendered as `rejection-sample` renders it (serve/rejection.py): in Llama 3's chat format
(chat.render_messages) ending in an open assistant header, a text prompt as one user turn; with a
tokenizer that has no chat format a text prompt is BOS + text. The reward functions get the prompt as
the record has it (TRL's convention).

The order is grain's: the train split's documents shuffled with `seed` (reshuffled each epoch with
seed + epoch) and repeated for ever; prompt k of the run is element k of that sequence, whatever the
batch size or the process count, so `k` is also the prompt's index for its rollout streams
(serve/rollout.row_stream). The state is the number of elements consumed (and a fingerprint of the
pipeline), JSON in the checkpoint: a resume takes exactly the batches an uninterrupted run takes.

What can go wrong, and what catches it:
  * a bad line (invalid JSON, no prompt, a prompt neither text nor messages): `FILE:LINE: skipped: why`
    when listed (sources.list_documents), counted;
  * a prompt too long to leave room for max_completion_length in a row: `FILE:LINE: skipped: why` when
    read (once per process), counted, and the next prompt takes its place, so a step always has
    batch_size prompts; a data set with no usable prompt at all stops the run in one line rather than
    spinning;
  * a state from another pipeline (another data set, seed or batch size): refused in one line naming
    what differs (iterator.mismatch's wording), as the packed pipelines do;
  * prepared (ArrayRecord) data: refused in one line; prompts are read raw (they are short).
"""

from __future__ import annotations

from typing import Any

import grain

from .chat import render_messages
from .sources import DataConfig, Document, read_record, skip_record, split_documents
from . import prepared
from .iterator import uses_prepared


def render_prompt(tok, prompt) -> list[int]:
    """A TRL prompt (text or messages, checked by chat.prompt_problem) -> the ids the policy continues."""
    if isinstance(prompt, str) and hasattr(tok, "encode_header"):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, str):
        return tok.encode(prompt, bos=True, eos=False)
    if not hasattr(tok, "encode_header"):
        raise ValueError(f"a messages prompt needs Llama 3's chat format, which this tokenizer "
                         f"({type(tok).__name__}) does not have")
    return render_messages(tok, prompt)[0] + tok.encode_header("assistant")


class PromptIterator:
    """Yields lists of `batch_size` prompts: {"prompt" (as the record has it), "columns" (its other
    fields), "ids" (rendered), "where" (FILE:LINE), "index" (its place in the run's order)}."""

    def __init__(self, cfg: DataConfig, documents: list[Document], *, tokenizer, batch_size: int, seed: int,
                 max_prompt_len: int):
        if uses_prepared(cfg):
            raise ValueError(f"data.path {cfg.path}: objective grpo reads JSONL/Parquet prompt records, "
                             f"not prepared data")
        self.docs = split_documents(documents, "train", cfg.eval_fraction)
        if not self.docs:
            raise ValueError(f"no train prompts in data path {cfg.path} (eval_fraction={cfg.eval_fraction})")
        ds = grain.MapDataset.source(self.docs)
        self._ds = (ds.shuffle(seed) if cfg.shuffle else ds).repeat(None)
        self.tok, self.batch_size, self.max_prompt_len = tokenizer, batch_size, max_prompt_len
        self.position = 0
        self._too_long: set[int] = set()
        self._fingerprint = {"documents": prepared.documents_fingerprint(self.docs), "seed": seed,
                             "shuffle": cfg.shuffle, "rows": batch_size, "kind": "prompt",
                             "max_prompt_len": max_prompt_len}

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        out = []
        while len(out) < self.batch_size:
            if len(self._too_long) >= len(self.docs):
                raise ValueError(f"no prompt of {self.docs[0].path} fits: each leaves no room for the completion "
                                 f"(its rendered ids must be at most {self.max_prompt_len} tokens)")
            k, self.position = self.position, self.position + 1
            item = self._read(k)
            if item is not None:
                out.append(item)
        return out

    def _read(self, k: int) -> dict[str, Any] | None:
        doc = self._ds[k]
        where = f"{doc.path}:{doc.line}"
        record = read_record(doc)
        ids = render_prompt(self.tok, record["prompt"])
        if len(ids) > self.max_prompt_len:
            self._too_long.add(doc.offset)
            skip_record(where, f"prompt of {len(ids)} tokens leaves no room for grpo.max_completion_length "
                               f"(at most {self.max_prompt_len} prompt tokens fit seq_len)")
            return None
        return {"prompt": record["prompt"], "columns": {c: v for c, v in record.items() if c != "prompt"},
                "ids": ids, "where": where, "index": k}

    def get_state(self) -> dict[str, Any]:
        return {"fingerprint": dict(self._fingerprint), "position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("fingerprint", {})
        differ = [k for k in self._fingerprint if saved.get(k) != self._fingerprint[k]]
        if differ:
            k = differ[0]
            raise ValueError(f"data iterator state is for another pipeline: its {k} was {saved.get(k)!r}, now "
                             f"{self._fingerprint[k]!r}; use a new workdir, or set it back")
        self.position = int(state["position"])

    truncated = 0  # the run summary's count of cut records: a prompt is never cut

    def close(self) -> None:
        pass
