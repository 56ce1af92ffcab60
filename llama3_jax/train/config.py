"""The run config of `llama3-jax train` (TrainConfig, MeshConfig) and what it resolves to: the model's
shape (a resumed workdir's, init_from's, or `model`) and the tokenizer.

The objective decides the model's head (model/config.py `head`): `reward` trains a scalar `score` head,
every other objective the output layer. A reward run's shape is the stored one with `head: score` (a
base or SFT checkpoint becomes a score target: its trunk is loaded, its output layer dropped, train/
state.py), and a reward checkpoint given to lm/sft/dpo is refused in one line, since it has no output
layer to train (and training a fresh one would silently throw the reward model away)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..store import checkpoint, remote
from ..convert.load import model_config_of
from ..model import lora
from ..model.config import ModelConfig, load_model_config
from ..model.attention import NAMES as ATTENTION_NAMES
from ..data import DataConfig
from ..parallel.distributed import DistributedConfig
from ..model.lora import LoraConfig
from ..model.llama import remat_policy
from .objectives import OBJECTIVES, DPOConfig, RewardConfig
from .grpo_loss import GRPOConfig
from .ppo_loss import PPOConfig
from .optim import OptimConfig
from ..store.paths import is_remote, resolve
from ..tokenizer import ByteTokenizer, load_tokenizer as make_tokenizer  # noqa: F401 (the train API names them)

# objectives whose data are prompts and whose batches are rollouts (train/rl.py, train/ppo.py)
RL_OBJECTIVES = ("grpo", "ppo")


# A model given as keys without a `preset:` base must give all of these (the rest have Llama 3 defaults).
SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: the rest of the devices
    tensor: int = 1
    # slices (TPU multislice, or hosts over the data-center network): data/fsdp/tensor are then per slice
    dcn_data: int = 1
    dcn_fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str = "runs/default"
    # a preset name, or ModelConfig keys: with `preset:` as the base, else every SHAPE_KEYS key;
    # None: the resumed workdir's model, else init_from's, else the "tiny" preset
    model: str | dict | None = dataclasses.field(
        default=None, metadata={"keys": ModelConfig, "extra_keys": ("preset",)})
    init_from: str | None = None  # a jax checkpoint (convert output or a train workdir), or an HF / Meta directory
    # lm (pretraining) | sft (chat records, assistant-only loss) | dpo (preference pairs) |
    # reward (a Bradley-Terry reward model on preference pairs: the model's head is `score`) |
    # grpo (online RL on prompt records: rollouts from the live weights, train/rl.py) |
    # ppo (online RL with a reward model or function, a value model and GAE, train/ppo.py)
    objective: str = "lm"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # rank > 0: train adapters only
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)  # objective grpo (train/rl.py)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)  # objective ppo (train/ppo.py)
    tokenizer: str | None = None  # None: Llama 3's tokenizer.model; a path to one; or "bytes" (UTF-8 bytes)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # several hosts: coordinator_address/num_processes/process_id (else the cluster's, when detected)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    steps: int = 1000
    batch_size: int = 8  # global, in sequences (grpo: prompts, each with grpo.num_generations completions)
    seq_len: int = 512
    grad_accum: int = 1  # microbatches per step (scanned inside the step)
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # none | full | dots | save_qkv_proj | offload (model.remat_policy)
    attention: str = "auto"  # auto | reference | blockwise | splash | cudnn (attention/__init__.py)
    loss_chunk: int = -1  # positions per chunk of the output layer + loss; 0 = whole, -1 = auto (losses.py)
    scan_layers: bool = True
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = no eval
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = False
    sample_prompt: str = "def "
    sample_tokens: int = 32  # 0 = no sample at the end
    # the end-of-run sample: 0 = greedy; > 0 draws (seeded by `seed`) among the `sample_top_k` most likely
    # tokens (0 = all), since greedy decoding of a briefly trained model repeats one token
    sample_temperature: float = 0.0
    sample_top_k: int = 0
    peak_flops: float = 0.0  # per device, for MFU; 0 = PEAK_FLOPS by device kind (CPU: see above)
    progress: bool = True
    nan_policy: str = "stop"  # non-finite loss/grad norm: stop (name the step) | skip the update (numerics.py)
    nan_max_consecutive: int = 10  # skip: stop after more skipped steps than this in a row
    spike_factor: float = 0.0  # > 0: warn when loss > spike_factor x running mean of recent losses
    # compiled programs kept between runs (parallel/compile_cache.py): a directory, "none" = off;
    # None: $JAX_COMPILATION_CACHE_DIR, else $LLAMA3_JAX_COMPILE_CACHE, else ~/.cache/llama3-jax/xla
    compile_cache: str | None = None

    def __post_init__(self):
        for key in ("workdir", "init_from"):  # file:///x -> /x; gs://... checked, made local by train
            object.__setattr__(self, key, resolve(getattr(self, key), key))
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every", "eval_batches")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16 or float32, got {self.compute_dtype!r}")
        remat_policy(self.remat)
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_NAMES)}; got {self.attention!r}")
        if self.loss_chunk < -1:
            raise ValueError(f"loss_chunk must be -1 (auto), 0 (whole) or positive, got {self.loss_chunk}")
        if self.objective not in OBJECTIVES + RL_OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES + RL_OBJECTIVES)}, "
                             f"got {self.objective!r}")
        if self.objective == "grpo":
            self._check_grpo()
        if self.objective == "ppo":
            self._check_ppo()
        if self.lora.rank and not (self.init_from or self.lora.init_from):
            raise ValueError("lora.rank > 0 needs init_from (the base checkpoint the adapters are trained on)")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be stop or skip, got {self.nan_policy!r}")
        if self.nan_max_consecutive < 0:
            raise ValueError(f"nan_max_consecutive must be >= 0, got {self.nan_max_consecutive}")
        if not (self.spike_factor == 0 or self.spike_factor > 1):  # also refuses NaN
            raise ValueError(f"spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        if not self.sample_temperature >= 0:  # also refuses NaN
            raise ValueError(f"sample_temperature must be >= 0 (0 = greedy), got {self.sample_temperature}")
        if self.sample_top_k < 0:
            raise ValueError(f"sample_top_k must be >= 0 (0 = off), got {self.sample_top_k}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        preset = self.model.get("preset") if isinstance(self.model, dict) else self.model
        if preset is not None:
            try:  # an unknown preset is refused here, where the error can name the config file
                load_model_config(preset)
            except ValueError as e:
                raise ValueError(f"model: {e}") from None
        elif isinstance(self.model, dict):
            if missing := [k for k in SHAPE_KEYS if k not in self.model]:
                raise ValueError(f"model: without a `preset:` base every shape key is needed; missing "
                                 f"{', '.join(missing)} (add e.g. `preset: tiny` to take the rest from a preset)")


    def _check_grpo(self) -> None:
        g = self.grpo
        if not g.reward_funcs:
            raise ValueError("objective grpo needs grpo.reward_funcs (MODULE:NAME, path/to/file.py:NAME or model:DIR)")
        for spec in g.reward_funcs:
            where, _, name = spec.rpartition(":")
            if not where or not name:
                raise ValueError(f"grpo.reward_funcs: {spec!r} is not MODULE:NAME, path/to/file.py:NAME or model:DIR")
        if g.max_completion_length >= self.seq_len:
            raise ValueError(f"grpo.max_completion_length {g.max_completion_length} leaves no room for a prompt "
                             f"in seq_len {self.seq_len} (a row holds prompt + completion)")
        if (self.batch_size * g.num_generations) % self.grad_accum:
            raise ValueError(f"batch_size x grpo.num_generations = {self.batch_size * g.num_generations} rows "
                             f"do not split into grad_accum {self.grad_accum} microbatches")


    def _check_ppo(self) -> None:
        """ppo.* against the rest of the run: a reward, room for prompt + completion + the state after
        it in a row, mini batches of whole microbatches, no LoRA dropout (TRL turns dropout off: the
        ratios compare the policy with itself)."""
        p = self.ppo
        if not p.reward_model:
            raise ValueError("objective ppo needs ppo.reward_model (a reward checkpoint DIR or model:DIR, "
                             "MODULE:NAME or path/to/file.py:NAME)")
        if p.max_completion_length >= self.seq_len:
            raise ValueError(f"ppo.max_completion_length {p.max_completion_length} leaves no room for a prompt in "
                             f"seq_len {self.seq_len} (a row holds prompt + completion)")
        if self.batch_size % (p.num_mini_batches * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} does not split into ppo.num_mini_batches "
                             f"{p.num_mini_batches} x grad_accum {self.grad_accum} microbatches")
        if self.lora.dropout:
            raise ValueError(f"lora.dropout {self.lora.dropout}: objective ppo trains without dropout (set it to 0)")


def tokenizer_spec(cfg: TrainConfig) -> str | None:
    """`tokenizer` as a trained checkpoint records it: "bytes", an absolute path, or None (Llama 3's)."""
    if cfg.tokenizer in (None, "bytes"):
        return cfg.tokenizer
    return str(Path(cfg.tokenizer).expanduser().absolute())


def _requested_model(model: str | dict) -> ModelConfig:
    if isinstance(model, str):
        return load_model_config(model)
    keys = dict(model)
    base = load_model_config(keys.pop("preset")).to_dict() if "preset" in keys else {}
    return ModelConfig.from_dict(base | keys, source="model")


def model_config(cfg: TrainConfig, resume_dir: Path | None = None) -> ModelConfig:
    """The model's shape: a resumed workdir's, else init_from's, else `model` (default: the tiny preset);
    dtypes from the run. A `model` given beside a stored one must agree with it: the shape of a
    checkpoint cannot change, and a silently ignored override would be recorded as if it had applied."""
    stored = resume_dir if resume_dir is not None else cfg.init_from
    if stored is None:
        mc = _requested_model("tiny" if cfg.model is None else cfg.model)
    else:
        mc = model_config_of(stored)  # a checkpoint, or an HF / Meta directory (convert/load.py)
        if cfg.model is not None:
            asked = _requested_model(cfg.model)
            # dtypes come from the run; init_from's special-token ids are its tokenizer's, not the preset's
            free = ("dtype", "param_dtype") + (("bos_id", "eos_ids") if resume_dir is None else ())
            if cfg.objective == "reward":  # the run decides the head (below): compare the rest
                asked = dataclasses.replace(asked, head=mc.head)
            differ = [f.name for f in dataclasses.fields(mc)
                      if f.name not in free and getattr(asked, f.name) != getattr(mc, f.name)]
            if differ:
                what = "resuming" if resume_dir is not None else "init_from"
                raise ValueError(
                    f"{what} {stored}: its model has " + ", ".join(f"{k}={getattr(mc, k)!r}" for k in differ)
                    + " but the run config says " + ", ".join(f"model.{k}={getattr(asked, k)!r}" for k in differ)
                    + (" (a workdir's model cannot change: use a new workdir)" if resume_dir is not None
                       else " (drop `model` to take init_from's)"))
    if mc.quantization is not None:  # int8 weights are for generate/score (quant.py): nothing to train
        where = f"{stored}: its model has" if stored is not None else "the run config sets"
        raise ValueError(f"{where} quantization={mc.quantization!r}: training needs float weights "
                         f"(train from the float checkpoint)")
    return dataclasses.replace(_with_head(cfg, mc, stored, resume_dir is not None),
                               dtype=cfg.compute_dtype, param_dtype="float32")


def _with_head(cfg: TrainConfig, mc: ModelConfig, stored, resuming: bool) -> ModelConfig:
    """`mc` with the objective's head: `score` for a reward run (a language model's shape becomes a score
    target), the stored one otherwise; a score head is refused for lm/sft/dpo, and a resumed language
    model for reward (a workdir's model cannot change)."""
    where = f"{'resuming ' if resuming else 'init_from '}{stored}: its model has" if stored is not None \
        else "the run config sets"
    if cfg.objective != "reward":
        if mc.head == "score":
            raise ValueError(f"{where} head='score' (a reward model, no output layer): objective {cfg.objective} "
                             f"trains a language model (use objective=reward, or a language model checkpoint)")
        return mc
    if resuming and mc.head != "score":
        raise ValueError(f"{where} head={mc.head!r} (a language model): objective reward trains a score head "
                         f"(use a new workdir, with this one as init_from)")
    return dataclasses.replace(mc, head="score")


def resolve_lora(cfg: TrainConfig) -> TrainConfig:
    """`lora.init_from=DIR` (a LoRA checkpoint: a LoRA workdir or an imported PEFT adapter) means: train
    DIR's adapters on from where they are. Its record decides the base (`init_from`) and the rank,
    alpha and targets; `lora.dropout` stays the run's. A `lora.rank` or `init_from` that disagrees with
    DIR is refused rather than silently replaced. (`init_from=DIR` instead starts from DIR merged.)"""
    src = cfg.lora.init_from
    if not src:
        return cfg
    if is_remote(src):  # gs://...: the adapters (and their base, lora_base) into the cache, remote.py
        src = remote.fetch(src, "lora.init_from")
    if not checkpoint.is_checkpoint(src):
        raise ValueError(f"lora.init_from {src}: not a llama3-jax checkpoint (no {checkpoint.CONFIG_FILE})")
    adapted = checkpoint.lora_base(src)  # a missing base: one line naming its path
    if adapted is None:
        raise ValueError(f"lora.init_from {src}: not a LoRA checkpoint (its config.json has no 'lora' section; "
                         f"for a full model use init_from)")
    record, base = adapted
    base = record["base"] if is_remote(record["base"]) else str(base)  # a URL stays one (train records it)
    lc = lora.from_record(record)
    if cfg.lora.rank and cfg.lora.rank != lc.rank:
        raise ValueError(f"lora.rank {cfg.lora.rank}: lora.init_from {src} has rank {lc.rank} (drop lora.rank)")
    same = (cfg.init_from == base if is_remote(base) or is_remote(cfg.init_from)
            else Path(cfg.init_from or "").absolute() == Path(base).absolute())
    if cfg.init_from and not same:
        raise ValueError(f"init_from {cfg.init_from}: lora.init_from {src} is on base {base} (drop init_from)")
    return dataclasses.replace(cfg, init_from=base, lora=dataclasses.replace(
        cfg.lora, init_from=src, rank=lc.rank, alpha=lc.alpha, targets=lc.targets))
