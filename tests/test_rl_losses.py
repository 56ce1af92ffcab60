"""GRPO and PPO losses (train/grpo_loss.py, train/ppo_loss.py) against TRL.

GRPO: TRL 1.16's own ``GRPOTrainer._compute_loss`` runs on the same log-probs (its model forward,
``_get_per_token_logps_and_entropies``, is replaced by a lookup of the given log-prob tensor; every
line of the loss is TRL's, on a real single-process ``accelerate.Accelerator``), microbatched with
gradient accumulation as its trainer runs it; the advantages are a transcription of its inline code.
PPO: TRL 1.16 has no PPOTrainer, so its math is transcribed line by line in torch from TRL v0.19.0
(commit 5b3ea9dd43b526f188ef8f63ca16bbe977ec8603, trl/trainer/ppo_trainer.py, trl/core.py; line
ranges cited at each function). Values and gradients w.r.t. the log-probs (and values) must agree to
float32 tolerance.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
from accelerate import Accelerator  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from llama3_jax.train import grpo_loss, ppo_loss  # noqa: E402

G, N, T = 4, 12, 9  # generations per prompt, completion rows (3 groups), completion positions
MICRO = 4  # rows per microbatch (TRL's per_device_train_batch_size)
ACCELERATOR = Accelerator(cpu=True)


def close(ours, theirs, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs.detach() if hasattr(theirs, "detach") else theirs),
                               rtol=rtol, atol=atol)


def rollout(seed: int):
    """Random log-probs, rewards with a constant group and an unscorable row, completion lengths with
    a full-length (truncated) row."""
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, (N, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.25, (N, T))).astype(np.float32)  # ratios on both sides of the clip
    ref = (logps + rng.normal(0, 0.3, (N, T))).astype(np.float32)
    entropies = rng.uniform(0, 4, (N, T)).astype(np.float32)
    per_func = rng.normal(0, 1, (N, 2)).astype(np.float32)
    per_func[4:8] = [1.0, 0.5]  # group 2: zero std
    per_func[1, 0] = np.nan  # one function did not apply
    per_func[9] = np.nan  # no function applied: unscorable
    lengths = rng.integers(1, T, N)
    lengths[[2, 7]] = T  # hit max_completion_length
    truncated = lengths == T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    return dict(logps=logps, old=old, ref=ref, entropies=entropies, per_func=per_func, lengths=lengths,
                truncated=truncated, mask=mask)


def trl_advantages(per_func, weights, scale_rewards):
    """trl/trainer/grpo_trainer.py (TRL 1.16.0) lines 2759-2794 and 2818-2830, sum_then_normalize."""
    rewards_per_func, num_generations = torch.tensor(per_func), G
    reward_weights = torch.tensor(weights)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    advantages = torch.nan_to_num(advantages, nan=0.0)
    metrics = {}
    for i, name in enumerate(["f", "g"]):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i]).item()
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = nanstd(rewards).item()
    metrics["frac_reward_zero_std"] = is_std_zero.float().mean().item()
    return advantages, metrics


def trl_trainer(loss_type, beta, micro_steps, logps_leaf, entropies):
    """What GRPOTrainer._compute_loss reads of `self`, TRL 1.16's defaults for the rest; its forward
    returns rows of the given leaf tensors (the row index rides in prompt_ids)."""
    def forward(model, input_ids, attention_mask, logits_to_keep, **_):
        rows = input_ids[:, 0]
        return logps_leaf[rows], entropies[rows], None
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=micro_steps)
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=forward, aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, args=args,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=micro_steps, max_completion_length=T, accelerator=ACCELERATOR,
        _entropy_bonus_enabled=False, _metrics={"train": {}, "eval": {}})


def trl_grpo(r, advantages, loss_type, beta, use_old, mask, micro):
    """TRL's loss accumulated over microbatches of `micro` rows, the gradient w.r.t. the log-probs,
    and its metrics (per-microbatch lists)."""
    logps = torch.tensor(r["logps"], requires_grad=True)
    steps = N // micro
    trainer = trl_trainer(loss_type, beta, steps, logps, torch.tensor(r["entropies"]))
    trainer._metrics = {"train": collections.defaultdict(list)}
    mask_t = torch.tensor(mask)
    num_items = mask_t.sum()  # lines 2497-2498: gathered loss_mask.sum() of the generation batch
    total = 0.0
    for start in range(0, N, micro):
        rows = torch.arange(start, start + micro)
        inputs = {"prompt_ids": rows[:, None], "prompt_mask": torch.ones(micro, 1, dtype=torch.long),
                  "completion_ids": torch.zeros(micro, T, dtype=torch.long), "completion_mask": mask_t[rows],
                  "advantages": advantages[rows], "num_items_in_batch": num_items,
                  "old_per_token_logps": torch.tensor(r["old"])[rows] if use_old else None,
                  "ref_per_token_logps": torch.tensor(r["ref"])[rows]}
        loss = GRPOTrainer._compute_loss(trainer, None, inputs)
        loss.backward()
        total = total + loss.detach()
    return total, logps.grad, trainer._metrics["train"]


def ours_grpo(r, advantages, loss_type, beta, use_old, mask, micro, local_batch):
    """Our loss over microbatches of `micro` rows, summed and divided once, with its gradient."""
    def total(logps):
        sums, counts, metrics = 0.0, 0.0, None
        for s in range(0, N, micro):
            rows = slice(s, s + micro)
            loss_sum, count, m = grpo_loss.grpo_token_loss(
                logps[rows], jnp.asarray(r["old"][rows]) if use_old else None, jnp.asarray(r["ref"][rows]),
                advantages[rows], jnp.asarray(mask[rows]), beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                loss_type=loss_type, max_completion_length=T, local_batch=local_batch,
                entropies=jnp.asarray(r["entropies"][rows]))
            sums, counts = sums + loss_sum, counts + count
            metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
        return sums / counts, grpo_loss.finish_grpo_metrics(metrics)
    (loss, metrics), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(r["logps"]))
    return loss, grad, metrics


CASES = list(itertools.product(grpo_loss.LOSS_TYPES, grpo_loss.SCALE_REWARDS))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}-{b}" for a, b in CASES])
def test_grpo_loss_and_gradient_equal_trl(case):
    """Each loss_type x scale_rewards (beta 0 / 0.04, num_iterations 1 / >1 and mask_truncated_completions
    alternating): advantages and reward metrics equal TRL's; the loss and its gradient w.r.t. the
    log-probs equal TRL's _compute_loss accumulated over 3 microbatches, for ours over the whole
    batch and over the same microbatches alike; metrics equal TRL's for one microbatch."""
    loss_type, scale = CASES[case]
    beta, use_old, mask_truncated = (0.0, 0.04)[case % 2], case % 3 != 0, case % 4 >= 2
    r = rollout(case)
    weights = [1.0, 0.5]
    adv_t, reward_metrics_t = trl_advantages(r["per_func"], weights, scale)
    adv = grpo_loss.group_advantages(grpo_loss.combine_rewards(r["per_func"], weights), G, scale)
    close(adv, adv_t, rtol=1e-5, atol=1e-5)
    ours_rm = grpo_loss.reward_metrics(r["per_func"], ["f", "g"], G, scale, weights)
    assert ours_rm.keys() == reward_metrics_t.keys()
    for k, v in reward_metrics_t.items():
        close(ours_rm[k], v)
    # lines 2488-2494: truncated completions leave the loss mask
    mask_t = torch.tensor(r["mask"]) * (~torch.tensor(r["truncated"])).unsqueeze(1).int() if mask_truncated \
        else torch.tensor(r["mask"])
    mask = np.asarray(grpo_loss.loss_mask(jnp.asarray(r["mask"]), r["truncated"], mask_truncated))
    close(mask, mask_t, atol=0)
    args = (r, adv_t, loss_type, beta, use_old, mask)
    loss_t, grad_t, _ = trl_grpo(*args, micro=MICRO)
    ours_args = (r, jnp.asarray(adv_t.numpy()), loss_type, beta, use_old, mask)
    for micro in (N, MICRO):  # whole batch, and TRL's microbatches
        loss, grad, _ = ours_grpo(*ours_args, micro=micro, local_batch=MICRO)
        close(loss, loss_t)
        close(grad, grad_t)
    _, _, metrics_t = trl_grpo(*args, micro=N)
    _, _, metrics = ours_grpo(*ours_args, micro=N, local_batch=None)
    names = [n for n in grpo_loss.GRPO_METRICS if n != "kl" or beta]
    assert set(metrics) == set(names) and set(names) <= set(metrics_t)
    for name in names:
        close(metrics[name], metrics_t[name][0])


def test_entropy_and_completion_metrics_equal_trl():
    """entropy_from_logits is TRL's; completions/* as TRL logs them (grpo_trainer.py lines 2295-2304:
    length of the ids incl. EOS, clipped = last id not EOS/pad)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 5, 37)).astype(np.float32)
    close(grpo_loss.entropy_from_logits(jnp.asarray(logits)), trl_entropy_from_logits(torch.tensor(logits)))
    eos, pad = 7, 0
    completion_ids = [[3, 4, eos], [5, 6, 8, 9], [eos], [1, 2, 3, 4]]
    lengths = torch.tensor([len(ids) for ids in completion_ids])
    is_truncated = torch.tensor([ids[-1] not in [eos, pad] for ids in completion_ids])
    ours = grpo_loss.completion_metrics(lengths.numpy(), is_truncated.numpy())
    close(ours["completions/mean_length"], lengths.float().mean())
    close(ours["completions/max_length"], lengths.float().max())
    close(ours["completions/clipped_ratio"], is_truncated.float().mean())


def test_grpo_config_has_trl_defaults_and_one_line_errors():
    """Defaults equal TRL 1.16's GRPOConfig; every bad value is refused in one line naming its key."""
    theirs = trl.GRPOConfig(output_dir="/tmp/unused-grpo", report_to=[], use_cpu=True)
    ours = grpo_loss.GRPOConfig()
    for f in dataclasses.fields(ours):
        if f.name not in ("reward_funcs", "reward_weights"):
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert grpo_loss.GRPOConfig(scale_rewards=False).scale_rewards == "none"  # TRL's boolean spelling
    assert ours.clip_range == (0.2, 0.2) and grpo_loss.GRPOConfig(epsilon_high=0.28).clip_range == (0.2, 0.28)
    bad = {"loss_type": "ppo", "scale_rewards": "max", "num_generations": 1, "beta": -1.0, "epsilon": 0.0,
           "num_iterations": 0, "top_p": 0.0, "temperature": 0.0, "max_completion_length": 0}
    for key, value in bad.items():
        with pytest.raises(ValueError) as e:
            grpo_loss.GRPOConfig(**{key: value})
        assert "\n" not in str(e.value) and str(e.value).startswith(f"grpo.{key}=")
    with pytest.raises(ValueError, match="2 values for 1 reward_funcs"):
        grpo_loss.GRPOConfig(reward_funcs=("m:f",), reward_weights=(1.0, 2.0))


# ---- PPO: TRL v0.19.0 trl/trainer/ppo_trainer.py, transcribed ----
INVALID_LOGPROB = 1.0  # ppo_trainer.py line 81


def masked_mean(values, mask):  # trl/core.py v0.19.0 lines 43-48
    return (values * mask).sum() / mask.sum()


def masked_whiten(values, mask, shift_mean=True):  # trl/core.py v0.19.0 lines 51-76
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * (mask.sum() / (mask.sum() - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def trl_ppo_targets(p, args):
    """ppo_trainer.py lines 492-535: penalty, masks, rewards, whitening, GAE."""
    logprobs, ref_logprobs = torch.tensor(p["logps"]), torch.tensor(p["ref"])
    values, scores = torch.tensor(p["values"]), torch.tensor(p["scores"])
    sequence_lengths = torch.tensor(p["lengths"]) - 1  # index of the last token (first pad - 1)
    contain_eos_token = torch.tensor(p["has_eos"])
    if args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= args.missing_eos_penalty
    response_idxs = torch.arange(T).repeat(N, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[(actual_start, actual_end)] += scores  # TRL: rewards[[...]], the same advanced index
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    metrics = {  # lines 618-631
        "objective/kl": kl.sum(1).mean(), "objective/entropy": (-logprobs).sum(1).mean(),
        "objective/non_score_reward": non_score_reward.sum(1).mean(),
        "objective/rlhf_reward": non_score_reward.sum(1).mean() + scores.mean(), "objective/scores": scores.mean()}
    return dict(logprobs=logprobs, values=values, returns=returns, advantages=advantages, padding_mask=padding_mask,
                padding_mask_p1=padding_mask_p1, metrics=metrics)


def trl_ppo_update(p, tg, args, micro):
    """ppo_trainer.py lines 555-605, one epoch over one mini batch in order, `micro` rows per
    microbatch; accelerator.backward divides by the accumulation steps. Returns the accumulated loss,
    gradients w.r.t. the new log-probs and values, and the stats averaged as lines 633-639 do."""
    new = torch.tensor(p["new_logps"], requires_grad=True)
    vpred_leaf = torch.tensor(p["vpred"], requires_grad=True)
    steps, total, stats = N // micro, 0.0, {k: [] for k in ppo_loss.PPO_METRICS[5:]}
    for s in range(0, N, micro):
        i = torch.arange(s, s + micro)
        mb_advantage, mb_logprobs = tg["advantages"][i], tg["logprobs"][i]
        mb_return, mb_values = tg["returns"][i], tg["values"][i]
        new_logprobs = torch.masked_fill(new[i], tg["padding_mask"][i], INVALID_LOGPROB)
        vpred = torch.masked_fill(vpred_leaf[i], tg["padding_mask_p1"][i], 0)
        vpredclipped = torch.clamp(vpred, mb_values - args.cliprange_value, mb_values + args.cliprange_value)
        vf_losses1 = torch.square(vpred - mb_return)
        vf_losses2 = torch.square(vpredclipped - mb_return)
        vf_loss_max = torch.max(vf_losses1, vf_losses2)
        vf_loss = 0.5 * masked_mean(vf_loss_max, ~tg["padding_mask_p1"][i])
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~tg["padding_mask_p1"][i])
        logprobs_diff = new_logprobs - mb_logprobs
        ratio = torch.exp(logprobs_diff)
        pg_losses = -mb_advantage * ratio
        pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
        pg_loss_max = torch.max(pg_losses, pg_losses2)
        pg_loss = masked_mean(pg_loss_max, ~tg["padding_mask"][i])
        loss = pg_loss + args.vf_coef * vf_loss
        (loss / steps).backward()
        total = total + loss.detach() / steps
        pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~tg["padding_mask"][i])
        for k, v in zip(ppo_loss.PPO_METRICS[5:], (0.5 * (logprobs_diff**2).mean(), pg_clipfrac, pg_loss, vf_loss,
                                                     vf_clipfrac, ratio.mean())):
            stats[k].append(v.detach())
    return total, new.grad, vpred_leaf.grad, {k: torch.stack(v).mean() for k, v in stats.items()}


def ppo_rollout(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T, N)
    lengths[[3, 8]] = T  # fill every position: no EOS, score on the last token
    f = lambda *shape: rng.normal(0, 1, shape).astype(np.float32)  # noqa: E731
    logps = -rng.uniform(0.05, 3.0, (N, T)).astype(np.float32)
    return dict(lengths=lengths, has_eos=lengths < T, scores=f(N), values=f(N, T), logps=logps,
                ref=(logps + 0.3 * f(N, T)), new_logps=(logps + 0.3 * f(N, T)), vpred=f(N, T))


@pytest.mark.parametrize("variant", [0, 1])
def test_ppo_targets_and_losses_equal_trl(variant):
    """Rewards with the KL penalty and the score at the end, missing_eos_penalty, whitening and GAE,
    then the clipped policy and value losses (and gradients w.r.t. log-probs and values) and every
    PPO metric equal the transcription of TRL v0.19's PPOTrainer, for TRL's microbatches of 4 rows
    and for ours over the whole batch with local_batch 4. Variant 0: TRL's defaults, k1; variant 1:
    k3, whiten_rewards, missing_eos_penalty, gamma 0.9, lam 0.8."""
    cfg = ppo_loss.PPOConfig() if variant == 0 else ppo_loss.PPOConfig(
        kl_estimator="k3", whiten_rewards=True, missing_eos_penalty=1.0, gamma=0.9, lam=0.8)
    p = ppo_rollout(variant)
    tg_t = trl_ppo_targets(p, cfg)
    tg = ppo_loss.ppo_rollout_targets(
        p["scores"], jnp.asarray(p["logps"]), jnp.asarray(p["ref"]), jnp.asarray(p["values"]),
        jnp.asarray(p["lengths"]), p["has_eos"], kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam,
        whiten_rewards=cfg.whiten_rewards, missing_eos_penalty=cfg.missing_eos_penalty)
    for k in ("advantages", "returns", "values"):
        close(tg[k], tg_t[k], atol=1e-5)
    padding = (T - p["lengths"]).mean()  # TRL's entropy counts -INVALID_LOGPROB = -1 per padding position
    close(tg["metrics"]["objective/entropy"], tg_t["metrics"]["objective/entropy"] + padding)
    for k in ppo_loss.PPO_METRICS[:5]:
        if k != "objective/entropy":
            close(tg["metrics"][k], tg_t["metrics"][k])
    loss_t, grad_logps_t, grad_v_t, stats_t = trl_ppo_update(p, tg_t, cfg, micro=MICRO)

    def total(new, vpred):
        loss_sum, count, metrics = ppo_loss.ppo_loss(new, vpred, tg, jnp.asarray(p["logps"]), cliprange=cfg.cliprange,
                                                     cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                                                     local_batch=MICRO)
        return loss_sum / count, {k: v / count for k, v in metrics.items()}
    (loss, stats), (grad_logps, grad_v) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.asarray(p["new_logps"]), jnp.asarray(p["vpred"]))
    close(loss, loss_t)
    close(grad_logps, grad_logps_t)
    close(grad_v, grad_v_t)
    assert set(stats) == set(stats_t)
    for k, v in stats_t.items():
        close(stats[k], v)


def test_gae_and_microbatches_independent_of_the_split():
    """gae equals the textbook recursion written as a Python loop over one row; the GRPO dapo / grpo /
    dr_grpo losses and the PPO loss summed over microbatches of 2, 4, 6 rows equal the whole batch."""
    rng = np.random.default_rng(3)
    r, v = rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    adv, ret = ppo_loss.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), 0.9, 0.7)
    for row in range(2):
        n = int(mask[row].sum())
        expected, a = np.zeros(6, np.float32), 0.0
        for t in reversed(range(n)):
            a = r[row, t] + 0.9 * (v[row, t + 1] if t + 1 < n else 0.0) - v[row, t] + 0.9 * 0.7 * a
            expected[t] = a
        close(adv[row], expected, atol=1e-5)
        close(ret[row], expected + v[row] * mask[row], atol=1e-5)
    d = rollout(5)
    adv = jnp.asarray(rng.normal(size=N).astype(np.float32))
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        def split(micro):
            parts = [grpo_loss.grpo_token_loss(jnp.asarray(d["logps"][s:s + micro]), jnp.asarray(d["old"][s:s + micro]),
                                               jnp.asarray(d["ref"][s:s + micro]), adv[s:s + micro],
                                               jnp.asarray(d["mask"][s:s + micro]), beta=0.04, epsilon_low=0.2,
                                               epsilon_high=0.2, loss_type=loss_type, max_completion_length=T)
                     for s in range(0, N, micro)]
            return sum(p[0] for p in parts) / sum(p[1] for p in parts)
        whole = split(N)
        for micro in (2, 4, 6):
            close(split(micro), whole)
    p = ppo_rollout(2)
    tg = ppo_loss.ppo_rollout_targets(p["scores"], jnp.asarray(p["logps"]), jnp.asarray(p["ref"]),
                                      jnp.asarray(p["values"]), jnp.asarray(p["lengths"]), p["has_eos"], kl_coef=0.05)

    def ppo_split(micro):
        rows = [slice(s, s + micro) for s in range(0, N, micro)]
        parts = [ppo_loss.ppo_loss(jnp.asarray(p["new_logps"][i]), jnp.asarray(p["vpred"][i]),
                                   {k: v[i] for k, v in tg.items() if k != "metrics"}, jnp.asarray(p["logps"][i]),
                                   cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, local_batch=2) for i in rows]
        return sum(q[0] for q in parts) / sum(q[1] for q in parts)
    for micro in (2, 4, 6):
        close(ppo_split(micro), ppo_split(N))
