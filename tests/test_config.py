"""Presets, exact parameter counts, YAML overrides and the Meta MLP-width rule."""

import dataclasses

import pytest

from llama3_jax import cli
from llama3_jax.model.config import ModelConfig, _meta_ffn_args, from_hf_config, load_model_config, load_yaml_config, meta_ffn_dim, preset_names, to_hf_config


@pytest.mark.parametrize("name,count", [
    ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496), ("llama3.1-405b", 405_853_388_800),
    ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
])
def test_published_parameter_counts(name, count):
    assert load_model_config(name).num_params() == count


def test_num_params_matches_the_model():
    import jax
    from flax import nnx

    from llama3_jax.model.llama import abstract_model
    for name in ("test-small", "llama3.2-1b"):
        cfg = load_model_config(name)
        state = nnx.state(abstract_model(cfg), nnx.Param)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params()


def test_every_published_size_has_a_preset():
    for name in ["llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "llama3.2-1b",
                 "llama3.2-3b", "llama3.3-70b", "tiny"]:
        assert name in preset_names()
    assert load_model_config("llama3.2-1b").rope_scaling.factor == 32.0
    assert load_model_config("llama3.1-8b").rope_scaling.factor == 8.0
    assert load_model_config("llama3-8b").rope_scaling is None
    assert all(load_model_config(n).norm_eps == 1e-5 for n in preset_names())


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match="llama3.1-8b"):
        load_model_config("llama3.1-8")


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b", "llama3.1-405b", "llama3.2-1b", "llama3.2-3b"])
def test_meta_ffn_rule_reproduces_published_widths(name):
    cfg = load_model_config(name)
    multiple_of, mult = _meta_ffn_args(cfg.dim, cfg.intermediate_size)
    assert meta_ffn_dim(cfg.dim, multiple_of, mult) == cfg.intermediate_size


def test_meta_ffn_rule_for_arbitrary_width():
    for dim, ffn in [(40, 72), (64, 100), (4096, 11008)]:
        m, mult = _meta_ffn_args(dim, ffn)
        assert meta_ffn_dim(dim, m, mult) == ffn


@dataclasses.dataclass(frozen=True)
class _Inner:
    data: int = 1
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class _Run:
    steps: int = 10
    lr: float = 1e-3
    mesh: _Inner = _Inner()
    model: ModelConfig | None = None


def test_yaml_overrides_and_unknown_keys(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 5\nmesh: {data: 2}\n")
    run = load_yaml_config(_Run, f, ["mesh.fsdp=4", "lr=3e-4"])
    assert run == _Run(steps=5, lr=3e-4, mesh=_Inner(2, 4))
    with pytest.raises(ValueError, match="did you mean 'mesh.fsdp'"):
        load_yaml_config(_Run, f, ["mesh.fsdb=2"])
    with pytest.raises(ValueError, match="steps"):
        load_yaml_config(_Run, f, ["steps=many"])
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml_config(_Run, f, ["mesh={data: 2"])
    with pytest.raises(ValueError, match="not found"):
        load_yaml_config(_Run, tmp_path / "nope.yaml")


# (YAML file text or None, overrides, the error after "llama3-jax train: error: "; FILE = the YAML file)
CONFIG_ERRORS = [
    ("steps: 5\nstpes: 3\n", [], "FILE: unknown key 'stpes'; did you mean 'steps'?"),
    ("steps: 5\noptim: {lr: 1\n  warmup_steps: 3\n", [], "FILE:3:15: invalid YAML: expected ',' or '}', but got ':'"),
    ("- steps\n- 5\n", ["steps=3"], "FILE: expected a mapping of config keys, got a YAML list"),
    ("model: 5\n", ["steps=3"], "FILE: model: unknown model preset '5' (presets: "),
    ("model: 5\n", ["model.dim=64"], "override 'model.dim=64': 'model' is already 5 (in FILE), not a section of keys"),
    ("optim: {learning_rate: 1.0e-3}\n", [], "FILE: unknown key 'optim.learning_rate'; did you mean 'optim.lr'?"),
    ("steps: 5\n", ["learning_rate=1e-3"], "command line: unknown key 'learning_rate'; did you mean 'optim.lr'?"),
    ("steps: 5\n", ["optim.beta2=0.9"], "command line: unknown key 'optim.beta2'; did you mean 'optim.b2'?"),
    ("model: {dim: 64, n_layers: 1}\n", [], "FILE: model: without a `preset:` base every shape key is needed; "
     "missing vocab_size, n_heads, n_kv_heads, head_dim, intermediate_size (add e.g. `preset: tiny`"),
    ("model: {preset: tiny}\n", ["model.dim=abc"], "command line: model.dim: expected int, got 'abc'"),
    ("model: {preset: tiny, dimm: 3}\n", [], "FILE: unknown key 'model.dimm'; did you mean 'model.dim'?"),
    ("steps: 5\n", ["steps="], "command line: steps: expected int, got nothing"),
    ("optim: {lr: -1}\n", [], "FILE: optim: need lr > 0"),
    ("batch_size: 6\n", ["grad_accum=4"], "FILE: batch_size 6 is not a multiple of grad_accum 4"),
]


@pytest.mark.parametrize("text,overrides,expected", CONFIG_ERRORS,
                         ids=["unknown-top", "yaml-syntax", "yaml-list", "model-5", "model-5-override",
                              "alias-in-section", "alias-across", "alias-beta2", "incomplete-model", "model-type",
                              "unknown-model-key", "empty-value", "optim-check", "batch-check"])
def test_config_errors_are_one_line_naming_file_and_key(tmp_path, capsys, text, overrides, expected):
    """Unknown keys (with suggestions across sections and by other trainers' names), YAML syntax errors
    (line and column), non-mappings, wrong types: exit 2, one line, the file (or "command line") and key."""
    f = tmp_path / "run.yaml"
    f.write_text(text)
    assert cli.main(["train", "--config", str(f), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llama3-jax train: error: " + expected.replace("FILE", str(f))), err


def test_transformers4_default_rope_type_means_no_scaling():
    """transformers 4 may write `"rope_scaling": {"rope_type": "default"}` (and `{"type": "default"}`)."""
    cfg = load_model_config("llama3-8b")
    hf = to_hf_config(cfg)
    del hf["rope_parameters"]
    for scaling in ({"rope_type": "default"}, {"type": "default"}, None):
        assert from_hf_config(hf | {"rope_scaling": scaling}) == cfg
    with pytest.raises(ValueError, match="unsupported rope type 'linear'"):
        from_hf_config(hf | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
