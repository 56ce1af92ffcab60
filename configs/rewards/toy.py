"""The toy task's reward for configs/grpo.yaml: verifiable, dense, and learnable by a tiny random-init
model in under a hundred steps. TRL's reward-function signature: (prompts, completions, completion_ids,
**columns) -> one float (or None) per completion.

`letter_fraction`: the share of the completion's characters that are the record's `letter` column (a
prompt without one: "a"); an empty completion scores 0. A completion is text for a text prompt and
[{"role": "assistant", "content": text}] for a messages prompt (TRL's conversational format).
"""


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def letter_fraction(prompts, completions, completion_ids=None, letter=None, **columns):
    letters = letter or ["a"] * len(completions)
    out = []
    for c, want in zip(completions, letters):
        text = _text(c)
        out.append(sum(ch == want for ch in text) / len(text) if text else 0.0)
    return out
