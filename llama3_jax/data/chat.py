"""Fine-tuning records (TRL's dataset formats) -> token ids + which targets the loss counts.

SFT records (``objective: sft``):
    {"messages": [{"role", "content"}, ...]}                       conversational
    {"prompt": [messages], "completion": [messages]}               conversational prompt-completion
    {"prompt": str, "completion": str}                             plain prompt-completion
DPO and reward-model records (``objective: dpo`` / ``reward``), explicit or implicit prompt:
    {"prompt": [messages] | str, "chosen": [messages] | str, "rejected": [messages] | str}
    {"chosen": [messages] | str, "rejected": [messages] | str}     whole conversations (texts)
    reward only: an optional per-pair "margin" (a number; 0 when absent or null)
An implicit prompt is what TRL's ``extract_prompt`` (trl/data_utils.py) takes: the longest common
prefix of the two sides, of messages or of characters (`extract_prompt`). DPO needs it (the loss is
over the completions); a reward model scores each whole side and needs no split.

Conversations are rendered with the Llama 3 chat format of the tokenizer (tokenizer.py: BOS, then per
message ``<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>``). The loss covers exactly
the content tokens of the assistant turns and their closing ``<|eot_id|>`` (for prompt-completion: of
the completion only; plain text: the completion's tokens and EOS) -- never a header, never a system,
user or ipython turn.

An example is the model's view of one record, already shifted: ``tokens = ids[:-1]``,
``targets = ids[1:]``, ``loss_mask[i] = 1`` when ``targets[i]`` is a trained token. Shifting per
record (not per packed row as pretraining does) keeps a record whole inside one row. A record longer
than ``seq_len`` (a DPO pair: either side longer than ``seq_len // 2``) is cut to fit, and counted.

A reward-model example is NOT shifted: ``tokens`` is the whole side, so the last input of its segment
is the side's closing ``<|eot_id|>`` (chat) or EOS (text), where train.objectives.pair_last_positions
reads the reward; ``loss_mask`` is 1 on every token of the side, ``targets`` the next token (0 after the
last; the reward loss reads neither), ``margin`` (float32) the pair's margin on every token of both sides.

What can go wrong, and what catches it:
  * counting a long record at every read: a record is read again every epoch, and reader threads read
    ahead of the step. So the count is not kept here: an example carries ``cut`` (1 on its first token
    when the record was cut in its first epoch, else 0), packing sums it into the batch, and the
    iterator adds a batch's count when the step takes the batch and keeps the total in its checkpointed
    state (iterator.py): N long records are N, whatever the epochs, the read-ahead or the resumes.
  * a DPO pair whose chosen and rejected sides render alike (the same string, or messages with the
    same roles and contents: all the renderer reads) has nothing to prefer and a zero gradient; it is
    skipped when listed, ``FILE:LINE: skipped: why``, and counted with the other skipped lines. So is a
    reward record whose margin is not a finite number (it would make the loss NaN).
  * a reward pair with a side longer than ``seq_len // 2`` tokens (its eot included): cutting it would
    read the reward at a token that does not end the side, so the pair is skipped when read (as TRL
    drops over-long pairs), ``FILE:LINE: skipped: why``, and counted with the skipped lines
    (sources.skip_record: each record once per process, whatever the epochs and re-reads).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .sources import Document, read_record, report, skip_record
from .text import TokenizerHolder

ROLES = frozenset({"system", "user", "assistant", "ipython", "tool"})
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # a margin the batch's float32 holds


# ------------------------------------------------------------------------------ validation
def _messages_problem(messages, where: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{where!r} must be a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{where}[{i}] must have 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"{where}[{i}]: unknown role {m['role']!r} (expected one of {', '.join(sorted(ROLES))})"
        if not isinstance(m["content"], str):
            return f"{where}[{i}]['content'] must be a string"
    return None


def _has_assistant(messages) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def sft_problem(record) -> str | None:
    """Why an SFT record cannot be used, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "messages" in record:
        why = _messages_problem(record["messages"], "messages")
        if why:
            return why
        return None if _has_assistant(record["messages"]) else "no assistant turn"
    if "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return None
        why = _messages_problem(p, "prompt") or _messages_problem(c, "completion")
        if why:
            return why
        return None if _has_assistant(c) else "no assistant turn in 'completion'"
    return "missing field: need 'messages', or 'prompt' and 'completion'"


def _preference_problem(record) -> str | None:
    """Why a preference record (explicit or implicit prompt) is not well formed, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        return f"missing field {missing[0]!r}"
    p, sides = record.get("prompt"), (record["chosen"], record["rejected"])
    if isinstance(p, str) or (p is None and any(isinstance(x, str) for x in sides)):
        if not all(isinstance(x, str) for x in sides):
            return (f"with a string 'prompt', 'chosen' and 'rejected' must be strings" if p is not None else
                    "'chosen' and 'rejected' must both be strings or both lists of messages")
    else:
        why = None if p is None else _messages_problem(p, "prompt")
        for k in ("chosen", "rejected"):
            why = why or _messages_problem(record[k], k) or (
                None if _has_assistant(record[k]) else f"no assistant turn in {k!r}")
        if why:
            return why
    if _rendered(record["chosen"]) == _rendered(record["rejected"]):
        return "'chosen' equals 'rejected' (nothing to prefer)"
    return None


def dpo_problem(record) -> str | None:
    """Why a DPO record cannot be used, or None. An implicit prompt must leave each side an assistant
    turn (a text: anything) after it, and messages must share a first one (TRL's prompt is not empty)."""
    why = _preference_problem(record)
    if why or record.get("prompt") is not None:
        return why
    split = with_prompt(record)
    if isinstance(split["chosen"], str):
        return None
    if not split["prompt"]:
        return "implicit prompt: 'chosen' and 'rejected' differ from their first message (no shared prompt)"
    for k in ("chosen", "rejected"):
        if not _has_assistant(split[k]):
            return f"implicit prompt: no assistant turn in {k!r} after the shared messages"
    return None


def reward_problem(record) -> str | None:
    """Why a reward-model record cannot be used, or None: a preference record, and a margin that is a
    finite float32 number when given."""
    why = _preference_problem(record)
    if why:
        return why
    m = record.get("margin")
    if m is None:
        return None
    number = isinstance(m, (int, float)) and not isinstance(m, bool)
    if not number or (isinstance(m, float) and not math.isfinite(m)) or abs(m) > _FLOAT32_MAX:
        return f"'margin' must be a finite number, got {m!r}"[:200]
    return None


def prompt_problem(record) -> str | None:
    """Why a TRL prompt record ({"prompt": text | [messages], ...}: objective grpo, data/prompts.py) cannot
    be used, or None. Its other fields are columns for the reward functions."""
    if not isinstance(record, dict):
        return "expected a JSON object"
    if "prompt" not in record:
        return "missing 'prompt' (a text or a list of messages)"
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return None if prompt else "'prompt' is empty"
    if isinstance(prompt, list):
        return _messages_problem(prompt, "prompt")
    return f"'prompt' must be a text or a list of messages, got {type(prompt).__name__}"


# pipeline kind -> the check that listing applies to its JSONL/Parquet records (None: text, sources.text_check)
RECORD_CHECKS = {"text": None, "sft": sft_problem, "dpo": dpo_problem, "reward": reward_problem,
                 "prompt": prompt_problem}


def margin_of(record) -> float:
    """A reward record's margin (0 when absent or null)."""
    m = record.get("margin") if isinstance(record, dict) else None
    return 0.0 if m is None else float(m)


def extract_prompt(chosen, rejected):
    """TRL's `extract_prompt` (trl/data_utils.py) of an implicit-prompt pair -> (prompt, chosen,
    rejected): the prompt is the two sides' common prefix (of messages, or of characters), up to the
    first element where they differ, less a space just before it (which stays with the completions).
    When the shorter side is a prefix of the other, its last element stays out of the prompt (TRL's
    loop index ends there). One corner differs: sides that differ at their first element get an empty
    prompt (TRL then looks at index -1, the side's LAST character)."""
    n = min(len(chosen), len(rejected))
    idx = max(n - 1, 0)
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def with_prompt(record) -> dict:
    """The preference record with an explicit prompt (an implicit one extracted: `extract_prompt`)."""
    if record.get("prompt") is not None:
        return record
    prompt, chosen, rejected = extract_prompt(record["chosen"], record["rejected"])
    return {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _rendered(side):
    """What the renderer reads of one side (render_completion): the string, or each message's role and
    content (other fields of a message are not rendered)."""
    return side if isinstance(side, str) else [(m["role"], m["content"]) for m in side]


# ------------------------------------------------------------------------------- rendering
def render_messages(tok, messages, trained_from: int = 0) -> tuple[list[int], list[int]]:
    """(ids, label mask) of a dialog in the Llama 3 chat format (no open assistant header at the end).

    The ids equal ``tok.encode_dialog(messages, add_generation_prompt=False)``; the mask is 1 on the
    content and ``<|eot_id|>`` of each assistant message at index >= ``trained_from``.
    """
    ids, mask = [tok.bos_id], [0]
    for i, m in enumerate(messages):
        header = tok.encode_header(m["role"])
        content = tok.encode(m["content"], bos=False, eos=False)
        on = int(m["role"] == "assistant" and i >= trained_from)
        ids += [*header, *content, tok.eot_id]
        mask += [0] * len(header) + [on] * (len(content) + 1)
    return ids, mask


def render_completion(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """(ids, label mask) of a prompt and its completion: chat messages or plain strings."""
    if isinstance(prompt, str):
        p = tok.encode(prompt, bos=True, eos=False)
        c = tok.encode(completion, bos=False, eos=True)
        return p + c, [0] * len(p) + [1] * len(c)
    return render_messages(tok, list(prompt) + list(completion), trained_from=len(prompt))


def render_sft(tok, record) -> tuple[list[int], list[int]]:
    if "messages" in record:
        return render_messages(tok, record["messages"])
    return render_completion(tok, record["prompt"], record["completion"])


def example(ids, mask, max_len: int) -> dict[str, np.ndarray]:
    """Shifted, cut to at most ``max_len`` inputs."""
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    n = len(ids) - 1
    return {"tokens": np.asarray(ids[:-1], np.int32), "targets": np.asarray(ids[1:], np.int32),
            "loss_mask": np.asarray(mask[1:], np.int32), "positions": np.arange(n, dtype=np.int32)}


def unshifted_example(ids, mask) -> dict[str, np.ndarray]:
    """A reward model's view of one side: tokens = the whole side (its last input is its eot / EOS),
    targets = the next token (0 after the last), loss_mask = `mask` (1 on every token)."""
    ids = np.asarray(ids, np.int32)
    return {"tokens": ids, "targets": np.r_[ids[1:], np.int32(0)].astype(np.int32),
            "loss_mask": np.asarray(mask, np.int32), "positions": np.arange(len(ids), dtype=np.int32)}


class RenderRecords(TokenizerHolder):
    """Document -> an example ready for packing (SFT), or a pair of examples in one (DPO, reward): the
    chosen then the rejected sequence, ``half`` 1 / 2, positions restarting at the rejected one; a
    reward pair with a side over ``seq_len // 2`` tokens -> None (skipped, grain drops it).
    Every example has ``cut``: 1 on its first token when this read cut the record and is the record's
    first (element index < ``per_epoch``, the records of one epoch; None: every read is a first), else 0."""

    def __init__(self, tokenizer, kind: str, seq_len: int, reference: dict | None = None,
                 index: dict | None = None, per_epoch: int | None = None):
        super().__init__(tokenizer)
        self.kind, self.seq_len, self.per_epoch = kind, seq_len, per_epoch
        self.reference, self.index = reference, index  # DPO precomputed reference: see add_reference
        self._reported = False
        self._too_long: set[str] = set()  # reward pairs skipped: when it is every record, nothing is left
        self._lock = threading.Lock()  # grain's reader threads render records concurrently

    def __getstate__(self):  # a lock does not pickle: worker processes get their own
        state = super().__getstate__()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def _cut(self, n: int, limit: int, where: str) -> bool:
        if n <= limit:
            return False
        with self._lock:
            first, self._reported = not self._reported, True
        if first:  # reported once (the first record a reader thread cut); the summary gives the count
            report(f"{where}: truncated: {n} tokens > {limit} (this and every longer record is "
                   f"cut to fit seq_len and counted; the count is in the run summary)")
        return True

    def indexed(self, i: int, doc: Document) -> dict[str, np.ndarray]:
        """`__call__` for grain's map_with_index: element `i` of the repeated records."""
        return self(doc, first_read=self.per_epoch is None or i < self.per_epoch)

    def __call__(self, doc: Document, first_read: bool = True) -> dict[str, np.ndarray] | None:
        record = read_record(doc)
        out = self.examples(render_sides(self._tokenizer, self.kind, record), f"{doc.path}:{doc.line}",
                            first_read, margin_of(record))
        if out is None:
            return None
        if self.index is not None:  # the pass that computes reference log-probs: which pair this is
            out["pair"] = np.full(len(out["tokens"]), self.index[doc.key], np.int32)
        if self.reference is not None:
            out["ref_logps"] = add_reference(out, *self.reference[doc.key])
        return out

    def examples(self, sides: list, where: str, first_read: bool = True,
                 margin: float = 0.0) -> dict[str, np.ndarray] | None:
        """A record's rendered sides (`render_sides`) -> its example (SFT) or pair of examples (DPO,
        reward), cut to fit seq_len (reward: None, skipped, when it does not fit); `where` names the
        record in the reports; `first_read`: whether a cut is counted (``cut``); `margin`: reward only."""
        if self.kind == "reward":
            return self._reward_pair(sides, where, margin)
        if self.kind == "sft":
            [(ids, mask)] = sides
            cut = self._cut(len(ids) - 1, self.seq_len, where)
            out = example(ids, mask, self.seq_len)
        else:
            half = self.seq_len // 2
            cut = any([self._cut(len(ids) - 1, half, where) for ids, _ in sides])  # a list: report either side
            chosen, rejected = (example(ids, mask, half) for ids, mask in sides)
            out = {k: np.concatenate([chosen[k], rejected[k]]) for k in chosen}
            out["half"] = np.repeat(np.int32([1, 2]), [len(chosen["tokens"]), len(rejected["tokens"])])
        out["cut"] = np.zeros(len(out["tokens"]), np.int32)
        out["cut"][:1] = int(cut and first_read)
        return out

    def _reward_pair(self, sides: list, where: str, margin: float) -> dict[str, np.ndarray] | None:
        """Both whole sides, unshifted, or None (reported and counted) when one is over seq_len // 2."""
        half = self.seq_len // 2
        over = [f"{k} has {len(ids)} tokens" for k, (ids, _) in zip(("chosen", "rejected"), sides) if len(ids) > half]
        if over:
            skip_record(where, f"{' and '.join(over)} > seq_len // 2 = {half} (a reward is read at a side's "
                               f"last token, so over-long pairs are dropped, not cut)")
            with self._lock:
                self._too_long.add(where)
                every = self.per_epoch is not None and len(self._too_long) >= self.per_epoch
            if every:  # else an endless (repeated) split would spin without a batch
                raise ValueError(f"{where}: no reward pair fits seq_len {self.seq_len}: every side must be at "
                                 f"most seq_len // 2 = {half} tokens (raise seq_len)")
            return None
        chosen, rejected = (unshifted_example(ids, mask) for ids, mask in sides)
        out = {k: np.concatenate([chosen[k], rejected[k]]) for k in chosen}
        n = len(out["tokens"])
        out["half"] = np.repeat(np.int32([1, 2]), [len(chosen["tokens"]), len(rejected["tokens"])])
        out["margin"] = np.full(n, margin, np.float32)
        out["cut"] = np.zeros(n, np.int32)
        return out


def render_reward_side(tok, record, side: str) -> tuple[list[int], list[int]]:
    """One whole side of a reward record: the prompt and the side (explicit prompt), or the side alone
    (implicit: a whole conversation, or a text given BOS and EOS); mask 1 on every token."""
    prompt = record.get("prompt")
    if prompt is not None:
        ids, _ = render_completion(tok, prompt, record[side])
    elif isinstance(record[side], str):
        ids = tok.encode(record[side], bos=True, eos=True)
    else:
        ids, _ = render_messages(tok, record[side])
    return ids, [1] * len(ids)


def render_sides(tok, kind: str, record) -> list[tuple[list[int], list[int]]]:
    """A record's (ids, label mask), uncut: [the dialog] (SFT) or [chosen, rejected] (DPO: an implicit
    prompt extracted; reward: whole sides, `render_reward_side`)."""
    if kind == "sft":
        return [render_sft(tok, record)]
    if kind == "reward":
        return [render_reward_side(tok, record, k) for k in ("chosen", "rejected")]
    record = with_prompt(record)
    return [render_completion(tok, record["prompt"], record[k]) for k in ("chosen", "rejected")]


def add_reference(pair: dict[str, np.ndarray], chosen: float, rejected: float) -> np.ndarray:
    """A float feature whose masked sum per side is the precomputed reference log-prob of that side:
    each sum sits on the side's first trained token (objectives.pair_logps sums masked tokens)."""
    ref = np.zeros(len(pair["tokens"]), np.float32)
    for half, value in ((1, chosen), (2, rejected)):
        trained = np.flatnonzero((pair["half"] == half) & (pair["loss_mask"] == 1))
        if trained.size:
            ref[trained[0]] = value
    return ref
