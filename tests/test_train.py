"""Pretraining: sharded == single device, exact resume after SIGKILL/SIGTERM, restore on other meshes,
first-step loss == transformers, packing isolation, grad accumulation, scan, the sharding golden table.

One reference run (1 device, float32, from a converted random transformers model) is shared by most
tests; the 8-device run and the kill/resume runs are subprocesses (jax reads XLA_FLAGS at import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama3_jax.store import checkpoint
from llama3_jax import cli, train
from llama3_jax.model.config import load_yaml_config
from llama3_jax.convert import convert
from llama3_jax.data import DataConfig, corpus_documents, make_iterator
from llama3_jax.train.optim import OptimConfig, decay_mask, make_optimizer, schedule
from llama3_jax.parallel.sharding import make_mesh

from conftest import make_hf_llama
from train_helpers import VOCAB, base_overrides, flat_state, read_metrics, train_losses, write_corpus

REPO = Path(__file__).resolve().parent.parent
STEPS = 120  # the reference run: long enough that a kill lands mid-run
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

# Every parameter's PartitionSpec on a data=2, fsdp=2, tensor=2 mesh, from sharding.RULES
# (test-small dims + vocab 262: all divisible by 2, so every rule applies).
GOLDEN_SPECS_222 = {
    "['embed']": ["tensor", "fsdp"],                             # (vocab, embed)
    "['layers']['attn_norm']": [None, None],                     # (layers, norm)
    "['layers']['wq']": [None, "fsdp", "tensor", None],          # (layers, embed, q_heads, head_dim)
    "['layers']['wk']": [None, "fsdp", "tensor", None],          # (layers, embed, kv_heads, head_dim)
    "['layers']['wv']": [None, "fsdp", "tensor", None],
    "['layers']['wo']": [None, "tensor", None, "fsdp"],          # (layers, q_heads, head_dim, embed)
    "['layers']['mlp_norm']": [None, None],
    "['layers']['w_gate']": [None, "fsdp", "tensor"],            # (layers, embed, mlp)
    "['layers']['w_up']": [None, "fsdp", "tensor"],
    "['layers']['w_down']": [None, "tensor", "fsdp"],            # (layers, mlp, embed)
    "['norm']": [None],
    "['lm_head']": ["fsdp", "tensor"],                           # (embed, vocab)
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random transformers Llama (float32) and its `convert --to jax` checkpoint."""
    d = tmp_path_factory.mktemp("hf")
    model = make_hf_llama(d / "hf", vocab=VOCAB)
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    return model, d / "jax"


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """1-device CLI runs share a persistent compilation cache: reruns skip compiling, as a user's would."""
    return dict(ENV, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))


def train_cmd(overrides) -> list[str]:
    return [sys.executable, "-m", "llama3_jax.cli", "train", *overrides]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, hf, cli_env):
    """The uninterrupted 1-device run every other run is compared with (`llama3-jax train ...`)."""
    wd = tmp_path_factory.mktemp("reference") / "run"
    overrides = base_overrides(wd, corpus, hf[1], steps=STEPS, eval_every=40)
    proc = subprocess.run(train_cmd(overrides), env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd, overrides, proc.stderr


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, corpus, hf):
    """10 steps on 8 fake CPU devices (data=2, fsdp=2, tensor=2), then restores onto other meshes."""
    out = tmp_path_factory.mktemp("sharded")
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, str(REPO / "tests" / "train_helpers.py"), str(out),
           *base_overrides(out / "run", corpus, hf[1], eval_every=40)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # XLA logs when the partitioner must replicate a whole array to reshard it (it did for the
    # embedding gather before the table was constrained whole on the model dim)
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), out


def first_batch(corpus) -> dict:
    with make_iterator(DataConfig(path=str(corpus), eval_fraction=0.1), tokenizer=train.ByteTokenizer(),
                       seq_len=32, batch_size=8, seed=0) as it:
        return next(it)


def segments(batch):
    """(row, start, end) of every document piece in a packed batch."""
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
            yield r, idx[0], idx[-1] + 1


# ----------------------------------------------------------------------------------- correctness


def test_sharded_training_matches_single_device(reference, sharded):
    report, _ = sharded
    single = train_losses(reference[0])
    losses = {int(k): v for k, v in report["losses"].items()}
    assert sorted(losses) == list(range(1, 11))
    np.testing.assert_allclose([losses[s] for s in range(1, 11)], [single[s] for s in range(1, 11)], rtol=1e-4)
    assert losses[10] < losses[1] - 0.3  # it learns, not just agrees


def test_sharded_training_with_faster_backends_matches_single_device(reference, corpus, hf, tmp_path):
    """blockwise and splash (Pallas interpret mode, under shard_map) attention with the chunked loss, on
    8 fake devices (data=2, fsdp=2, tensor=2): the same losses as the 1-device reference run."""
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, str(REPO / "tests" / "train_helpers.py"), "--backends", str(tmp_path),
           *base_overrides(tmp_path / "unused", corpus, hf[1], checkpoint_every=100)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train_losses(reference[0])
    for backend, losses in json.loads((tmp_path / "backends.json").read_text()).items():
        losses = {int(k): v for k, v in losses.items()}
        np.testing.assert_allclose([losses[s] for s in range(1, 11)], [single[s] for s in range(1, 11)], rtol=1e-4,
                                   err_msg=backend)


def test_param_and_optimizer_shardings_golden_table(sharded):
    specs = sharded[0]["restores"]["mesh222"]["specs"]
    params = {k[len("['params']"):]: v for k, v in specs.items() if k.startswith("['params']")}
    assert params == GOLDEN_SPECS_222
    # AdamW's moments are sharded exactly like their parameters; counters are replicated
    for k, v in specs.items():
        for moment in (".mu", ".nu"):
            if moment in k:
                assert v == GOLDEN_SPECS_222[k.split(moment, 1)[1]], k
    assert all(v == [] for k, v in specs.items() if k.endswith(".count") or k == "['step']")


def test_checkpoint_from_8_devices_restores_on_1_and_fsdp4(sharded, corpus, hf):
    report, out = sharded
    assert report["restores"]["fsdp4"]["identical"] and report["restores"]["single"]["identical"]
    # restored into the NEW mesh's layout: wq (layers 2, embed 40, heads 4, head_dim 10) split 4-way on embed
    assert report["restores"]["fsdp4"]["shard_shapes"]["['params']['layers']['wq']"] == [2, 10, 4, 10]
    assert report["restores"]["mesh222"]["shard_shapes"]["['params']['layers']['wq']"] == [2, 20, 2, 10]
    assert report["restores"]["single"]["shard_shapes"]["['params']['layers']['wq']"] == [2, 40, 4, 10]
    # and in this process (1 real device): the full train state, and the params as generate reads them
    saved = dict(np.load(out / "final_state.npz"))
    cfg = load_yaml_config(train.TrainConfig, None, base_overrides(out / "run", corpus, hf[1]))
    mesh = make_mesh(1, 1, 1)
    setup = train.build(cfg, train.model_config(cfg, out / "run"), mesh)
    state, data_state, meta = train.restore_state(out / "run", 10, setup.abstract)
    restored = flat_state(state)
    assert restored.keys() == saved.keys() and meta["step"] == 10 and data_state["fingerprint"]
    for k in saved:
        np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)
    _, params = checkpoint.restore_params(out / "run")
    for k, v in flat_state(params).items():
        np.testing.assert_array_equal(v, saved[f"['params']{k}"])


def test_first_step_loss_equals_transformers(reference, hf, corpus):
    """transformers on each document alone (packed rows split at segment boundaries), with our targets
    and loss mask; HF's own `labels` would shift again, so the loss is computed from its logits."""
    model, _ = hf
    batch = first_batch(corpus)
    total, count = 0.0, 0
    with torch.no_grad():
        for r, a, b in segments(batch):
            assert np.array_equal(batch["positions"][r, a:b], np.arange(b - a))
            logits = model(torch.tensor(batch["tokens"][r, a:b][None].astype(np.int64))).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            picked = logp[torch.arange(b - a), torch.tensor(batch["targets"][r, a:b].astype(np.int64))]
            mask = torch.tensor(batch["loss_mask"][r, a:b], dtype=torch.float64)
            total, count = total - float((picked * mask).sum()), count + int(mask.sum())
    assert count > 0 and len(list(segments(batch))) > batch["tokens"].shape[0]  # really packed
    first = read_metrics(reference[0])[0]
    assert first["step"] == 1 and first["loss_tokens"] == count
    assert abs(first["loss"] - total / count) < 1e-4


def test_packed_documents_never_attend_across(hf, corpus):
    """Logits of each document inside a packed row == logits of that document alone in a row."""
    _, jax_dir = hf
    cfg, params = checkpoint.restore_params(jax_dir)
    cfg = dataclasses.replace(cfg, dtype="float32")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: train.Llama(cfg, rngs=nnx.Rngs(0))))
    fwd = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg)[0])
    batch = first_batch(corpus)
    packed = np.asarray(fwd(params, batch["tokens"], batch["positions"], batch["segment_ids"]))
    pieces = list(segments(batch))
    alone = {k: np.zeros((len(pieces), batch["tokens"].shape[1]), np.int32) for k in ("tokens", "positions", "seg")}
    for i, (r, a, b) in enumerate(pieces):  # each document alone at the start of its own row
        alone["tokens"][i, : b - a] = batch["tokens"][r, a:b]
        alone["positions"][i, : b - a] = batch["positions"][r, a:b]
        alone["seg"][i, : b - a] = 1
    single = np.asarray(fwd(params, alone["tokens"], alone["positions"], alone["seg"]))
    for i, (r, a, b) in enumerate(pieces):
        np.testing.assert_allclose(packed[r, a:b], single[i, : b - a], atol=1e-5, rtol=1e-5)


def test_grad_accumulation_and_scan_give_the_same_step(corpus, hf):
    """2 microbatches == 1 batch (loss, grad norm, updated params); unrolled layers == scanned;
    rematerialised (remat=dots, save_qkv_proj) == stored activations; blockwise attention and the
    loss in chunks of 8 positions (T = 32: 4 chunks) == the reference attention and the whole loss;
    eval in 2 microbatches == eval at once."""
    batch = first_batch(corpus)
    results = {}
    variants = [("base", {"attention": "reference", "loss_chunk": 0}), ("accum2", {"grad_accum": 2}),
                ("unrolled", {"scan_layers": False}), ("remat_dots", {"remat": "dots"}),
                ("remat_qkv", {"remat": "save_qkv_proj"}),
                ("blockwise_chunked", {"attention": "blockwise", "loss_chunk": 8, "grad_accum": 2})]
    for name, extra in variants:
        cfg = load_yaml_config(train.TrainConfig, None, base_overrides("/nonexistent", corpus, hf[1], **extra))
        mc = train.model_config(cfg)
        mesh = make_mesh(1, 1, 1)
        setup = train.build(cfg, mc, mesh)
        _, params = checkpoint.restore_params(hf[1], mesh, cfg=mc)
        with jax.set_mesh(mesh):
            evaluated = jax.device_get(setup.eval_fn(params, setup.put_batch(batch)))
            state, metrics = setup.step_fn(setup.init_state(cfg.seed, params), setup.put_batch(batch))
        results[name] = jax.device_get(metrics), flat_state(state["params"])
        np.testing.assert_allclose(evaluated[0] / evaluated[1], results[name][0]["loss"], rtol=1e-5, err_msg=name)
    base_m, base_p = results["base"]
    for name, _ in variants[1:]:
        m, p = results[name]
        for key in ("loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(m[key], base_m[key], rtol=1e-5, err_msg=f"{name} {key}")
        for k in base_p:
            np.testing.assert_allclose(p[k], base_p[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


# ------------------------------------------------------------------------------- preemption


def _wait(proc, predicate, what, timeout=120):
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}: {proc.stdout.read()[-2000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _steps_on_disk(wd: Path) -> list[int]:
    return sorted(int(p.name) for p in wd.iterdir() if p.name.isdigit()) if wd.exists() else []


def _logged(wd: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(wd) if "loss" in r]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_sigkill_then_sigterm_then_finish_gives_identical_losses(reference, cli_env, tmp_path):
    """kill -9 after a checkpoint -> rerun resumes from it; SIGTERM -> saves and exits 0; a third run
    finishes. Every step's loss equals the uninterrupted run's, and each step is logged once."""
    ref_wd, overrides, _ = reference
    wd = tmp_path / "run"
    cmd = train_cmd([o.replace(str(ref_wd), str(wd)) for o in overrides])
    popen = dict(env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    proc = subprocess.Popen(cmd, **popen)
    _wait(proc, lambda: _steps_on_disk(wd), "the first checkpoint")
    proc.kill()
    proc.wait()
    resumed_from, killed_at = checkpoint.latest_step(wd), max(_logged(wd))
    assert resumed_from is not None and killed_at < STEPS, "the kill landed after the run finished"

    proc = subprocess.Popen(cmd, **popen)  # the same command again
    _wait(proc, lambda: any(s > killed_at for s in _logged(wd)), "a step after the resume")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert f"resumed {wd} at step {resumed_from}" in out and "preempted (SIGTERM)" in out
    stopped = checkpoint.latest_step(wd)
    assert resumed_from < stopped < STEPS and stopped == max(_logged(wd))

    done = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"done: steps {stopped} -> {STEPS}" in done.stderr, done.stderr[-2000:]
    assert train_losses(wd) == train_losses(ref_wd)  # dict equality: same steps, bit-identical losses
    evals = [r for r in read_metrics(wd) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [40, 80, 120]
    assert evals == [r for r in read_metrics(ref_wd) if "eval_loss" in r]


def test_training_from_prepared_data_has_the_corpus_losses(reference, corpus, cli_env, tmp_path):
    """The reference run's data tokenized once (tools/prepare_data.py): its first steps from the
    ArrayRecord shards have bit-identical losses, and the eval reads as many held-out tokens."""
    ref_wd, overrides, _ = reference
    out = tmp_path / "prepared"
    sys.path.insert(0, str(REPO / "tools"))
    import prepare_data
    assert prepare_data.main([str(corpus), str(out), "--tokenizer", "bytes", "--eval-fraction", "0.1", "--quiet"]) == 0
    wd = tmp_path / "run"
    swap = {f"workdir={ref_wd}": f"workdir={wd}", f"data.path={corpus}": f"data.path={out}", f"steps={STEPS}": "steps=2"}
    run = subprocess.run(train_cmd([swap.get(o, o) for o in overrides]), env=cli_env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got, ref = train_losses(wd), train_losses(ref_wd)
    assert got == {s: ref[s] for s in (1, 2)}
    ref_eval = next(r for r in read_metrics(ref_wd) if "eval_loss" in r)
    [ev] = [r for r in read_metrics(wd) if "eval_loss" in r]
    assert ev["step"] == 2 and ev["eval_tokens"] == ref_eval["eval_tokens"] > 0


# ------------------------------------------------------------------------------ the workdir


def test_workdir_is_a_jax_checkpoint_with_metrics(reference, tmp_path):
    wd, overrides, stderr = reference
    assert f"done: steps 0 -> {STEPS}" in stderr
    records = read_metrics(wd)
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, STEPS + 1))
    for r in train_lines[1:]:
        assert r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0
    lrs = [r["learning_rate"] for r in train_lines]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(3e-3) and lrs[-1] < lrs[2]  # warmup, then decay
    for r in records:
        if "eval_loss" in r:
            assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 1.0
    assert records[-1]["step"] == STEPS and records[-1]["eval_loss"] < train_lines[0]["loss"] - 1.0
    # keep_checkpoints=3 of every 5 steps, the last one final; every reader takes the workdir
    assert _steps_on_disk(wd) == [110, 115, 120]
    cfg, params = checkpoint.restore_params(wd)
    hf_dir = tmp_path / "hf"
    convert(wd, hf_dir, src_format="jax", dst_format="hf", progress=False)
    from transformers import LlamaForCausalLM
    torch_model = LlamaForCausalLM.from_pretrained(hf_dir)
    np.testing.assert_array_equal(torch_model.model.embed_tokens.weight.detach().numpy(), np.asarray(params["embed"]))


def _read_event_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    """Every scalar in the TFRecord event files under logdir, parsed with the Event proto."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    out = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_event_files(tmp_path):
    log = train.MetricsLog(tmp_path, 0, tensorboard=True)
    log.write({"step": 1, "loss": 2.5, "grad_norm": 0.75})
    log.write({"step": 2, "loss": 2.25, "eval_loss": 3.0})
    log.close()
    scalars = _read_event_scalars(tmp_path / "tensorboard")
    assert scalars == {("loss", 1): 2.5, ("grad_norm", 1): 0.75, ("loss", 2): 2.25, ("eval_loss", 2): 3.0}
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_without_a_writer_leaves_a_note(tmp_path, capsys, monkeypatch):
    for module in ("tensorboardX", "torch.utils.tensorboard"):  # as on a machine without either
        monkeypatch.setitem(sys.modules, module, None)
    log = train.MetricsLog(tmp_path, 0, tensorboard=True)
    log.write({"step": 1, "loss": 2.0})
    log.close()
    assert "tensorboard: no event-file writer is installed" in capsys.readouterr().err
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}] and not (tmp_path / "tensorboard").exists()


def test_bad_batch_and_mesh_are_one_line_errors(corpus, capsys):
    assert cli.main(["train", *base_overrides("/nonexistent", corpus, batch_size=6, grad_accum=4)]) == 2
    assert "batch_size 6 is not a multiple of grad_accum 4" in capsys.readouterr().err
    assert cli.main(["train", *base_overrides("/nonexistent", corpus, **{"mesh.fsdp": 3})]) == 2
    assert "mesh: data*fsdp*tensor" in capsys.readouterr().err


def test_unknown_override_key_suggests_the_closest(capsys):
    with pytest.raises(ValueError, match="unknown key 'stpes'; did you mean 'steps'"):
        train.run_train(None, ["stpes=3"])
    with pytest.raises(ValueError, match="unknown key 'optim.warmup'; did you mean 'optim.warmup_steps'"):
        train.run_train(None, ["optim.warmup=3"])
    assert cli.main(["train", "mesh.fsdb=2"]) == 2
    assert "unknown key 'mesh.fsdb'; did you mean 'mesh.fsdp'" in capsys.readouterr().err


def test_tiny_configs_are_the_real_architecture():
    """The default job reads bytes (a 262-row output layer); tiny-128k.yaml is the same job with Llama 3's
    tokenizer and vocabulary. Both: GQA, tied embeddings, the stdlib corpus, a sample at the end."""
    cfg = load_yaml_config(train.TrainConfig, REPO / "configs" / "tiny.yaml", [])
    mc = train.model_config(cfg)
    assert cfg.tokenizer == "bytes" and mc.vocab_size >= train.ByteTokenizer().n_words
    assert cfg.workdir == "runs/tiny" and cfg.sample_tokens > 0 and cfg.data.path == "stdlib"
    big = load_yaml_config(train.TrainConfig, REPO / "configs" / "tiny-128k.yaml", [])
    assert train.model_config(big).vocab_size == 128256 and big.tokenizer is None and big.data.path == "stdlib"
    for c in (cfg, big):
        m = train.model_config(c)
        assert m.n_kv_heads < m.n_heads and m.tie_embeddings and c.workdir.startswith("runs/tiny")


def test_optimizer_masks_norms_and_embeddings_and_follows_the_schedule():
    params = {"embed": jnp.ones((3, 2)), "norm": jnp.ones((2,)), "lm_head": jnp.ones((2, 3)),
              "layers": {"attn_norm": jnp.ones((1, 2)), "wq": jnp.ones((1, 2, 2))}}
    assert decay_mask(params) == {"embed": False, "norm": False, "lm_head": True,
                                  "layers": {"attn_norm": False, "wq": True}}
    cfg = OptimConfig(lr=0.1, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.5)
    tx = make_optimizer(cfg, total_steps=10)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):  # step 0 has lr 0; step 1 lr = 0.05: only decayed weights shrink, by lr * wd
        updates, state = tx.update(zero, state, params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    assert float(new["norm"][0]) == 1.0 and float(new["embed"][0, 0]) == 1.0
    assert float(new["layers"]["wq"][0, 0, 0]) == pytest.approx(1 - 0.05 * 0.5)
    lr = schedule(cfg, 10)
    cos = [0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    np.testing.assert_allclose([float(lr(s)) for s in range(2, 11)], cos, rtol=1e-6)
    assert float(lr(1)) == pytest.approx(0.05) and float(lr(50)) == pytest.approx(0.01)


# ------------------------------------------------------------------ start-up checks, new-user paths

TINY_RUN = ["model={preset: test-small, vocab_size: 262}", "tokenizer=bytes", "seq_len=32", "batch_size=4",
            "compute_dtype=float32", "optim.warmup_steps=2", "sample_tokens=2", "progress=false"]


@pytest.fixture(scope="module")
def text_file_run(tmp_path_factory):
    """The issue's command (a single text file: one document, so no eval documents, with eval_every > 0),
    shrunk to test-small with the byte tokenizer. In-process: (workdir, argv, exit status, stderr)."""
    wd = tmp_path_factory.mktemp("textfile") / "run"
    argv = ["train", "--config", str(REPO / "configs" / "tiny.yaml"), f"data.path={REPO / 'README.md'}",
            f"workdir={wd}", "steps=4", "eval_every=2", "checkpoint_every=2", *TINY_RUN]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return wd, argv, rc, err.getvalue()


def test_single_text_file_with_eval_every_trains_without_eval(text_file_run):
    wd, _, rc, err = text_file_run
    assert rc == 0, err
    assert err.count("train: warning: no eval documents in data.path") == 1 and "eval_every=2 ignored" in err
    assert "done: steps 0 -> 4" in err and _steps_on_disk(wd) == [2, 4]
    assert [r["step"] for r in read_metrics(wd)] == [1, 4] and "eval_loss" not in str(read_metrics(wd))
    assert (wd / "sample.txt").read_text().startswith("def")  # the end-of-run sample ran


def test_no_eval_documents_is_decided_at_startup(tmp_path, capsys):
    """A one-line JSONL and data.eval_fraction=0 also mean "no eval", said once before any step."""
    from llama3_jax.train.evaluate import eval_every
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "the only document"}\n')
    many = write_corpus(tmp_path / "many.jsonl", n_docs=20)
    for path, fraction, expected in [(one, 0.5, 0), (many, 0.0, 0), (many, 0.1, 3)]:
        cfg = load_yaml_config(train.TrainConfig, None, [f"data.path={path}", f"data.eval_fraction={fraction}",
                                                         "eval_every=3"])
        assert eval_every(cfg, True, corpus_documents(cfg.data)) == expected
        assert capsys.readouterr().err.count("no eval documents") == (expected == 0)


def test_generate_uses_the_tokenizer_the_run_trained_with(text_file_run):
    """`tokenizer: bytes` is recorded in the workdir's config.json, and the Generator picks it up."""
    from llama3_jax.serve.engine import Generator
    from llama3_jax.tokenizer import ByteTokenizer
    wd = text_file_run[0]
    assert json.loads((wd / "config.json").read_text())["tokenizer"] == "bytes"
    gen = Generator(wd, dtype="float32")
    assert isinstance(gen.tokenizer, ByteTokenizer)
    gen.check_ids(gen.tokenizer.encode("def f():", bos=True, eos=False))  # every id inside the 262-row vocab


def test_resume_refuses_model_overrides_and_warns_of_a_new_schedule(text_file_run, tmp_path, capsys):
    """A resumed run refuses a model that disagrees with its checkpoint; a refused run (or one that fails
    on its data path) rewrites neither config.json nor train_config.json; a new `steps` says the
    schedule changes."""
    wd0, argv0, rc, _ = text_file_run
    assert rc == 0
    wd = tmp_path / "run"
    shutil.copytree(wd0, wd)
    argv = [a.replace(str(wd0), str(wd)) for a in argv0]
    before = {f: (wd / f).read_bytes() for f in ("config.json", "train_config.json")}
    assert cli.main(argv + ["model.n_layers=1", "model.dim=64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"resuming {wd}: its model has dim=40, n_layers=2 but the run config says "
                                     "model.dim=64, model.n_layers=1") in err, err
    assert cli.main(argv + ["data.path=/nonexistent/corpus.jsonl"]) == 2
    assert "/nonexistent/corpus.jsonl" in capsys.readouterr().err
    assert {f: (wd / f).read_bytes() for f in before} == before
    assert cli.main(argv + ["steps=6", "sample_tokens=0"]) == 0  # the same model again: it resumes
    err = capsys.readouterr().err
    assert "train: warning: resuming at step 4 with a different learning-rate schedule (steps 4 -> 6)" in err
    assert "done: steps 4 -> 6" in err


def test_refused_runs_write_nothing(tmp_path, corpus, hf, capsys):
    """seq_len past the model's max_seq_len (test-small: 128) is refused before anything is built, a
    missing data path before anything is written, and init_from refuses a disagreeing `model`."""
    wd = tmp_path / "run"
    assert cli.main(["train", *base_overrides(wd, corpus, seq_len=200)]) == 2
    assert "seq_len 200 is longer than the model's max_seq_len 128" in capsys.readouterr().err
    assert cli.main(["train", *base_overrides(wd, tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not wd.exists()
    cfg = load_yaml_config(train.TrainConfig, None, base_overrides(wd, corpus, hf[1], model="test-small"))
    with pytest.raises(ValueError, match=r"init_from .*: its model has vocab_size=262 but the run config says "
                                         r"model.vocab_size=211"):
        train.model_config(cfg)


def test_first_ctrl_c_saves_and_stops_second_stops_at_once():
    """In-process: the first SIGINT only sets the flag; the second raises KeyboardInterrupt; the old
    handlers come back afterwards."""
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with train.Preemption() as p:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert p.requested and p.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == old


def test_sigint_saves_a_checkpoint_and_exits_cleanly(reference, cli_env, tmp_path):
    """Ctrl-C during `train` (a subprocess): the step in flight finishes, is saved, exit status 0; the
    losses so far equal the uninterrupted run's."""
    ref_wd, overrides, _ = reference
    wd = tmp_path / "run"
    proc = subprocess.Popen(train_cmd([o.replace(str(ref_wd), str(wd)) for o in overrides]), env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(proc, lambda: len(_logged(wd)) >= 3, "three logged steps")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted (SIGINT), saved" in out, out[-2000:]
    stopped = checkpoint.latest_step(wd)
    assert stopped == max(_logged(wd)) < STEPS
    reference_losses = train_losses(ref_wd)
    assert train_losses(wd) == {s: reference_losses[s] for s in range(1, stopped + 1)}


def test_cli_help_describes_the_tool():
    text = cli.build_parser().format_help()
    assert "parse, validate" not in text and "Hugging Face" in text and "llama3-jax train --config" in text
