"""Prepared data (tools/prepare_data.py -> ArrayRecord shards): the same batches and iterator states as
the corpus it was made from, with no record read before it is needed; fine-tuning records (sft, dpo)
too. (Training from it gives the corpus's losses: tests/test_train.py, beside the reference run, and
tests/test_dpo.py for preference pairs.)"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from llama3_jax.data import BATCH_KEYS, DataConfig, list_documents, make_iterator, split_documents
from llama3_jax.data import iterator as data_iterator
from llama3_jax.data import prepared
from llama3_jax.tokenizer import ByteTokenizer, Tokenizer
from train_helpers import write_corpus

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import prepare_data  # noqa: E402

SEQ = 16


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL of 300 short documents, one bad line, and its prepared form (Llama 3 tokenizer)."""
    root = tmp_path_factory.mktemp("prepared")
    path = write_corpus(root / "corpus.jsonl", n_docs=300)
    with open(path, "a") as f:
        f.write('{"no_text": 1}\n')
    out = root / "prepared"
    assert prepare_data.main([str(path), str(out), "--eval-fraction", "0.1", "--shard-size", "1KB", "--quiet"]) == 0
    return path, out


class CountingSource:
    """The prepared split's real ArrayRecord source, counting the records grain asks it for."""

    def __init__(self, inner):
        self.inner, self.read = inner, []

    @property
    def reads(self):
        return len(self.read)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.inner[i]

    def __getitems__(self, keys):
        self.read.extend(int(i) for i in keys)
        return self.inner.__getitems__(keys) if keys else []


def _count_reads(monkeypatch) -> list[CountingSource]:
    """Every prepared source opened from now on, counting its reads."""
    counters = []
    real_source = prepared.source

    def counting(*a):
        counters.append(CountingSource(real_source(*a)))
        return counters[-1]
    monkeypatch.setattr(prepared, "source", counting)
    return counters


def _assert_batches_equal(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_prepared_shards_give_the_corpus_batches_states_and_eval(corpus, tok, monkeypatch):
    path, out = corpus
    meta = json.loads((out / prepared.METADATA).read_text())
    raw_cfg = DataConfig(path=str(path), eval_fraction=0.1, prefetch=0)
    docs = list_documents(raw_cfg)
    for split in prepared.SPLITS:  # counts, tokens and identity from an independent tokenization
        part = split_documents(docs, split, 0.1)
        texts = [json.loads(Path(d.path).read_bytes()[d.offset:].split(b"\n")[0])["text"] for d in part]
        assert meta["splits"][split]["records"] == len(part) > 0
        assert meta["splits"][split]["tokens"] == sum(len(tok.encode(t, bos=True, eos=True)) for t in texts)
        assert meta["splits"][split]["documents"] == prepared.documents_fingerprint(part)
    assert len(meta["splits"]["train"]["shards"]) > 1  # --shard-size 1KB: several files, read as one source

    counters = _count_reads(monkeypatch)
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=2, seed=7)
    prep_cfg = DataConfig(path=str(out), eval_fraction=0.1, prefetch=0)
    n_train = meta["splits"]["train"]["records"]
    with make_iterator(raw_cfg, **kw) as raw, make_iterator(prep_cfg, **kw) as prep:
        assert prep.documents is None and prep.num_documents == raw.num_documents == n_train
        assert counters[0].reads == 0  # opening the shards reads no record
        first = _batches(prep, 1)
        # one batch reads the documents it packs plus grain's read-ahead, in blocks: not the corpus
        ahead, block = 2 * SEQ + data_iterator._READ_OPTIONS.prefetch_buffer_size, prepared.READ_BLOCK
        assert counters[0].reads <= -(-ahead // block) * block + block < n_train
        state = raw.get_state()
        n = (meta["splits"]["train"]["tokens"] // (2 * SEQ)) + 3  # past the end of the first epoch
        expected = [next(raw)] + _batches(raw, n)
        got = first + _batches(prep, n)
        assert prep.get_state() == raw.get_state()  # interchangeable states: the same pipeline
    _assert_batches_equal(expected, got)
    with make_iterator(prep_cfg, **kw) as resumed:  # a raw run's checkpointed state continues on prepared
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["tokens"], expected[0]["tokens"])

    ev = dict(kw, split="eval", process_index=1, process_count=2)
    with make_iterator(raw_cfg, **ev) as raw, make_iterator(prep_cfg, **ev) as prep:
        want, have = list(raw), list(prep)
    assert len(want) > 0
    _assert_batches_equal(want, have)


def test_a_run_that_asks_what_preparing_fixed_is_refused(corpus, tok, tmp_path, capsys):
    path, out = corpus
    kw = dict(seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="eval_fraction=0.1, the run asks data.eval_fraction=0.01"):
        make_iterator(DataConfig(path=str(out)), tokenizer=tok, **kw)
    with pytest.raises(ValueError, match="tokenized with Llama 3 .*this run's tokenizer is bytes"):
        make_iterator(DataConfig(path=str(out), eval_fraction=0.1), tokenizer=ByteTokenizer(), **kw)
    with pytest.raises(ValueError, match="prepared for objective lm, the run's objective is sft .*--objective sft"):
        make_iterator(DataConfig(path=str(out), eval_fraction=0.1), tokenizer=tok, kind="sft", **kw)
    with pytest.raises(ValueError, match="no metadata.json"):
        make_iterator(DataConfig(path=str(tmp_path), format="array_record"), tokenizer=tok, **kw)
    assert prepare_data.main([str(path), str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(out.parent.glob(".prepared.tmp-*"))


def test_packed_rows_are_the_first_epoch_and_each_process_reads_only_its_rows(corpus, tok, tmp_path, monkeypatch):
    """--seq-len packs the train documents in the order `data.seed` 7 reads them in its first epoch:
    read in stored order (data.shuffle false) the rows give that run's batches (until the first epoch's
    last, padded row); each of two processes reads only its rows of each batch, and their iterator
    states are the one-process state. Eval rows are the raw eval batches."""
    path, _ = corpus
    out = tmp_path / "packed"
    assert prepare_data.main([str(path), str(out), "--eval-fraction", "0.1", "--seq-len", str(SEQ), "--seed", "7",
                              "--quiet"]) == 0
    n_rows = json.loads((out / prepared.METADATA).read_text())["splits"]["train"]["records"]
    B = 4
    k = (n_rows - 1) // B  # batches made of whole rows of the first epoch
    raw_cfg = DataConfig(path=str(path), eval_fraction=0.1, prefetch=0)
    packed_cfg = DataConfig(path=str(out), eval_fraction=0.1, prefetch=0, shuffle=False)
    with make_iterator(raw_cfg, tokenizer=tok, seq_len=SEQ, batch_size=B, seed=7) as raw:
        expected = _batches(raw, k)
    counters = _count_reads(monkeypatch)
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=B, seed=0)
    with make_iterator(packed_cfg, **kw) as one:
        _assert_batches_equal(expected, _batches(one, k))
        state = one.get_state()
    for p in range(2):
        with make_iterator(packed_cfg, process_index=p, process_count=2, num_epochs=1, **kw) as it:
            got = _batches(it, k)
            assert it.get_state()["grain"] == state["grain"]  # the global batch number: any process count resumes it
        _assert_batches_equal([{key: b[key][2 * p:2 * p + 2] for key in BATCH_KEYS} for b in expected], got)
        read = counters[-1].read  # one epoch: record i is global row i
        assert {i % B for i in read} == {2 * p, 2 * p + 1} and len(read) == len(set(read))  # its rows, once
        assert set(read) >= {b * B + r for b in range(k) for r in (2 * p, 2 * p + 1)}
    with pytest.raises(ValueError, match=f"packed into rows for seq_len {SEQ}, the run has seq_len {2 * SEQ}"):
        make_iterator(packed_cfg, **dict(kw, seq_len=2 * SEQ))
    with pytest.raises(ValueError, match="packed into rows in a fixed order; data.shuffle_window"):
        make_iterator(dataclasses.replace(packed_cfg, shuffle_window=64), **kw)

    ev = dict(kw, split="eval", process_index=1, process_count=2)
    with make_iterator(raw_cfg, **ev) as raw, make_iterator(packed_cfg, **ev) as packed:
        want, have = list(raw), list(packed)
    assert len(want) > 0
    _assert_batches_equal(want, have)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_prepared_fine_tuning_records_give_the_jsonl_batches(objective, tok, tmp_path):
    """--objective sft|dpo: every batch key (loss mask, segments, DPO halves), the iterator state and the
    eval split read from the shards equal those rendered from the JSONL (records cut alike), past
    the end of an epoch; a bad record is skipped by both; a run of another objective is refused."""
    from test_finetune_data import dialogs, write_jsonl
    if objective == "sft":
        records = [{"messages": d} for d in dialogs(24)] + [{"prompt": "Say hi.", "completion": " hi"}]
        bad = '{"messages": []}'
    else:
        records = [{"prompt": [{"role": "user", "content": f"Pick {i}"}],
                    "chosen": [{"role": "assistant", "content": "good " * (i + 1)}],
                    "rejected": [{"role": "assistant", "content": "bad"}]} for i in range(24)]
        records.append({"prompt": "Q?", "chosen": " yes.", "rejected": " no."})
        bad = '{"prompt": "Q?", "chosen": " yes."}'
    path = write_jsonl(tmp_path / "records.jsonl", records, extra_lines=[bad])
    out = tmp_path / "prepared"
    assert prepare_data.main([str(path), str(out), "--objective", objective, "--eval-fraction", "0.2",
                              "--shard-size", "2KB", "--quiet"]) == 0
    meta = json.loads((out / prepared.METADATA).read_text())
    assert meta["kind"] == objective and meta["splits"]["train"]["records"] + meta["splits"]["eval"]["records"] == 25
    raw_cfg = DataConfig(path=str(path), eval_fraction=0.2, prefetch=0)
    prep_cfg = DataConfig(path=str(out), eval_fraction=0.2, prefetch=0)
    kw = dict(tokenizer=tok, seq_len=64, batch_size=2, seed=3, kind=objective)
    with make_iterator(raw_cfg, **kw) as raw, make_iterator(prep_cfg, **kw) as prep:
        assert prep.documents is None and prep.num_documents == raw.num_documents
        expected, got = _batches(raw, 14), _batches(prep, 14)  # 20 train records, 2-4 a row: past one epoch
        assert prep.get_state() == raw.get_state()
        # the longest records do not fit 64 (a DPO side: 32), and are counted (how many so far depends on
        # how far each pipeline's reader threads read ahead)
        assert prep.truncated > 0 and raw.truncated > 0
    for a, b in zip(expected, got, strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ev = dict(kw, split="eval")
    with make_iterator(raw_cfg, **ev) as raw, make_iterator(prep_cfg, **ev) as prep:
        want, have = list(raw), list(prep)
    assert len(want) > 0
    _assert_batches_equal(want, have)
    with pytest.raises(ValueError, match=f"prepared for objective {objective}, the run's objective is lm"):
        make_iterator(prep_cfg, **dict(kw, kind="text"))
    if objective == "dpo":
        with pytest.raises(ValueError, match="precompute_reference keys its table by source record"):
            make_iterator(prep_cfg, pair_index=True, **kw)
    assert prepare_data.main([str(path), str(tmp_path / "rows"), "--objective", objective, "--seq-len", "64",
                              "--quiet"]) == 2
