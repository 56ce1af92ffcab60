"""Reward-model data (data/chat.py kind `reward`, packing.py, prepared.py): TRL's preference records with
an explicit or implicit prompt, messages or strings, become pairs of WHOLE sides (the last input of
each segment is the side's <|eot_id|> / EOS, where train.objectives.pair_last_positions reads the
reward) with the pair's margin on its positions; JSONL == Parquet == prepared shards bit for bit;
over-long pairs, bad margins and equal sides skipped and counted. DPO reads implicit-prompt records as
TRL's extract_prompt splits them (its documented example, and the explicit record's batches)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.data import DataConfig, make_iterator, skipped_line_count
from llama3_jax.data.chat import dpo_problem, with_prompt
from llama3_jax.tokenizer import Tokenizer
from llama3_jax.train.objectives import pair_last_positions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import prepare_data  # noqa: E402

USER = {"role": "user", "content": "What color is the sky?"}
BLUE, GREEN = ({"role": "assistant", "content": f"It is {c}."} for c in ("blue", "green"))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def write_jsonl(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra_lines))
    return path


def message_records(n):
    """Explicit and implicit conversational pairs, every other one with a margin."""
    out = []
    for i in range(n):
        user = {"role": "user", "content": f"Question {i}: " + "why " * (i % 5)}
        good, bad = ({"role": "assistant", "content": f"{w} answer {i}" + " more" * (i % 3)} for w in ("good", "bad"))
        rec = {"prompt": [user], "chosen": [good], "rejected": [bad]} if i % 2 else \
            {"chosen": [user, good], "rejected": [user, bad]}
        if i % 3:
            rec["margin"] = 0.25 * i - 1.0
        out.append(rec)
    return out


def expected_side(tok, record, side):
    """The side's whole token ids, from the tokenizer's own chat format (tokenizer.encode_dialog) or
    encode, not from data/chat.py's renderer."""
    prompt, whole = record.get("prompt"), record[side]
    if isinstance(whole, str):
        return tok.encode(whole, bos=True, eos=True) if prompt is None else \
            tok.encode(prompt, bos=True, eos=False) + tok.encode(whole, bos=False, eos=True)
    return tok.encode_dialog((prompt or []) + whole, add_generation_prompt=False)


def batches(path, tok, **kw):
    cfg = DataConfig(path=str(path), eval_fraction=kw.pop("eval_fraction", 0.0), prefetch=0,
                     shuffle=kw.pop("shuffle", False))
    args = dict(tokenizer=tok, seq_len=128, batch_size=2, seed=0, num_epochs=1, kind="reward") | kw
    with make_iterator(cfg, **args) as it:
        return list(it)


def check_pairs(got, tok, records):
    """Every pair of every row is one record's two whole sides, each ending in its eot / EOS at the
    position pair_last_positions picks, with the record's margin on both sides and 0 elsewhere; every
    record is there once. Returns how many pairs were checked."""
    want = {(tuple(expected_side(tok, r, "chosen")), tuple(expected_side(tok, r, "rejected"))): r for r in records}
    seen = []
    for b in got:
        assert b["margin"].dtype == np.float32 and b["margin"].shape == b["tokens"].shape
        chosen, rejected, valid = (np.asarray(x) for x in pair_last_positions({"segment_ids": jnp.asarray(
            b["segment_ids"])}))
        for r, seg in enumerate(b["segment_ids"]):
            assert seg.max() % 2 == 0
            assert np.all(b["margin"][r][seg == 0] == 0)
            for p in range(1, seg.max() // 2 + 1):
                c, j = (np.flatnonzero(seg == s) for s in (2 * p - 1, 2 * p))
                ids = tuple(b["tokens"][r, c].tolist()), tuple(b["tokens"][r, j].tolist())
                record = want[ids]
                end = tok.eos_id if isinstance(record["chosen"], str) else tok.eot_id
                assert valid[r, p - 1] and (chosen[r, p - 1], rejected[r, p - 1]) == (c[-1], j[-1])
                assert b["tokens"][r, c[-1]] == end and b["tokens"][r, j[-1]] == end
                for idx in (c, j):
                    assert np.array_equal(b["positions"][r, idx], np.arange(len(idx)))
                    assert np.all(b["loss_mask"][r, idx] == 1)
                    assert np.all(b["margin"][r, idx] == np.float32(record.get("margin") or 0.0))
                seen.append(ids)
    assert sorted(seen) == sorted(want)  # each record once
    return len(seen)


def test_messages_explicit_and_implicit_become_whole_sides_with_margins(tmp_path, tok):
    records = message_records(9)
    got = batches(write_jsonl(tmp_path / "pairs.jsonl", records), tok)
    assert check_pairs(got, tok, records) == 9
    # an explicit record and its implicit form give the same pair: the reward scores the whole side
    assert expected_side(tok, records[1], "chosen") == expected_side(tok, {"chosen": [records[1]["prompt"][0],
                                                                                       records[1]["chosen"][0]]},
                                                                      "chosen")


def test_strings_explicit_and_implicit_end_in_eos(tmp_path, tok):
    records = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 2},
               {"chosen": "The sea is blue.", "rejected": "The sea is green."},
               {"chosen": "Grass is green.", "rejected": "Grass is red.", "margin": None}]
    got = batches(write_jsonl(tmp_path / "text.jsonl", records), tok)
    assert check_pairs(got, tok, records) == 3


def test_parquet_gives_the_jsonl_batches(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    records = message_records(7)
    # one Parquet schema: explicit rows have a prompt column, implicit rows a null one; no margin -> null
    rows = [{"prompt": r.get("prompt"), "chosen": r["chosen"], "rejected": r["rejected"],
             "margin": r.get("margin")} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")  # what datasets.to_parquet writes
    want = batches(write_jsonl(tmp_path / "pairs.jsonl", records), tok)
    got = batches(tmp_path / "pairs.parquet", tok)
    assert len(want) == len(got) > 0
    for a, b in zip(want, got):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    check_pairs(got, tok, records)


def test_over_long_pair_skipped_bad_margin_skipped_and_counted(tmp_path, tok, capsys):
    records = message_records(4)
    longest = [max(len(expected_side(tok, r, s)) for s in ("chosen", "rejected")) for r in records]
    seq_len = 2 * max(longest)
    over = {"chosen": [USER, BLUE], "rejected": [USER, {"role": "assistant", "content": "green " * seq_len}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", records + [over], extra_lines=[
        json.dumps({"chosen": [USER, BLUE], "rejected": [USER, GREEN], "margin": "big"}),
        json.dumps({"chosen": [USER, BLUE], "rejected": [USER, GREEN], "margin": float("inf")}),
        json.dumps({"chosen": [USER, BLUE], "rejected": [USER, BLUE]}),
        json.dumps({"chosen": [USER, BLUE]}),
    ])
    before = skipped_line_count()
    got = batches(path, tok, seq_len=seq_len)  # the longest kept side is exactly seq_len // 2 tokens
    assert check_pairs(got, tok, records) == 4
    err = capsys.readouterr().err
    assert f"{path}:5: skipped: rejected has {len(expected_side(tok, over, 'rejected'))} tokens > seq_len // 2 = " \
           f"{seq_len // 2}" in err
    for line, why in [(6, "'margin' must be a finite number, got 'big'"), (7, "'margin' must be a finite number"),
                      (8, "'chosen' equals 'rejected'"), (9, "missing field 'rejected'")]:
        assert f"{path}:{line}: skipped: {why}" in err, err
    assert skipped_line_count() - before == 5
    batches(path, tok, seq_len=seq_len, num_epochs=3)  # read again, three epochs: still counted once
    assert skipped_line_count() - before == 5
    # a side limit one token shorter: the longest pairs no longer fit, and are skipped; the rest kept
    kept = [r for r, n in zip(records, longest) if n < max(longest)]
    assert check_pairs(batches(path, tok, seq_len=seq_len - 2), tok, kept) == len(kept) > 0
    assert skipped_line_count() - before == 5 + len(records) - len(kept)
    # no pair fits: an endless train split says so instead of spinning without a batch
    with pytest.raises(ValueError, match=r"no reward pair fits seq_len 8: every side must be at most "
                                         r"seq_len // 2 = 4 tokens"):
        batches(path, tok, seq_len=8, num_epochs=None)


def test_prepared_records_give_the_jsonl_batches_bit_for_bit(tmp_path, tok):
    records = message_records(20) + [{"chosen": "The sky is blue.", "rejected": "The sky is green.", "margin": 1.5},
                                      {"chosen": [USER, BLUE], "rejected": [USER, {"role": "assistant",
                                                                                   "content": "no " * 200}]}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records, extra_lines=['{"chosen": "x", "rejected": "y", '
                                                                       '"margin": [1]}'])
    out = tmp_path / "prepared"
    assert prepare_data.main([str(path), str(out), "--objective", "reward", "--eval-fraction", "0.2",
                              "--shard-size", "2KB", "--quiet"]) == 0
    assert json.loads((out / "metadata.json").read_text())["kind"] == "reward"
    kw = dict(tokenizer=tok, seq_len=64, batch_size=2, seed=3, kind="reward")
    raw_cfg = DataConfig(path=str(path), eval_fraction=0.2, prefetch=0)
    prep_cfg = DataConfig(path=str(out), eval_fraction=0.2, prefetch=0)
    with make_iterator(raw_cfg, **kw) as raw, make_iterator(prep_cfg, **kw) as prep:
        want, got = [next(raw) for _ in range(14)], [next(prep) for _ in range(14)]  # past one epoch
        assert prep.get_state() == raw.get_state()
    assert any(np.any(b["margin"] != 0) for b in want)
    for a, b in zip(want, got, strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ev = dict(kw, split="eval", num_epochs=1)
    with make_iterator(raw_cfg, **ev) as raw, make_iterator(prep_cfg, **ev) as prep:
        want, got = list(raw), list(prep)
    assert len(want) == len(got) > 0
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(ValueError, match="prepared for objective reward, the run's objective is dpo"):
        make_iterator(prep_cfg, **dict(kw, kind="dpo"))


def test_dpo_implicit_prompt_is_trls_extract_prompt(tmp_path, tok, capsys):
    # TRL's documented examples (trl/data_utils.py maybe_extract_prompt; docs dataset_formats.md)
    record = {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}
    assert with_prompt(record) == {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}
    assert with_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."}) == \
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert dpo_problem(record) is None
    assert "no shared prompt" in dpo_problem({"chosen": [USER, BLUE], "rejected": [
        {"role": "user", "content": "Other?"}, GREEN]})
    assert "no assistant turn in 'chosen' after the shared messages" in dpo_problem(
        {"chosen": [BLUE, USER], "rejected": [BLUE, {"role": "user", "content": "x"}]})
    # DPO trains on the implicit record exactly as on its explicit form
    implicit = [record, {"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    explicit = [with_prompt(r) for r in implicit]
    a = batches(write_jsonl(tmp_path / "implicit.jsonl", implicit), tok, kind="dpo")
    b = batches(write_jsonl(tmp_path / "explicit.jsonl", explicit), tok, kind="dpo")
    assert len(a) == len(b) == 1
    for k in b[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
    seg, mask, targets = (a[0][k][0] for k in ("segment_ids", "loss_mask", "targets"))
    trained = {tok.decode(targets[(seg == s) & (mask == 1)].tolist()) for s in range(1, seg.max() + 1)}
    eos = tok.decode([tok.eos_id])
    assert trained == {"It is blue.<|eot_id|>", "It is green.<|eot_id|>", f" blue.{eos}", f" green.{eos}"}
