"""`llama3-jax train`: the run config, the pure step, checkpoints, metrics and the loop (one job per file).

    config.py      TrainConfig / MeshConfig, model shape and tokenizer resolution
    objectives.py  the loss of each objective (lm / sft, dpo, reward): (log-probs or rewards, batch) -> (loss sum,
                   count, metrics)
    grpo_loss.py   GRPO as TRL 1.16 defines it: group advantages, the per-token clipped loss, its metrics
    grpo_batch.py  a GRPO rollout's update batch: packed (a prompt computed once for its G completions) or rows
    ppo_loss.py    PPO as TRL's PPOTrainer (v0.19) did: KL-penalised rewards, GAE, clipped policy and value losses
    losses.py      chunked cross-entropy and the per-token log-probs the objectives share
    optim.py       optax optimizer and learning-rate schedule from the run config
    step.py        train_step / eval_step under jax.jit, `build` (abstract sharded state)
    numerics.py    non-finite losses and spikes: the in-step skip and the loop's guard
    state.py       training checkpoints (params, optimizer, data iterator, meta), a new run's starting weights
    metrics.py     metrics.jsonl, TensorBoard, FLOP/s and MFU
    preemption.py  SIGTERM -> save at the next step boundary, every process at the same step
    loop.py        run_train / train: restore, iterate, evaluate, save
    evaluate.py    when to evaluate, and the held-out loss (lm/sft per token, dpo and reward per pair)
    report.py      the end-of-run sample (none for a reward model) and summary line
    dryrun.py      compile a step for a target topology without it (fit, cost) ...
    roofline.py    ... and its roofline time / MFU bound
"""

import importlib

# Loaded on first use: `llama3_jax.train.losses` / `.optim` must import without the data pipeline
# (grain) that the loop needs, e.g. benchmarks/gpu_bench.py on a GPU image without grain.
_LAZY = {
    "Llama": "..model.llama",
    "ByteTokenizer": ".config", "MeshConfig": ".config", "TrainConfig": ".config", "make_tokenizer": ".config",
    "model_config": ".config",
    "run_train": ".loop", "train": ".loop",
    "Preemption": ".preemption",
    "PEAK_FLOPS": ".metrics", "MetricsLog": ".metrics", "model_flops_per_token": ".metrics", "peak_flops": ".metrics",
    "gather_data_states": ".state", "restore_state": ".state", "save_state": ".state",
    "this_process_data_state": ".state",
    "Setup": ".step", "build": ".step", "eval_step": ".step", "init_params": ".step", "loss_and_count": ".step",
    "split_microbatches": ".step", "train_step": ".step",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'llama3_jax.train' has no attribute {name!r}")
