"""Our GRPO step end to end against TRL 1.16's GRPOTrainer on a real model (issue 21 section 4).

One tiny model: our random init of configs/grpo.yaml's model shape (smaller), exported to Hugging Face
by benchmarks/rl.py's `export_model` (llama3_jax.convert); both sides load that directory. One rollout:
  * prompts: the first batch our PromptIterator draws from the bundled configs/data/grpo_prompts.jsonl;
    TRL gets the same records (a text prompt as one user turn, as ours renders it) and tokenizes them
    itself with benchmarks/rl.py's byte-level HF tokenizer and chat template: its ids must be ours;
  * completions: fixed ids, ending in <|eot_id|> or <|end_of_text|> or cut at max_completion_length,
    of several lengths (so dapo's token mean and grpo's sequence mean differ), handed to our
    GRPO.score as a RolloutBatch and to TRL through its own `rollout_func` hook;
  * rewards: configs/rewards/toy.py:letter_fraction on both sides (TRL calls it itself).
TRL's side is its real code: `_generate_and_score_completions` (reward call, group advantages,
padding, masks), then `compute_loss` with the model's forward at the sampling temperature, then
backward. Ours is the real path: GRPO.score (rewards, advantages, the (B*G, seq_len) batch of rl.py)
and one call of the jitted train step (step.py's grpo branch, Setup.step_fn). The step's gradient is
read from its own output: gradient clipping off and AdamW's b1 = 0, so the first moment after the
update IS the gradient the step applied.
Checked, for loss_type dapo and grpo x scale_rewards group and none, in the packed layout (a prompt
computed once for its G completions, train/grpo_batch.py: what a 1-device run uses) and in two cases
the rows layout (one row per completion), float32: prompt ids, advantages,
reward metrics, loss, entropy, grad_norm (every tensor at once) and the gradients of the embedding
(tied: the output layer's part included), layer 0's q_proj, layer 1's down_proj and the final norm.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from llama3_jax.config_loader import load_yaml_config  # noqa: E402
from llama3_jax.convert.hf import hf_name, to_hf  # noqa: E402
from llama3_jax.data import PromptIterator, corpus_documents  # noqa: E402
from llama3_jax.parallel.sharding import make_mesh  # noqa: E402
from llama3_jax.serve.rollout import RolloutBatch  # noqa: E402
from llama3_jax.train import TrainConfig, build, make_tokenizer, model_config  # noqa: E402
from llama3_jax.train.rl import GRPO  # noqa: E402
from llama3_jax.train.state import start_params  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmarks_rl", ROOT / "benchmarks" / "rl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

B, G, C, SEQ, TEMPERATURE = 2, 4, 6, 96, 0.7
MODEL = ("model={preset: tiny, vocab_size: 262, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 8, "
         "intermediate_size: 48, tie_embeddings: true, max_seq_len: 128}")
A, EOT, EOS = 97, 260, 257
# row r = prompt r // G, generation r % G: stopped ones end in a stop id (kept: TRL's completion_ids),
# truncated ones are exactly C ids long; the letter "a" share varies inside each group
COMPLETIONS = [[A, A, EOT], [98, 99, 100, 101, 102, 103], [A, 32, A, A, 98, A], [EOS],
               [A, 120, EOT], [A, A, A, A, 33, EOS], [121, 122, 123, 124, 125, A], [A, 10, 200, 150, EOT]]
# (our name, layer) -> checked gradient
CHECKED = [("embed", None), ("layers/wq", 0), ("layers/w_down", 1), ("norm", None)]
# grpo_batch.py's packed layout (what a 1-device run takes) in every case, the rows layout in two
CASES = [(*c, "packed") for c in itertools.product(("dapo", "grpo"), ("group", "none"))] + [
    ("dapo", "group", "rows"), ("grpo", "none", "rows")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return bench.export_model(tmp_path_factory.mktemp("grpo_trl") / "hf", [MODEL], seed=3)


def run_config(hf: Path, workdir: Path, loss_type: str, scale: str) -> TrainConfig:
    return load_yaml_config(TrainConfig, str(bench.CONFIG), [
        f"init_from={hf}", "model=null", f"workdir={workdir}", f"batch_size={B}", f"seq_len={SEQ}",
        f"grpo.num_generations={G}", f"grpo.max_completion_length={C}", f"grpo.temperature={TEMPERATURE}",
        f"grpo.loss_type={loss_type}", f"grpo.scale_rewards={scale}", f"data.path={bench.PROMPTS}",
        "optim.clip_norm=0", "optim.b1=0", "optim.warmup_steps=0"])


@pytest.fixture(scope="module")
def steps(model_dir, tmp_path_factory):
    """loss_type -> (cfg, Setup, mesh): one build (one compile) per loss type; the step does not read
    scale_rewards (advantages are computed on the host, GRPO.score), so both scales share it."""
    out = {}
    for loss_type in ("dapo", "grpo"):
        cfg = run_config(model_dir, tmp_path_factory.mktemp("run"), loss_type, "group")
        mesh = make_mesh(1, -1, 1)
        out[loss_type] = (cfg, build(cfg, model_config(cfg), mesh), mesh)
    return out


def ours(model_dir, steps, tmp_path, loss_type, scale, layout):
    """(prompts, GRPO.score's output, the step's metrics, its gradient) for the fixed completions."""
    _, setup, mesh = steps[loss_type]
    cfg = run_config(model_dir, tmp_path, loss_type, scale)
    tok = make_tokenizer(cfg.tokenizer)
    it = PromptIterator(cfg.data, corpus_documents(cfg.data, "prompt"), tokenizer=tok, batch_size=B, seed=cfg.seed,
                        max_prompt_len=SEQ - C)
    prompts = next(it)
    stop = np.array([c[-1] if c[-1] in (EOT, EOS) else -1 for c in COMPLETIONS], np.int32)
    kept = [c[:-1] if s >= 0 else c for c, s in zip(COMPLETIONS, stop)]
    rb = RolloutBatch(prompt_index=np.repeat([p["index"] for p in prompts], G), generation=np.tile(np.arange(G), B),
                      completions=kept, stop_token=stop, lengths=np.array([len(c) for c in kept], np.int32),
                      rollout_seconds=1.0, tokens=sum(map(len, COMPLETIONS)))
    rl = GRPO(cfg, setup, tok, tmp_path, 0)
    assert rl.packed  # a 1-device run's choice
    rl.packed = layout == "packed"
    try:
        scored = rl.score(prompts, rb)
    finally:
        rl.close()
    with jax.set_mesh(mesh):
        state = setup.init_state(cfg.seed, start_params(cfg, setup))
        new, metrics = setup.step_fn(state, setup.put_batch(scored["batch"]))
    moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(new["opt_state"], is_leaf=lambda x: isinstance(x, dict))[0]
               if "mu" in jax.tree_util.keystr(path)]
    assert len(moments) == 1, "expected one AdamW first moment"
    return prompts, scored, jax.device_get(metrics), jax.device_get(moments[0])


def trls(model_dir, prompts, loss_type, scale, workdir):
    """TRL's real trainer on the same prompt records and completions: (its inputs, loss, model, metrics,
    the prompt ids it tokenized)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenized = {}

    def rollout_func(batch_prompts, trainer):  # TRL's hook: our completions, its own prompt ids
        ids = [list(i) for i in trainer._tokenize_prompts(batch_prompts)[0]]
        tokenized["ids"] = ids
        return {"prompt_ids": ids, "completion_ids": COMPLETIONS, "logprobs": None}
    args = bench.trl_config(str(workdir), num_generations=G, max_completion_length=C, per_device_train_batch_size=B * G,
                            temperature=TEMPERATURE, loss_type=loss_type, scale_rewards=scale)
    records = [{**p["columns"], "prompt": [{"role": "user", "content": p["prompt"]}] if isinstance(p["prompt"], str)
                else p["prompt"]} for p in prompts]
    trainer = bench.trl_trainer(model, args, records, rollout_func=rollout_func)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # as Trainer's loop sets it
    inputs = trainer._generate_and_score_completions([r for r in records for _ in range(G)])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return inputs, loss, trainer.model, {k: v[-1] for k, v in trainer._metrics["train"].items()}, tokenized["ids"]


def close(ours_value, theirs, rtol=2e-5, atol=1e-7):
    np.testing.assert_allclose(np.asarray(ours_value, np.float64), np.asarray(theirs, np.float64), rtol=rtol, atol=atol)


@pytest.mark.filterwarnings("ignore:You are using .rollout_func.")
@pytest.mark.parametrize("loss_type,scale,layout", CASES, ids=["-".join(c) for c in CASES])
def test_grpo_step_loss_and_gradient_equal_trls_trainer(model_dir, steps, tmp_path, loss_type, scale, layout):
    prompts, scored, metrics, grads = ours(model_dir, steps, tmp_path / "ours", loss_type, scale, layout)
    inputs, loss, model, trl_metrics, trl_ids = trls(model_dir, prompts, loss_type, scale, tmp_path / "trl")
    assert trl_ids == [p["ids"] for p in prompts for _ in range(G)]  # TRL's tokenizer + template = our rendering
    batch = scored["batch"]
    adv = batch["advantages"].reshape(B * G, -1)[:, 0]  # either layout: (B*G, T) or (B, G*C)
    assert batch["tokens"].shape[0] == (B if layout == "packed" else B * G)
    close(adv, inputs["advantages"].numpy(), atol=1e-6)
    assert np.abs(adv).max() > 0.5  # the groups are not all ties
    for k in ("reward", "reward_std", "rewards/letter_fraction/mean", "frac_reward_zero_std"):
        close(scored["metrics"][k], trl_metrics[k], atol=1e-6)
    assert batch["loss_mask"].sum() == inputs["completion_mask"].sum() == sum(map(len, COMPLETIONS))
    close(metrics["loss"], loss.item(), rtol=1e-4, atol=1e-7)
    close(metrics["entropy"], trl_metrics["entropy"], rtol=1e-5)
    theirs = dict(model.named_parameters())
    close(metrics["grad_norm"], torch.sqrt(sum((p.grad.double() ** 2).sum() for p in theirs.values())).item(),
          rtol=1e-4)
    for name, layer in CHECKED:
        ours_grad = grads[name.split("/")[0]] if layer is None else grads["layers"][name.split("/")[1]][layer]
        hf_grad = theirs[hf_name(name, layer)].grad.numpy()
        scale_of = np.abs(hf_grad).max()
        assert scale_of > 0, name
        close(to_hf(name, ours_grad), hf_grad, rtol=1e-4, atol=1e-5 * scale_of)
