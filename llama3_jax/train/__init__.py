"""`llama3-jax train`: the run config, the pure step, checkpoints, metrics and the loop (one job per file).

    config.py      TrainConfig / MeshConfig, model shape and tokenizer resolution
    objectives.py  the loss of each objective (lm / sft, dpo): (log-probs, batch) -> (loss sum, count, metrics)
    losses.py      chunked cross-entropy and the per-token log-probs the objectives share
    optim.py       optax optimizer and learning-rate schedule from the run config
    step.py        train_step / eval_step under jax.jit, `build` (abstract sharded state)
    numerics.py    non-finite losses and spikes: the in-step skip and the loop's guard
    state.py       training checkpoints (params, optimizer, data iterator, meta)
    metrics.py     metrics.jsonl, TensorBoard, FLOP/s and MFU
    preemption.py  SIGTERM -> save at the next step boundary, every process at the same step
    loop.py        run_train / train: restore, iterate, evaluate, save
    evaluate.py    when to evaluate, and the held-out loss (lm/sft per token, dpo per pair)
    report.py      the end-of-run sample and summary line
    dryrun.py      compile a step for a target topology without it (fit, cost) ...
    roofline.py    ... and its roofline time / MFU bound
"""

from ..model.llama import Llama
from .config import ByteTokenizer, MeshConfig, TrainConfig, make_tokenizer, model_config
from .loop import run_train, train
from .preemption import Preemption
from .metrics import PEAK_FLOPS, MetricsLog, model_flops_per_token, peak_flops
from .state import gather_data_states, restore_state, save_state, this_process_data_state
from .step import Setup, build, eval_step, init_params, loss_and_count, split_microbatches, train_step

__all__ = ["ByteTokenizer", "Llama", "MeshConfig", "MetricsLog", "PEAK_FLOPS", "Preemption", "Setup", "TrainConfig",
           "build", "eval_step", "gather_data_states", "init_params", "loss_and_count", "make_tokenizer",
           "model_config", "model_flops_per_token", "peak_flops", "restore_state", "run_train", "save_state",
           "split_microbatches", "this_process_data_state", "train", "train_step"]
