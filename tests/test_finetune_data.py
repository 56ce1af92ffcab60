"""Fine-tuning data (data/chat.py, data/packing.py): the SFT loss mask token by token against the
project's chat renderer, alone and packed; DPO pairs stay whole in one row; JSONL == Parquet; bad
records reported with their line and skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama3_jax.data import DataConfig, make_iterator
from llama3_jax.tokenizer import Tokenizer

DIALOG = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12, since 4 * 3 = 12."},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def dialogs(n):
    """Variants of DIALOG with different lengths (so packing mixes them)."""
    out = []
    for i in range(n):
        d = [dict(m) for m in DIALOG]
        d[1]["content"] += " " + "please " * i
        d[4]["content"] += f" ({i})"
        out.append(d)
    return out


def write_jsonl(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra_lines))
    return path


def expected_labels(tok, messages):
    """Indices into the rendered ids that the loss must cover: each assistant message's span (from the
    project's encode_message) minus its header (encode_header)."""
    ids, labels = [tok.bos_id], set()
    for m in messages:
        piece = tok.encode_message(m)
        if m["role"] == "assistant":
            labels.update(range(len(ids) + len(tok.encode_header("assistant")), len(ids) + len(piece)))
        ids += piece
    return ids, labels


def check_segments(batch, tok, records):
    """Every segment of every row is one whole dialog; its loss mask covers exactly the assistant
    content + <|eot_id|> targets. Returns how many segments were checked."""
    by_ids = {tuple(expected_labels(tok, r["messages"])[0]): r["messages"] for r in records}
    seen = 0
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            tokens, targets, mask = (batch[k][r, idx] for k in ("tokens", "targets", "loss_mask"))
            assert np.array_equal(batch["positions"][r, idx], np.arange(len(idx)))
            ids = [*tokens.tolist(), int(targets[-1])]
            assert ids == tok.encode_dialog(by_ids[tuple(ids)], add_generation_prompt=False)
            _, labels = expected_labels(tok, by_ids[tuple(ids)])
            got = {i + 1 for i in np.flatnonzero(mask)}  # target i is rendered id i + 1
            assert got == labels, (sorted(got), sorted(labels))
            trained = tok.decode([ids[i] for i in sorted(labels)])
            assert trained == "4.<|eot_id|>12, since 4 * 3 = 12." + trained.split("12, since 4 * 3 = 12.")[1]
            assert trained.endswith("<|eot_id|>") and trained.count("<|eot_id|>") == 2
            assert "<|start_header_id|>" not in trained and "What is" not in trained and "one line" not in trained
            seen += 1
    return seen


def test_sft_mask_is_exactly_assistant_content_and_eot(tmp_path, tok):
    records = [{"messages": DIALOG}]
    path = write_jsonl(tmp_path / "one.jsonl", records)
    with make_iterator(DataConfig(path=str(path), eval_fraction=0.0, prefetch=0), tokenizer=tok, seq_len=96,
                       batch_size=1, seed=0, num_epochs=1, kind="sft") as it:
        batch = next(it)
    assert check_segments(batch, tok, records) == 1


def test_sft_mask_after_packing_several_dialogs(tmp_path, tok):
    records = [{"messages": d} for d in dialogs(7)]
    path = write_jsonl(tmp_path / "many.jsonl", records)
    with make_iterator(DataConfig(path=str(path), eval_fraction=0.0, prefetch=0), tokenizer=tok, seq_len=160,
                       batch_size=2, seed=0, num_epochs=1, kind="sft") as it:
        batches = list(it)
    assert max(len(np.unique(s[s > 0])) for b in batches for s in b["segment_ids"]) >= 2  # really packed
    assert sum(check_segments(b, tok, records) for b in batches) == 7  # each dialog once, whole


def test_parquet_gives_the_jsonl_batches(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    records = [{"messages": d} for d in dialogs(5)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")  # what datasets.to_parquet writes
    write_jsonl(tmp_path / "d.jsonl", records)
    got = {}
    for suffix in ("jsonl", "parquet"):
        cfg = DataConfig(path=str(tmp_path / f"d.{suffix}"), eval_fraction=0.0, prefetch=0)
        with make_iterator(cfg, tokenizer=tok, seq_len=128, batch_size=2, seed=1, num_epochs=1, kind="sft") as it:
            got[suffix] = list(it)
    assert len(got["jsonl"]) == len(got["parquet"]) > 0
    for a, b in zip(got["jsonl"], got["parquet"]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_prompt_completion_trains_the_completion_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: sky colour?", "completion": " A: blue."}])
    with make_iterator(DataConfig(path=str(path), eval_fraction=0.0, prefetch=0), tokenizer=tok, seq_len=32,
                       batch_size=1, seed=0, num_epochs=1, kind="sft") as it:
        b = next(it)
    trained = b["targets"][0][b["loss_mask"][0] == 1]
    assert trained.tolist() == tok.encode(" A: blue.", bos=False, eos=True)


def test_dpo_pairs_stay_whole_in_one_row(tmp_path, tok):
    records = [{"prompt": [{"role": "user", "content": f"Pick {i}"}],
                "chosen": [{"role": "assistant", "content": "good " * (i + 1)}],
                "rejected": [{"role": "assistant", "content": "bad"}]} for i in range(6)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with make_iterator(DataConfig(path=str(path), eval_fraction=0.0, prefetch=0), tokenizer=tok, seq_len=64,
                       batch_size=2, seed=0, num_epochs=1, kind="dpo") as it:
        batches = list(it)
    pairs = 0
    for b in batches:
        for r, seg in enumerate(b["segment_ids"]):
            n = seg.max()
            assert n % 2 == 0  # chosen 2p - 1 and rejected 2p always together
            for p in range(1, n // 2 + 1):
                c, j = (b["targets"][r][(seg == s) & (b["loss_mask"][r] == 1)] for s in (2 * p - 1, 2 * p))
                assert tok.decode(j) == "bad<|eot_id|>" and tok.decode(c).startswith("good")
                pairs += 1
    assert pairs == 6


def test_bad_records_reported_with_line_and_skipped(tmp_path, tok, capsys):
    good = {"messages": DIALOG}
    bad = [
        '{"messages": [{"role": "user", "content": "hi"}]}',                     # 2: no assistant turn
        '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',  # 3: role
        '{"prompt": "only a prompt"}',                                          # 4: missing field
        '{"messages": [{"role": "user"}]}',                                     # 5: message without content
        '{not json',                                                            # 6
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + "\n".join(bad) + "\n" + json.dumps(good) + "\n")
    cfg = DataConfig(path=str(path), eval_fraction=0.0, prefetch=0)
    for _ in range(2):  # built twice: still reported once
        with make_iterator(cfg, tokenizer=tok, seq_len=96, batch_size=2, seed=0, num_epochs=1, kind="sft") as it:
            batch = next(it)
        assert check_segments(batch, tok, [good]) == 2
    err = capsys.readouterr().err
    for line, why in [(2, "no assistant turn"), (3, "unknown role 'robot'"), (4, "missing field"),
                      (5, "must have 'role' and 'content'"), (6, "invalid JSON")]:
        assert err.count(f"{path}:{line}: skipped: ") == 1 and why in err, err
    assert f"{path}:1:" not in err and f"{path}:7:" not in err


def test_long_dialog_truncated_and_counted_once(tmp_path, tok, capsys):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": long}] * 3 + [{"messages": DIALOG}])
    with make_iterator(DataConfig(path=str(path), eval_fraction=0.0, prefetch=0, shuffle=False), tokenizer=tok,
                       seq_len=64, batch_size=1, seed=0, num_epochs=1, kind="sft") as it:
        rows = list(it)
        assert it.truncated == 3
    assert all(r["segment_ids"].max() >= 1 for r in rows)
    err = capsys.readouterr().err
    # once, naming one of the three long records (reader threads render records concurrently)
    assert err.count("truncated:") == 1 and any(f"{path}:{line}: truncated: " in err for line in (1, 2, 3)), err
