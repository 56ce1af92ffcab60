"""The grain input pipeline: packing invariants, exact resume, sharding, splits, bad input.

Uses the real Llama 3 tokenizer on small generated corpora (ASCII, so that any run of
tokens decodes to a plain substring of its document).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest

from llama3_jax.data import BATCH_KEYS, DataConfig, list_documents, make_iterator, split_documents
from llama3_jax.tokenizer import Tokenizer

SEQ = 16
WORDS = "alpha beta gamma delta packing grain token segment llama jax tensor row".split()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL of 13 documents: a few tokens up to several rows long."""
    rng = np.random.default_rng(0)
    texts = [
        f"doc{i}: " + " ".join(rng.choice(WORDS, size=n))
        for i, n in enumerate([2, 40, 5, 1, 70, 9, 3, 25, 12, 4, 33, 6, 0])
    ]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path, texts


def take(it, n):
    return [next(it) for _ in range(n)]


def full_rows(batches, tok):
    """Rebuild each packed row of SEQ + 1 tokens (tokens + last target) and its segments."""
    for b in batches:
        for tokens, targets, seg, mask in zip(
            b["tokens"], b["targets"], b["segment_ids"], b["loss_mask"]
        ):
            if mask[-1]:
                last_seg = seg[-1]  # the row's extra token continues the last document
            elif targets[-1] == tok.bos_id:
                last_seg = seg.max() + 1  # a new document starts on the extra token
            else:
                last_seg = 0  # padding
            yield np.append(tokens, targets[-1]), np.append(seg, last_seg)


def token_stream(batches, tok):
    """All non-padding packed tokens in order: the concatenation of the documents read."""
    parts = [row[seg > 0] for row, seg in full_rows(batches, tok)]
    return np.concatenate(parts).tolist() if parts else []


def split_docs(stream, tok):
    """Cut a token stream at each BOS (BOS never occurs inside encoded text)."""
    starts = [i for i, t in enumerate(stream) if t == tok.bos_id] + [len(stream)]
    assert starts[0] == 0, "stream must begin with a document start"
    return [tuple(stream[a:b]) for a, b in zip(starts, starts[1:])]


def drain(it):
    out = list(it)
    it.close()
    return out


def encoded(tok, texts):
    return Counter(tuple(tok.encode(t, bos=True, eos=True)) for t in texts)


def test_packing_invariants_and_no_token_lost(corpus, tok):
    path, texts = corpus
    cfg = DataConfig(path=str(path), eval_fraction=0.0, prefetch=0)
    it = make_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=3, seed=1, num_epochs=1)
    batches = drain(it)
    doc_tokens = [tok.encode(t, bos=True, eos=True) for t in texts]
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert b[k].shape == (3, SEQ) and b[k].dtype == np.int32, k
        for tokens, targets, pos, seg, mask in zip(*(b[k] for k in BATCH_KEYS)):
            real = seg[seg > 0]
            # Segments are contiguous runs 1, 2, 3, ... and padding only trails.
            assert np.all(seg[: len(real)] > 0) and np.all(seg[len(real) :] == 0)
            assert len(real) == 0 or (real[0] == 1 and set(np.diff(real)) <= {0, 1})
            for i in range(SEQ):
                if seg[i] == 0:
                    assert mask[i] == 0
                    continue
                new_segment = i == 0 or seg[i] != seg[i - 1]
                assert pos[i] == (0 if new_segment else pos[i - 1] + 1)
                if new_segment and i > 0:  # a document ends inside the row: EOS then BOS
                    assert tokens[i - 1] == tok.eos_id and tokens[i] == tok.bos_id
                    assert mask[i - 1] == 0
                if mask[i] and i + 1 < SEQ:
                    assert targets[i] == tokens[i + 1] and seg[i + 1] == seg[i]
                if i + 1 < SEQ and seg[i + 1] != seg[i]:
                    assert mask[i] == 0  # never learn across documents or into padding
            # Each segment is a contiguous piece of one document (token- and text-wise).
            for s in set(real.tolist()):
                piece = tokens[seg == s].tolist()
                owners = [
                    d
                    for d in doc_tokens
                    if any(d[j : j + len(piece)] == piece for j in range(len(d) - len(piece) + 1))
                ]
                assert owners, piece
                if piece[0] == tok.bos_id:
                    assert any(d[: len(piece)] == piece for d in owners)
                text = tok.decode([t for t in piece if t not in (tok.bos_id, tok.eos_id)])
                assert any(text in t for t in texts)
    # Concatenating the packed rows gives back every document exactly once, in a
    # shuffled order.
    docs = split_docs(token_stream(batches, tok), tok)
    assert Counter(docs) == encoded(tok, texts)
    assert docs != [tuple(d) for d in doc_tokens]


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("k", [0, 3, 14])  # at the start, inside epoch 0, past its end
def test_state_restores_exact_batches(corpus, tok, prefetch, k):
    path, _ = corpus
    cfg = DataConfig(path=str(path), eval_fraction=0.0, prefetch=prefetch)
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=2, seed=3)
    it = make_iterator(cfg, **kw)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = take(it, 12)  # ~10 batches per epoch: this crosses an epoch boundary
    it.close()
    # The state is what the consumer saw: the same with and without read-ahead.
    ref = make_iterator(DataConfig(path=str(path), eval_fraction=0.0, prefetch=0), **kw)
    take(ref, k)
    assert ref.get_state() == state
    ref.close()
    fresh = make_iterator(cfg, **kw)
    fresh.set_state(state)
    got = take(fresh, 12)
    fresh.close()
    for a, b in zip(expected, got, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_epochs_reshuffle_and_state_refuses_other_pipeline(corpus, tok):
    path, texts = corpus
    cfg = DataConfig(path=str(path), eval_fraction=0.0, prefetch=0)
    it = make_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=2, seed=5, num_epochs=2)
    docs = split_docs(token_stream(drain(it), tok), tok)
    n = len(texts)
    assert len(docs) == 2 * n
    assert Counter(docs[:n]) == Counter(docs[n:]) == encoded(tok, texts)
    assert docs[:n] != docs[n:]  # each epoch has its own order
    other = make_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=2, seed=6)
    with make_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=2, seed=5) as saved:
        state = saved.get_state()
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)
    other.close()


def test_processes_take_their_rows_of_one_global_order(corpus, tok):
    """Each process's rows are its slice of the batch one process would read, and every process's
    iterator state is that one process's: the data order does not depend on the process count."""
    path, _ = corpus
    cfg = DataConfig(path=str(path), eval_fraction=0.0, prefetch=0)
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=4, seed=0)
    with make_iterator(cfg, **kw) as one:
        whole = [next(one) for _ in range(3)]
        state = one.get_state()
    for p in range(2):
        with make_iterator(cfg, process_index=p, process_count=2, **kw) as it:
            assert it.rows == 2
            for batch in whole:
                got = next(it)
                for k in batch:
                    np.testing.assert_array_equal(got[k], batch[k][2 * p:2 * p + 2])
            assert it.get_state() == state


def test_eval_split_is_disjoint_and_finite(corpus, tok):
    path, texts = corpus
    cfg = DataConfig(path=str(path), eval_fraction=0.3)
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=2, seed=0)
    train = make_iterator(cfg, num_epochs=1, **kw)
    ev = make_iterator(cfg, split="eval", **kw)
    train_keys, eval_keys = {d.key for d in train.documents}, {d.key for d in ev.documents}
    assert eval_keys and train_keys and not train_keys & eval_keys
    train_docs = Counter(split_docs(token_stream(drain(train), tok), tok))
    eval_batches = drain(ev)  # finite: ends after one pass
    assert all(b["tokens"].shape == (2, SEQ) for b in eval_batches)
    eval_docs = Counter(split_docs(token_stream(eval_batches, tok), tok))
    assert not set(train_docs) & set(eval_docs)
    assert train_docs + eval_docs == encoded(tok, texts)
    # Membership depends on the document, not on its position in the file.
    docs = list_documents(cfg)
    held = {d.key for d in split_documents(docs, "eval", 0.3)}
    assert {d.key for d in split_documents(docs[::-1], "eval", 0.3)} == held == eval_keys


def test_one_eval_document_over_two_processes(corpus, tok):
    """Few held-out documents over several processes: every process sees the same number of eval
    batches (each its rows of them), so every eval step is a collective all of them run."""
    path, _ = corpus
    cfg = DataConfig(path=str(path), eval_fraction=1e-9, prefetch=0)  # only the lowest-hash document
    assert len(split_documents(list_documents(cfg), "eval", cfg.eval_fraction)) == 1
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=2, seed=0, split="eval", process_count=2)
    shares = [drain(make_iterator(cfg, process_index=i, **kw)) for i in range(2)]
    assert len(shares[0]) == len(shares[1]) >= 1
    with pytest.raises(ValueError, match="no train documents"):
        make_iterator(DataConfig(path=str(path), eval_fraction=1.0), tokenizer=tok, seq_len=SEQ,
                      batch_size=2, seed=0, process_index=1, process_count=2)


def test_stdlib_corpus(tok):
    start = time.perf_counter()
    docs = list_documents(DataConfig())
    assert time.perf_counter() - start < 2.0
    keys = [d.key for d in docs]
    assert len(docs) > 100 and keys == sorted(keys)
    assert "json/decoder.py" in keys
    assert not any(k.startswith(("test/", "idlelib/", "lib2to3/")) for k in keys)
    start = time.perf_counter()

    def first(seed, n=2):
        with make_iterator(DataConfig(), tokenizer=tok, seq_len=32, batch_size=4, seed=seed) as it:
            return take(it, n)

    a = first(0)
    assert time.perf_counter() - start < 10.0
    for k in BATCH_KEYS:
        assert a[0][k].shape == (4, 32) and a[0][k].dtype == np.int32
    assert a[0]["loss_mask"].sum() > 0
    b, c = first(0), first(1)
    for x, y in zip(a, b):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_directory_corpus(tmp_path, tok):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.md").write_text("# title b")
    (tmp_path / "sub" / "a.txt").write_text("text a")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "line one"}\n{"text": "line two"}\n')
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: dropped
    (tmp_path / "image.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored
    cfg = DataConfig(path=str(tmp_path), eval_fraction=0.0, prefetch=0)
    keys = [d.key for d in list_documents(cfg)]
    assert keys[:3] == ["b.md", "latin1.txt", "sub/a.txt"] and len(keys) == 5
    it = make_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=2, seed=0, num_epochs=1)
    docs = split_docs(token_stream(drain(it), tok), tok)
    assert Counter(docs) == encoded(tok, ["# title b", "text a", "line one", "line two"])


def test_bad_input(tmp_path, tok, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = ['{"text": "good one"}', '{"text": broken', '{"body": "no text"}', "[1, 2]", ""]
    bad.write_text("\n".join([*lines, '{"text": "good two"}', ""]))
    cfg = DataConfig(path=str(bad), eval_fraction=0.0, prefetch=0)
    for _ in range(2):  # building twice still reports each bad line once
        it = make_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=2, seed=0, num_epochs=1)
        docs = split_docs(token_stream(drain(it), tok), tok)
        assert Counter(docs) == encoded(tok, ["good one", "good two"])
    err = capsys.readouterr().err
    for line in (2, 3, 4):
        assert err.count(f"{bad}:{line}:") == 1, err
    assert f"{bad}:1:" not in err and f"{bad}:5:" not in err

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="nope.jsonl"):
        make_iterator(DataConfig(path=str(missing)), tokenizer=tok, seq_len=4, batch_size=1, seed=0)
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("not json\n")
    (tmp_path / "empty").mkdir()
    for path in (only_bad, tmp_path / "empty"):
        with pytest.raises(ValueError, match="no documents"):
            list_documents(DataConfig(path=str(path)))
    with pytest.raises(ValueError, match="process_count"):
        make_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=3, seed=0, process_count=2)


def test_worker_processes_resume_exactly(corpus, tok):
    """grain worker processes (mp_prefetch): batches are deterministic and resumable."""
    path, texts = corpus
    cfg = DataConfig(path=str(path), eval_fraction=0.0, worker_count=2, prefetch=2)
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=2, seed=3)
    with make_iterator(cfg, **kw) as it:
        take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 6)
    with make_iterator(cfg, **kw) as fresh:
        fresh.set_state(state)
        got = take(fresh, 6)
    for a, b in zip(expected, got, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_shuffle_window_mixes_rows_within_windows_and_resumes(corpus, tok):
    """data.shuffle_window: the same packed rows, each window of W rows in another order (so a batch is
    not a run of one document's consecutive rows), and a mid-window state restores the same batches."""
    path, _ = corpus
    kw = dict(tokenizer=tok, seq_len=SEQ, batch_size=1, seed=2)
    rows = lambda batches: [tuple(r) for b in batches for r in np.concatenate([b["tokens"], b["targets"][:, -1:]], 1)]
    plain = rows(drain(make_iterator(DataConfig(path=str(path), eval_fraction=0.0, prefetch=0), num_epochs=1, **kw)))
    cfg = DataConfig(path=str(path), eval_fraction=0.0, prefetch=0, shuffle_window=4)
    mixed = rows(drain(make_iterator(cfg, num_epochs=1, **kw)))
    assert len(plain) > 8 and mixed != plain
    for i in range(0, len(plain), 4):
        assert Counter(mixed[i:i + 4]) == Counter(plain[i:i + 4])
    it = make_iterator(cfg, **kw)
    take(it, 6)  # inside the second window
    state = json.loads(json.dumps(it.get_state()))
    expected = rows(take(it, 5))
    it.close()
    fresh = make_iterator(cfg, **kw)
    fresh.set_state(state)
    assert rows(take(fresh, 5)) == expected
    fresh.close()
    with pytest.raises(ValueError, match="shuffle_window must be >= 0"):
        make_iterator(DataConfig(path=str(path), shuffle_window=-1), **kw)
