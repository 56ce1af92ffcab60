"""Messages and counts of the data pipeline (issue 19): a resumed iterator state of another pipeline is
refused naming the run's key, its old and new value and the way out; records cut to seq_len are
counted once each, in the batches taken, and the count survives a resume; a DPO pair with nothing to
prefer is skipped like any bad line; tools/prepare_data.py prints its summary and nothing before it;
score_context_error's boundary is what score_batch feeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llama3_jax.data import DataConfig, list_documents, make_iterator, record_check, skipped_line_count
from llama3_jax.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
TOK = ByteTokenizer()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def texts(path: Path, n: int, word: str) -> Path:
    return write_jsonl(path, [{"text": f"{word} {i} " * 5} for i in range(n)])


def dialog(i: int, long: bool = False) -> dict:
    user = ("long " * 40 if long else "hi ") + str(i)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"ok {i}"}]}


def state_of(cfg: DataConfig, n: int, **kw) -> tuple[dict, int]:
    """The JSON iterator state after `n` batches (as a checkpoint holds it), and the truncation count."""
    with make_iterator(cfg, tokenizer=TOK, **kw) as it:
        for _ in range(n):
            next(it)
        return json.loads(json.dumps(it.get_state())), it.truncated


# --------------------------------------------------------------------------- 8: another pipeline
TEXT = dict(seq_len=16, batch_size=2, seed=0)


def refusal(cfg: DataConfig, state: dict, **kw) -> str:
    with make_iterator(cfg, tokenizer=TOK, **{**TEXT, **kw}) as it, pytest.raises(ValueError) as e:
        it.set_state(state)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data iterator state is for another pipeline: "), msg
    return msg


def test_another_data_path_is_named_with_old_and_new_value(tmp_path):
    a, b = texts(tmp_path / "a.jsonl", 30, "alpha"), texts(tmp_path / "b.jsonl", 34, "beta")
    state, _ = state_of(DataConfig(path=str(a), prefetch=0), 2, **TEXT)
    msg = refusal(DataConfig(path=str(b), prefetch=0), state)
    assert f"data.path was '{a}', now '{b}'" in msg, msg
    assert msg.endswith(f"use a new workdir, or set data.path back to '{a}'"), msg
    # a key of the run itself: named as the config spells it
    msg = refusal(DataConfig(path=str(a), prefetch=0), state, batch_size=4)
    assert msg.endswith("batch_size was 2, now 4; use a new workdir, or set batch_size back to 2"), msg
    msg = refusal(DataConfig(path=str(a), prefetch=0, eval_fraction=0.5), state)
    assert "data.eval_fraction was 0.01, now 0.5" in msg and "set data.eval_fraction back to 0.01" in msg, msg


def test_a_state_from_before_the_source_was_recorded_still_resumes(tmp_path):
    """Older checkpoints hold only fingerprint + grain: the same pipeline continues them (count from 0);
    another corpus is refused naming the candidate keys."""
    a, b = texts(tmp_path / "a.jsonl", 30, "alpha"), texts(tmp_path / "b.jsonl", 34, "beta")
    cfg = DataConfig(path=str(a), prefetch=0)
    state, _ = state_of(cfg, 2, **TEXT)
    old = {"fingerprint": state["fingerprint"], "grain": state["grain"]}
    with make_iterator(cfg, tokenizer=TOK, **TEXT) as it:
        it.set_state(old)
        assert it.truncated == 0 and it.get_state()["grain"] == state["grain"]
    msg = refusal(DataConfig(path=str(b), prefetch=0), old)
    assert "data.path" in msg and "data.eval_fraction" in msg and "use a new workdir" in msg, msg


# --------------------------------------------------------------------------- 11: truncation count
SFT = dict(seq_len=48, batch_size=1, seed=0, kind="sft")


def test_truncated_counts_records_not_rereads_and_survives_a_resume(tmp_path):
    """Two over-long dialogs among five, read for about three epochs: 2 (the old count grew with every
    epoch and read-ahead, and restarted at 0 on resume)."""
    path = write_jsonl(tmp_path / "sft.jsonl", [dialog(0, True), dialog(1), dialog(2), dialog(3, True), dialog(4)])
    cfg = DataConfig(path=str(path), eval_fraction=0.0, packing_bins=1)  # prefetch on: reads run ahead
    n = 12
    _, uninterrupted = state_of(cfg, n, **SFT)
    assert uninterrupted == 2
    for k in (1, 4, 7):  # stop anywhere, resume from the JSON state
        state, _ = state_of(cfg, k, **SFT)
        with make_iterator(cfg, tokenizer=TOK, **SFT) as it:
            it.set_state(state)
            for _ in range(n - k):
                next(it)
            assert it.truncated == uninterrupted, k


def test_dpo_pair_cut_on_both_sides_is_one_record(tmp_path):
    long = [{"role": "assistant", "content": "x" * 60}]
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": long,
              "rejected": [{"role": "assistant", "content": "y" * (60 if i == 0 else 2)}]} for i in range(3)]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "dpo.jsonl", pairs)), eval_fraction=0.0, prefetch=0)
    _, count = state_of(cfg, 9, seq_len=64, batch_size=1, seed=0, kind="dpo")
    assert count == 3  # three pairs cut (the first on both sides), each counted once over three epochs


# --------------------------------------------------------------------------- 14: nothing to prefer
def test_dpo_pair_whose_sides_render_alike_is_skipped_and_counted(tmp_path, capsys):
    ask = [{"role": "user", "content": "2 + 2?"}]
    good = {"prompt": ask, "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    records = [
        good,                                                                       # 1
        {"prompt": "2 + 2?", "chosen": " 4", "rejected": " 4"},                     # 2: strings
        {"prompt": ask, "chosen": good["chosen"], "rejected": good["chosen"]},      # 3: messages
        # 4: a field the renderer does not read differs: the rendered sides are still equal
        {"prompt": ask, "chosen": [{"role": "assistant", "content": "4", "name": "a"}], "rejected": good["chosen"]},
        {"prompt": "2 + 2?", "chosen": " 4", "rejected": " 4."},                    # 5
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    before = skipped_line_count()
    docs = list_documents(DataConfig(path=str(path)), record_check("dpo"))
    assert [d.line for d in docs] == [1, 5]
    assert skipped_line_count() - before == 3
    err = capsys.readouterr().err
    for line in (2, 3, 4):
        assert f"{path}:{line}: skipped: 'chosen' equals 'rejected' (nothing to prefer)\n" in err, err


# --------------------------------------------------------------------------- 12: prepare_data output
def test_prepare_data_prints_only_its_summary(tmp_path):
    """A quick run: no progress line ("train: 1 records, ...") before the real summary."""
    src, dst = texts(tmp_path / "corpus.jsonl", 40, "gamma"), tmp_path / "prepared"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "prepare_data.py"), str(src), str(dst),
                          "--tokenizer", "bytes", "--eval-fraction", "0.2"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    meta = json.loads((dst / "metadata.json").read_text())["splits"]
    train, ev = meta["train"]["records"], meta["eval"]["records"]
    assert train + ev == 40 and train > 1 and ev > 1
    assert run.stdout == ""
    assert run.stderr.startswith(f"prepare_data: {dst}: train {train} documents (") and \
        run.stderr.count("\n") == 1 and "\r" not in run.stderr and f"eval {ev} documents (" in run.stderr, run.stderr


def test_prepare_data_summary_counts_the_skipped_pairs(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import prepare_data
    records = [{"prompt": f"q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(6)]
    records[3]["rejected"] = records[3]["chosen"]
    src = write_jsonl(tmp_path / "pairs.jsonl", records)
    assert prepare_data.main([str(src), str(tmp_path / "prepared"), "--objective", "dpo", "--tokenizer", "bytes",
                              "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{src}:4: skipped: 'chosen' equals 'rejected' (nothing to prefer)", err
    assert len(err) == 2 and err[1].endswith("eval 1 records (21 tokens), 1 bad lines skipped"), err
    assert "train 4 records (" in err[1], err  # 6 pairs - the one skipped - the one held out


# --------------------------------------------------------------------------- 16: what scoring reads
def test_score_context_error_boundary_is_every_token_of_the_pair():
    """score_batch feeds all n tokens (positions 0 .. n - 1): n == max_seq_len fits, one more does not."""
    from llama3_jax.serve.engine import Generator
    gen = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=16))
    assert Generator.score_context_error(gen, 10, 6) is None
    assert "at most 6 completion tokens fit" in Generator.score_context_error(gen, 10, 7)
    assert "prompt of 17 tokens" in Generator.score_context_error(gen, 17, 0)
