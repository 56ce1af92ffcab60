"""Reward models (objective `reward`, model head `score`): the rewards equal transformers'
LlamaForSequenceClassification(num_labels=1) on the same weights, the loss and metrics equal TRL's
RewardTrainer formula, and the step's update does not depend on how the batch is split in microbatches."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from conftest import make_hf_llama
from llama3_jax.convert import convert
from llama3_jax.model.config import ModelConfig, from_hf_config, to_hf_config
from llama3_jax.model.llama import abstract_model, rewards_at
from llama3_jax.model.lora import LoraConfig
from llama3_jax.store import checkpoint
from llama3_jax.train import objectives
from llama3_jax.train.step import Objective, init_params, merge_trained, objective_loss, train_step

PAD = 7  # the pad id transformers looks for; the test sequences never contain it


def _hf_reward_model(causal, seed):
    """A LlamaForSequenceClassification with `causal`'s trunk and a random score head."""
    from transformers import LlamaForSequenceClassification
    cfg = copy.deepcopy(causal.config)
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    torch.manual_seed(seed)
    seqcls = LlamaForSequenceClassification(cfg).eval()
    seqcls.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad():
        seqcls.score.weight.normal_(0.0, 0.5)
    return seqcls


def _our_reward_model(ckpt, seqcls):
    """The converted trunk with transformers' score.weight (1, D) as our `score` (D, 1)."""
    cfg, params = checkpoint.restore_params(ckpt)
    cfg = dataclasses.replace(cfg, head="score", dtype="float32")
    params = {k: v for k, v in params.items() if k != "lm_head"}
    params["score"] = jnp.asarray(seqcls.score.weight.detach().numpy().T)
    model = abstract_model(cfg)
    nnx.update(model, params)
    return model


def _tokens(rng, n):
    t = rng.integers(0, 211, n)
    return np.where(t == PAD, PAD + 1, t)


@pytest.mark.parametrize("tie", [False, True])
def test_rewards_equal_transformers_sequence_classification(tmp_path, tie):
    causal = make_hf_llama(tmp_path / "hf", heads=4, kv_heads=2, tie=tie, seed=int(tie))
    convert(tmp_path / "hf", tmp_path / "jax", src_format="hf", dst_format="jax", progress=False)
    seqcls = _hf_reward_model(causal, seed=3)
    model = _our_reward_model(tmp_path / "jax", seqcls)
    rng = np.random.default_rng(0)

    # a right-padded batch: transformers reads each row at its last non-pad token
    lengths = np.array([23, 9, 1])
    t = int(lengths.max())
    tokens = np.stack([np.concatenate([_tokens(rng, n), np.full(t - n, PAD)]) for n in lengths])
    valid = np.arange(t)[None] < lengths[:, None]
    with torch.no_grad():
        ref = seqcls(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64))).logits[:, 0].numpy()
    pos = np.broadcast_to(np.arange(t), tokens.shape)
    hidden, _ = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(valid.astype(np.int32)), hidden_only=True)
    ours = np.asarray(rewards_at(hidden, model.score[...], jnp.asarray(lengths - 1)[:, None]))[:, 0]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    per_position, _ = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(valid.astype(np.int32)))
    assert per_position.shape == (3, t, 1)
    np.testing.assert_allclose(np.asarray(per_position)[np.arange(3), lengths - 1, 0], ref, atol=1e-4, rtol=0)

    # the same sequences packed as the data pipeline packs pairs (segments 2p - 1, 2p), then padding:
    # pair_last_positions finds each side's last token
    row = np.zeros(40, np.int32)
    seg, rpos = np.zeros(40, np.int32), np.zeros(40, np.int32)
    start = 0
    for s, n in enumerate(lengths, 1):
        row[start:start + n], seg[start:start + n], rpos[start:start + n] = tokens[s - 1, :n], s, np.arange(n)
        start += n
    batch = {"tokens": jnp.asarray(row[None]), "positions": jnp.asarray(rpos[None]), "segment_ids": jnp.asarray(seg[None])}
    chosen, rejected, ok = objectives.pair_last_positions(batch)
    np.testing.assert_array_equal(np.asarray(ok)[0, :3], [True, False, False])  # segment 3's partner is absent
    hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], hidden_only=True)
    packed = np.asarray(rewards_at(hidden, model.score[...], jnp.concatenate([chosen, rejected], 1)))
    p = chosen.shape[1]
    np.testing.assert_allclose([packed[0, 0], packed[0, p]], ref[:2], atol=1e-4, rtol=0)


def test_pair_last_positions_of_a_packed_row():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 0, 0], [1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0]])
    chosen, rejected, valid = objectives.pair_last_positions({"segment_ids": seg})
    assert chosen.shape == (2, 7)
    np.testing.assert_array_equal(np.asarray(chosen)[:, :2], [[2, 8], [0, 0]])
    np.testing.assert_array_equal(np.asarray(rejected)[:, :2], [[4, 9], [3, 0]])
    np.testing.assert_array_equal(np.asarray(valid).sum(1), [2, 1])


@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_and_metrics_are_trls(center):
    rng = np.random.default_rng(1)
    rc, rr, margin = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
    valid = rng.random((3, 5)) < 0.7
    loss_sum, count, sums = objectives.reward(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(valid),
                                              jnp.asarray(margin), center)
    got = {"loss": float(loss_sum / count), **{k: float(v) for k, v in objectives.finish_metrics(sums, count).items()}}

    c, r, m = (torch.tensor(a[valid]) for a in (rc, rr, margin))  # TRL's compute_loss on the valid pairs
    loss = -torch.nn.functional.logsigmoid(c - r - m).mean()
    if center is not None:
        loss += center * torch.mean((c + r) ** 2)
    every = torch.cat([c, r])
    want = {"loss": loss.item(), "accuracy": (c > r).float().mean().item(), "margin": (c - r).mean().item(),
            "mean_reward": every.mean().item(), "min_reward": every.min().item(), "max_reward": every.max().item()}
    assert int(count) == valid.sum()
    assert got == pytest.approx(want, abs=1e-5)

    # min/max combine across pieces (microbatches, eval batches) as min/max, sums add
    first, second = valid.copy(), valid.copy()
    first[2:], second[:2] = False, False
    parts = [objectives.reward(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(v), jnp.asarray(margin), center)
             for v in (first, second)]
    combined = objectives.combine_metrics(parts[0][2], parts[1][2])
    for k in objectives.REWARD_METRICS:
        assert float(combined[k]) == pytest.approx(float(sums[k]), abs=1e-5), k


def test_no_valid_pair_reports_zeros_not_infinities():
    loss_sum, count, sums = objectives.reward(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3), bool))
    assert float(loss_sum) == 0 and float(count) == 0
    assert {k: float(v) for k, v in objectives.finish_metrics(sums, count).items()} == dict.fromkeys(
        objectives.REWARD_METRICS, 0.0)


CFG = ModelConfig(vocab_size=37, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, intermediate_size=24,
                  max_seq_len=64, dtype="float32", head="score")


def _pair_batch(seed):
    """4 rows of 16: packed pairs of random lengths (segments 2p - 1, 2p), padding, a margin column."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((4, 16), np.int32) for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    out["margin"] = np.zeros((4, 16), np.float32)
    for i in range(4):
        start = 0
        for p in range(1, 3 if i % 2 else 2):
            m = rng.normal()
            for half in (1, 2):
                n = int(rng.integers(2, 5))
                sl = slice(start, start + n)
                out["tokens"][i, sl], out["positions"][i, sl] = rng.integers(0, 37, n), np.arange(n)
                out["segment_ids"][i, sl], out["margin"][i, sl] = 2 * p - 2 + half, m
                start += n
    return {k: jnp.asarray(v) for k, v in out.items()}


def _one_step(obj, params, batch, grad_accum):
    graphdef, _ = nnx.split(abstract_model(CFG))
    tx = optax.sgd(1.0)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    step = jax.jit(lambda s, b: train_step(obj, graphdef, tx, lambda _: 1.0, grad_accum, s, b, {}))
    return step(state, batch)


def test_step_update_with_grad_accum_2_equals_one_batch():
    obj = Objective(name="reward", reward=objectives.RewardConfig(center_rewards_coefficient=0.1))
    params, batch = init_params(CFG, 0), _pair_batch(0)
    whole, m1 = _one_step(obj, params, batch, 1)
    split, m2 = _one_step(obj, params, batch, 2)
    assert float(m1["tokens"]) == 6  # pairs, not tokens
    for k in ("loss", "grad_norm", *objectives.REWARD_METRICS):
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-6), k
    assert float(m1["min_reward"]) < float(m1["mean_reward"]) < float(m1["max_reward"])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), whole["params"], params)
    assert moved["score"] > 0 and moved["layers"]["wq"] > 0 and moved["embed"] > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5),
                 whole["params"], split["params"])


def test_lora_trains_the_score_head_with_the_adapters():
    from llama3_jax.model import lora
    lc = LoraConfig(rank=2)
    obj = Objective(name="reward", lora=lc)
    base, batch = init_params(CFG, 0), _pair_batch(1)
    graphdef, _ = nnx.split(abstract_model(CFG))
    trainable = {**lora.init(CFG, lc, jax.random.key(0)), "score": base["score"] * 2}
    (loss, (count, _)), grads = jax.jit(jax.value_and_grad(
        lambda t: objective_loss(obj, graphdef, t, {"base": base}, batch), has_aux=True))(trainable)
    # B = 0: the adapted model is the base with the TRAINED head (not the base's)
    full = jax.jit(lambda p: objective_loss(Objective(name="reward"), graphdef, p, {}, batch))(
        {**base, "score": trainable["score"]})
    assert float(loss) == pytest.approx(float(full[0]), rel=1e-6)
    assert float(jnp.abs(grads["score"]).max()) > 0 and float(jnp.abs(grads["layers"]["wq"]["b"]).max()) > 0
    merged = merge_trained(base, trainable, lc.scale)
    np.testing.assert_array_equal(np.asarray(merged["score"]), np.asarray(trainable["score"]))


def test_score_head_config():
    assert "head" not in ModelConfig().to_dict()  # a language model's config.json is unchanged
    assert CFG.to_dict()["head"] == "score" and ModelConfig.from_dict(CFG.to_dict()) == CFG
    assert CFG.num_params() == ModelConfig(**{**CFG.to_dict(), "head": "lm", "tie_embeddings": True}).num_params() + 16
    with pytest.raises(ValueError, match="head='value'"):
        ModelConfig(head="value")
    with pytest.raises(ValueError, match="head=score: a reward model has no int8 path"):
        dataclasses.replace(CFG, quantization="int8")
    hf = to_hf_config(CFG)
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and from_hf_config(hf).head == "score"
    with pytest.raises(ValueError, match="config.json: LlamaForSequenceClassification with 3 labels"):
        from_hf_config({**hf, "id2label": {"0": "a", "1": "b", "2": "c"}})
    params = init_params(CFG, 0)
    assert params["score"].shape == (16, 1) and "lm_head" not in params
    with pytest.raises(ValueError, match="no output layer"):
        abstract_model(CFG).output_weight()
