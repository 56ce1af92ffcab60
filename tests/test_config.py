"""Presets, exact parameter counts, YAML overrides and the Meta MLP-width rule."""

import dataclasses

import pytest

from llama3_jax.config import (ModelConfig, _meta_ffn_args, load_model_config, load_yaml_config,
                               meta_ffn_dim, preset_names)


@pytest.mark.parametrize("name,count", [
    ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496), ("llama3.1-405b", 405_853_388_800),
    ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
])
def test_published_parameter_counts(name, count):
    assert load_model_config(name).num_params() == count


def test_num_params_matches_the_model():
    import jax
    from flax import nnx

    from llama3_jax.model import abstract_model
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
    with pytest.raises(ValueError, match="did you mean 'fsdp'"):
        load_yaml_config(_Run, f, ["mesh.fsdb=2"])
    with pytest.raises(ValueError, match="steps"):
        load_yaml_config(_Run, f, ["steps=many"])
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml_config(_Run, f, ["mesh={data: 2"])
    with pytest.raises(ValueError, match="not found"):
        load_yaml_config(_Run, tmp_path / "nope.yaml")
