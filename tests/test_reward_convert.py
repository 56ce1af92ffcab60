"""Reward checkpoints (model head `score`) through every converter, against transformers and peft 0.21.2.

hf: a LlamaForSequenceClassification(num_labels=1) directory converts to a reward checkpoint whose rewards
are transformers' (float32, 1e-4; tied and untied; a right-padded batch), HF -> jax -> HF is bit-exact
(every tensor, the config keys that matter, the pad id the source recorded), and a reward checkpoint that
records no pad id is written with the documented one (not BOS/EOS), which transformers then uses.
peft: a LoRA reward workdir (adapters + its trained `score`) exports as peft's SEQ_CLS adapter (config and
tensor names exactly peft's own), which peft loads onto the transformers reward model, or onto the
language model it started from, giving our rewards; `--from peft` reads it back (merged, or as adapters:
the same export again, bit for bit). meta and int8 refuse a reward model in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from conftest import make_hf_llama
from llama3_jax import cli
from llama3_jax.convert import convert
from llama3_jax.model import lora
from llama3_jax.model.config import ModelConfig, default_pad_id
from llama3_jax.model.llama import abstract_model
from llama3_jax.store import checkpoint

peft = pytest.importorskip("peft")

PAD = 7  # the pad id the source reward model records
LENGTHS = np.array([19, 6, 1])
RANK, ALPHA = 4, 8.0


def _tokens(avoid: int) -> np.ndarray:
    """A right-padded (3, 19) batch of LENGTHS rows, padded with `avoid`, which no row contains."""
    rng = np.random.default_rng(0)
    t = rng.integers(3, 211, (len(LENGTHS), LENGTHS.max()))
    t = np.where(t == avoid, avoid + 1 if avoid + 1 < 211 else 3, t)
    return np.where(np.arange(LENGTHS.max())[None] < LENGTHS[:, None], t, avoid)


def hf_rewards(model, pad: int) -> np.ndarray:
    """transformers' rewards (B,): each row read at its last token that is not `pad`."""
    tokens = _tokens(pad)
    mask = (np.arange(tokens.shape[1])[None] < LENGTHS[:, None]).astype(np.int64)
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0].float().numpy()


def our_rewards(cfg: ModelConfig, params: dict, pad: int) -> np.ndarray:
    """Our model's per-position rewards (B, T, 1) read at each row's last token."""
    model = abstract_model(dataclasses.replace(cfg, dtype="float32"))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    tokens = _tokens(pad)
    valid = (np.arange(tokens.shape[1])[None] < LENGTHS[:, None]).astype(np.int32)
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    out, _ = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(valid))
    return np.asarray(out)[np.arange(len(LENGTHS)), LENGTHS - 1, 0]


def make_hf_reward_model(path: Path, *, tie: bool = False, pad: int | None = PAD, seed: int = 0):
    """A random LlamaForSequenceClassification(num_labels=1) saved to `path` (GQA: 4 heads, 2 KV heads)."""
    from transformers import LlamaForSequenceClassification
    causal = make_hf_llama(tie=tie, seed=seed)
    cfg = copy.deepcopy(causal.config)
    cfg.num_labels, cfg.pad_token_id = 1, pad
    torch.manual_seed(seed + 1)
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def rm(tmp_path_factory) -> Path:
    """d/hf (a transformers reward model, pad id PAD), d/jax (it, `--from hf`), d/back (d/jax `--to hf`)."""
    d = tmp_path_factory.mktemp("reward_convert")
    make_hf_reward_model(d / "hf")
    convert(d / "hf", d / "jax", src_format="hf", dst_format="jax", progress=False)
    convert(d / "jax", d / "back", src_format="jax", dst_format="hf", progress=False)
    return d


# ------------------------------------------------------------------------------------------------- hf


@pytest.mark.parametrize("tie", [False, True])
def test_hf_reward_model_converts_to_our_rewards(tmp_path, tie):
    ref = make_hf_reward_model(tmp_path / "hf", tie=tie, seed=int(tie))
    convert(tmp_path / "hf", tmp_path / "jax", src_format="hf", dst_format="jax", progress=False)
    cfg, params = checkpoint.restore_params(tmp_path / "jax")
    assert cfg.head == "score" and cfg.tie_embeddings == tie
    assert params["score"].shape == (40, 1) and "lm_head" not in params
    np.testing.assert_allclose(our_rewards(cfg, params, PAD), hf_rewards(ref, PAD), atol=1e-4, rtol=0)


def test_hf_jax_hf_round_trip_is_bit_exact(rm):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    src, back = load_file(rm / "hf" / "model.safetensors"), load_file(rm / "back" / "model.safetensors")
    assert sorted(src) == sorted(back) and back["score.weight"].shape == (1, 40)
    for name in src:
        assert src[name].dtype == back[name].dtype and np.array_equal(src[name].view(np.uint8),
                                                                       back[name].view(np.uint8)), name
    a, b = AutoConfig.from_pretrained(rm / "hf"), AutoConfig.from_pretrained(rm / "back")
    keys = ["architectures", "num_labels", "pad_token_id", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
            "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"]
    assert {k: getattr(b, k) for k in keys} == {k: getattr(a, k) for k in keys}
    assert b.architectures == ["LlamaForSequenceClassification"] and b.num_labels == 1 and b.pad_token_id == PAD
    raw = json.loads((rm / "back" / "config.json").read_text())
    assert raw["pad_token_id"] == PAD and raw["architectures"] == ["LlamaForSequenceClassification"]
    recorded = json.loads((rm / "jax" / "config.json").read_text())["source"]
    assert recorded["pad_token_id"] == PAD
    ref = AutoModelForSequenceClassification.from_pretrained(rm / "hf")
    assert np.array_equal(hf_rewards(AutoModelForSequenceClassification.from_pretrained(rm / "back"), PAD),
                          hf_rewards(ref, PAD))


def test_an_hf_reward_model_reads_on_the_fly_as_its_conversion(rm):
    from llama3_jax.convert.load import restore_params_any
    cfg, streamed = restore_params_any(rm / "hf")
    _, converted = checkpoint.restore_params(rm / "jax")
    assert cfg.head == "score"
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), streamed, converted)


def test_default_pad_id_is_never_bos_or_eos():
    assert default_pad_id(ModelConfig()) == 128004  # Llama 3's <|finetune_right_pad_id|>
    from llama3_jax.tokenizer import ByteTokenizer
    byte = ModelConfig(vocab_size=262, bos_id=256, eos_ids=(257, 260))
    assert default_pad_id(byte) == 261 and 261 >= ByteTokenizer.n_words  # an id the byte tokenizer never emits
    assert default_pad_id(dataclasses.replace(byte, eos_ids=(257, 260, 261))) == 259  # the highest id left


def test_a_reward_checkpoint_without_a_pad_id_gets_the_documented_one(tmp_path):
    """Trained here (no hf source): `--to hf` writes pad id vocab - 1 (not BOS 1 / EOS 2 of the tiny vocab),
    and transformers, reading rows padded with it, gives our rewards."""
    from transformers import AutoModelForSequenceClassification
    cfg = ModelConfig(vocab_size=211, dim=40, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=10,
                      intermediate_size=72, max_seq_len=128, bos_id=1, eos_ids=(2,), head="score")
    rng = np.random.default_rng(1)  # numpy draws: jax.random compiles on every CPU call
    params = jax.tree.map(lambda a: (1.0 if a.ndim == 1 else 0.1) * rng.standard_normal(a.shape, np.float32) + (
        a.ndim == 1), checkpoint.abstract_params(cfg))
    checkpoint.save_params(tmp_path / "jax", cfg, jax.tree.map(jnp.asarray, params))
    convert(tmp_path / "jax", tmp_path / "hf", src_format="jax", dst_format="hf", progress=False)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["pad_token_id"] == 210 and raw["architectures"] == ["LlamaForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == 210
    np.testing.assert_allclose(hf_rewards(hf, 210), our_rewards(cfg, params, 210), atol=1e-4, rtol=0)


def test_meta_and_int8_refuse_a_reward_model_in_one_line(rm, tmp_path, capsys):
    err = one_line_error(capsys, ["convert", "--from", "jax", "--to", "meta", str(rm / "jax"), str(tmp_path / "m")])
    assert "a reward model (head score): Meta's format has no score head" in err and str(rm / "jax") in err
    err = one_line_error(capsys, ["convert", "--from", "hf", "--to", "jax", str(rm / "hf"), str(tmp_path / "q"),
                                  "--quantize", "int8", "--quiet"])
    assert "a reward model (head score): --quantize int8" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()
    assert not list(tmp_path.iterdir())  # no temp directory left either


# ----------------------------------------------------------------------------------------------- peft


def lora_reward_workdir(path: Path, base: Path, cfg: ModelConfig) -> tuple[dict, np.ndarray]:
    """A LoRA reward workdir as training leaves one (store/checkpoint.py adapter_target: params
    {"layers": adapters, "score": the trained head}, config.json's `lora` naming `base`), with
    random adapters (B != 0) and head; returns (adapters, head)."""
    lc = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=("wq", "wv", "w_down"))
    rng = np.random.default_rng(5)  # numpy draws: jax.random compiles on every CPU call
    ad = {"layers": {n: {k: 0.1 * rng.standard_normal(shape, np.float32) for k, (shape, _) in s.items()}
                     for n, s in lora.specs(cfg, lc).items()}}
    head = rng.standard_normal((cfg.dim, 1), np.float32)
    checkpoint.save_params(path, cfg, jax.tree.map(jnp.asarray, {**ad, "score": head}),
                           lora_record=lora.config_record(lc, str(base)))
    return ad, head


def merged_by_hand(base_params: dict, adapters: dict, head: np.ndarray) -> dict:
    """base + alpha/r * A B per adapted weight (numpy, float32), the trained head in place of the base's."""
    out = {k: np.asarray(v) for k, v in base_params.items() if k not in ("layers", "lm_head", "score")}
    out["layers"] = {k: np.asarray(v) for k, v in base_params["layers"].items()}
    for name, ab in adapters["layers"].items():
        a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
        delta = np.stack([np.tensordot(a[i], b[i], 1) for i in range(a.shape[0])])
        out["layers"][name] = out["layers"][name] + (ALPHA / RANK) * delta
    out["score"] = head
    return out


def peft_own(tmp_path: Path, base_hf: Path) -> Path:
    """What peft itself saves for the same settings: a SEQ_CLS LoRA on the transformers reward model."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(base_hf)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "peft_own")
    return tmp_path / "peft_own"


@pytest.fixture(scope="module")
def lora_rm(rm) -> Path:
    """rm/wd: a LoRA reward workdir on rm/jax; rm/peft: its `--to peft` export."""
    cfg = checkpoint.load_config(rm / "jax")
    lora_reward_workdir(rm / "wd", rm / "jax", cfg)
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(rm / "wd"), str(rm / "peft")]) == 0
    return rm


def test_peft_export_is_peft_own_seq_cls_adapter(lora_rm, tmp_path):
    own = peft_own(tmp_path, lora_rm / "hf")
    ours = json.loads((lora_rm / "peft" / "adapter_config.json").read_text())
    theirs = json.loads((own / "adapter_config.json").read_text())
    assert ours["task_type"] == "SEQ_CLS" and "score" in ours["modules_to_save"]
    assert ours == theirs | {"target_modules": sorted(theirs["target_modules"])}
    a, b = load_file(lora_rm / "peft" / "adapter_model.safetensors"), load_file(own / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert a["base_model.model.score.weight"].shape == (1, 40)


def test_peft_loads_our_export_and_gives_our_rewards(lora_rm):
    from peft import AutoPeftModelForSequenceClassification
    cfg = checkpoint.load_config(lora_rm / "wd")
    _, base = checkpoint.restore_params(lora_rm / "jax")
    lc = lora.from_record(json.loads((lora_rm / "wd" / "config.json").read_text())["lora"])
    trained = checkpoint.restore_adapters(lora_rm / "wd", cfg, lc)
    ours = our_rewards(cfg, merged_by_hand(base, trained, np.asarray(trained["score"])), PAD)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(lora_rm / "peft")  # nothing else given
    np.testing.assert_allclose(hf_rewards(loaded, PAD), ours, atol=1e-4, rtol=0)
    # and our merged reading of the workdir (store/checkpoint.py) agrees
    _, merged = checkpoint.restore_params(lora_rm / "wd")
    np.testing.assert_allclose(our_rewards(cfg, merged, PAD), ours, atol=1e-5, rtol=0)


def test_peft_reward_adapter_reads_back(lora_rm, tmp_path):
    """Merged (`--from peft --to hf`: transformers gives peft's rewards) and kept as adapters (`--keep-adapters`,
    then `--to peft` again: the same files, bit for bit)."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification
    peft_dir, hf_base = lora_rm / "peft", lora_rm / "hf"
    assert cli.main(["convert", "--from", "peft", "--to", "hf", str(peft_dir), str(tmp_path / "merged"),
                     "--base", str(hf_base), "--quiet"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.pad_token_id == PAD  # the base's recorded pad id, kept
    np.testing.assert_allclose(hf_rewards(merged, PAD),
                               hf_rewards(AutoPeftModelForSequenceClassification.from_pretrained(peft_dir), PAD),
                               atol=1e-5, rtol=0)
    assert cli.main(["convert", "--from", "peft", "--to", "jax", str(peft_dir), str(tmp_path / "kept"),
                     "--base", str(lora_rm / "jax"), "--keep-adapters", "--quiet"]) == 0
    assert checkpoint.load_config(tmp_path / "kept").head == "score"
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(tmp_path / "kept"), str(tmp_path / "again")]) == 0
    first, again = load_file(peft_dir / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(first) == sorted(again) and all(np.array_equal(first[k], again[k]) for k in first)


def test_a_lora_reward_model_on_a_language_model_base(tmp_path):
    """A reward LoRA started from a language model (its base has an output layer, no score): peft loads
    the export onto LlamaForSequenceClassification(base, num_labels=1, pad_token_id) with our rewards, and
    `--from peft` onto the language model makes a reward model (head score, no lm_head)."""
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification
    make_hf_llama(tmp_path / "lm", seed=3)
    convert(tmp_path / "lm", tmp_path / "lm_jax", src_format="hf", dst_format="jax", progress=False)
    base_cfg, base = checkpoint.restore_params(tmp_path / "lm_jax")
    cfg = dataclasses.replace(base_cfg, head="score")
    adapters, head = lora_reward_workdir(tmp_path / "wd", tmp_path / "lm_jax", cfg)
    assert cli.main(["convert", "--from", "jax", "--to", "peft", str(tmp_path / "wd"), str(tmp_path / "peft")]) == 0
    ours = our_rewards(cfg, merged_by_hand(base, adapters, head), PAD)
    onto = LlamaForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1, pad_token_id=PAD)
    loaded = PeftModel.from_pretrained(onto, tmp_path / "peft")
    np.testing.assert_allclose(hf_rewards(loaded, PAD), ours, atol=1e-4, rtol=0)
    convert(tmp_path / "peft", tmp_path / "rm", src_format="peft", dst_format="jax", base=str(tmp_path / "lm"),
            progress=False)
    rm_cfg, rm_params = checkpoint.restore_params(tmp_path / "rm")
    assert rm_cfg.head == "score" and "lm_head" not in rm_params
    np.testing.assert_array_equal(np.asarray(rm_params["score"]), head)
    np.testing.assert_allclose(our_rewards(rm_cfg, rm_params, PAD), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("edit,message", [
    ("two_labels", "base_model.model.score.weight has shape (2, 40), expected (1, 40)"),
    ("no_head", "missing tensor base_model.model.score.weight"),
    ("other_module", "modules_to_save: ['lm_head', 'score'] is not supported"),
])
def test_a_bad_reward_adapter_is_one_line(lora_rm, tmp_path, capsys, edit, message):
    from safetensors.numpy import save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((lora_rm / "peft" / "adapter_config.json").read_text())
    tensors = load_file(lora_rm / "peft" / "adapter_model.safetensors")
    if edit == "two_labels":
        tensors["base_model.model.score.weight"] = np.concatenate([tensors["base_model.model.score.weight"]] * 2)
    elif edit == "no_head":
        del tensors["base_model.model.score.weight"]
    else:
        config["modules_to_save"] = ["lm_head", "score"]
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["convert", "--from", "peft", "--to", "jax", str(bad), str(tmp_path / "out"),
                                  "--base", str(lora_rm / "hf"), "--quiet"])
    assert message in err and str(bad) in err, err
    assert not (tmp_path / "out").exists()
