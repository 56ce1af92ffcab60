"""Run configs from YAML: any frozen dataclass built from a YAML file plus dotted `key=value`
overrides, unknown keys refused with a suggestion, every error one line naming the file (or
"command line") and the dotted key.

Generic on purpose: `TrainConfig` and `ModelConfig` are just the dataclasses it is handed, so the
model's shape (config.py) and this parser stay two separate jobs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from pathlib import Path

import yaml


# Every config error is one line: where the value came from (the YAML file, or "command line" for a
# dotted override), the dotted key, and what is wrong, e.g.
#     configs/run.yaml: unknown key 'optim.learning_rate'; did you mean 'optim.lr'?

# Names other trainers use for our keys (the suggestion for an unknown key looks them up too).
ALIASES = {
    "learning_rate": "lr", "peak_lr": "lr", "max_lr": "lr", "min_lr": "min_lr_ratio", "warmup": "warmup_steps",
    "lr_warmup_steps": "warmup_steps", "beta1": "b1", "beta2": "b2", "adam_beta1": "b1", "adam_beta2": "b2",
    "epsilon": "eps", "adam_epsilon": "eps", "wd": "weight_decay", "grad_clip": "clip_norm",
    "max_grad_norm": "clip_norm", "gradient_clipping": "clip_norm", "max_steps": "steps", "total_steps": "steps",
    "train_steps": "steps", "num_steps": "steps", "global_batch_size": "batch_size", "seq_length": "seq_len",
    "sequence_length": "seq_len", "max_length": "seq_len", "gradient_accumulation_steps": "grad_accum",
    "output_dir": "workdir", "checkpoint_dir": "workdir", "save_steps": "checkpoint_every",
    "eval_steps": "eval_every", "logging_steps": "log_every", "dtype": "compute_dtype", "hidden_size": "dim",
    "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
    "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings",
}


@dataclasses.dataclass(frozen=True)
class _Where:
    """Who set which key: `source(dotted_key)` names the file or "command line"; `paths` are every
    valid dotted key of the root config (for suggestions across sections)."""

    source: typing.Callable[[str], str]
    paths: tuple[str, ...]

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.source(key)}: {key}: {message}" if key else f"{self.source(key)}: {message}")

    def suggest(self, key: str) -> str:
        """'; did you mean ...?' for an unknown dotted key: the same name (or a known alias) in the same
        or another section first, then close spellings in the same section."""
        section, _, name = key.rpartition(".")
        prefix = f"{section}." if section else ""
        names = [n for n in (name, ALIASES.get(name.lower())) if n]
        found = [prefix + n for n in names if prefix + n in self.paths]
        found += [p for n in names for p in self.paths if p.rpartition(".")[2] == n and p not in found]
        siblings = [p[len(prefix):] for p in self.paths if p.startswith(prefix) and "." not in p[len(prefix):]]
        found += [prefix + c for c in difflib.get_close_matches(name, siblings, n=1) if prefix + c not in found]
        found = [f for f in found if f != key][:2]
        return f"; did you mean {' or '.join(repr(f) for f in found)}?" if found else ""


def _schema(field: dataclasses.Field):
    """A `dict` field may name the dataclass whose keys it holds (TrainConfig.model: ModelConfig keys)."""
    return field.metadata.get("keys"), tuple(field.metadata.get("extra_keys", ()))


def _paths(cls, prefix: str = "") -> tuple[str, ...]:
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        nested = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        schema, extra = _schema(f)
        if nested:
            out += _paths(nested[0], f"{prefix}{f.name}.")
        if schema is not None:
            out += _paths(schema, f"{prefix}{f.name}.") + tuple(f"{prefix}{f.name}.{e}" for e in extra)
    return tuple(out)


def _where_of(cls, where: str, source) -> _Where:
    if not callable(source):
        label = source
        source = lambda _key: label  # noqa: E731
    return _Where(source, _paths(cls, f"{where}." if where else ""))


def build_dataclass(cls, data, where: str = "", source: str | typing.Callable[[str], str] = "config", ctx=None):
    """Build dataclass `cls` from a nested dict, refusing unknown keys (with a suggestion) and values
    of the wrong type. `where` is the dotted path of `data` in the whole config ("" at the top);
    `source` names where the values came from (a file, or a function of the dotted key)."""
    ctx = ctx or _where_of(cls, where, source)
    if not isinstance(data, dict):
        raise ctx.error(where, f"expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ValueError(f"{ctx.source(dotted)}: unknown key {dotted!r}{ctx.suggest(dotted)}")
        kwargs[key] = _coerce(hints[key], value, dotted, ctx, _schema(fields[key]))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a dataclass's own checks (__post_init__): "key ..." messages
        msg, first = str(e), re.match(r"\w+", str(e))
        key = first[0] if first and first[0] in fields else ""
        key = f"{where}.{key}" if where and key else key or where
        raise ValueError(f"{ctx.source(key)}: {msg if msg.startswith(where) else f'{where}: {msg}'}") from None


def _describe(tp) -> str:
    return {str: "a string", dict: "a mapping", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp, value, key: str, ctx: _Where, schema=(None, ())):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        mapping = [a for a in args if a is dict or dataclasses.is_dataclass(a)]
        scalar = [a for a in args if a not in mapping]
        if isinstance(value, dict) and mapping:
            return _coerce(mapping[0], value, key, ctx, schema)
        if isinstance(value, list) and (seqs := [a for a in args if typing.get_origin(a) is tuple]):
            return _coerce(seqs[0], value, key, ctx)  # `tuple[...] | None` given a list
        if not isinstance(value, (dict, list)) and scalar:
            return _coerce(scalar[0], value, key, ctx, schema)
        raise ctx.error(key, f"expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
    if value is None:
        raise ctx.error(key, f"expected {_describe(tp)}, got nothing")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build_dataclass(tp, value, key, ctx=ctx)
    if tp is dict:
        if not isinstance(value, dict):
            raise ctx.error(key, f"expected a mapping, got {value!r}")
        cls, extra = schema
        if cls is None:
            return value
        known, hints = {f.name for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
        out = {}
        for k, v in value.items():
            dotted = f"{key}.{k}"
            if k in extra:
                out[k] = _coerce(str, v, dotted, ctx)
            elif k in known:
                out[k] = _coerce(hints[k], v, dotted, ctx)
            else:
                raise ValueError(f"{ctx.source(dotted)}: unknown key {dotted!r}{ctx.suggest(dotted)}")
        return out
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(typing.get_args(tp)[0], v, key, ctx) for v in items)
    if tp is str:
        if isinstance(value, (dict, list, bool)):
            raise ctx.error(key, f"expected a string, got {value!r}")
        return str(value)
    if tp is bool and not isinstance(value, bool):
        raise ctx.error(key, f"expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value) if tp is float else int(value)
        except ValueError:
            raise ctx.error(key, f"expected {tp.__name__}, got {value!r}") from None
    if tp in (int, float) and not isinstance(value, (int, float)) or isinstance(value, bool) and tp in (int, float):
        raise ctx.error(key, f"expected {tp.__name__}, got {value!r}")
    if tp is float:
        if not math.isfinite(value):
            raise ctx.error(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, float):
        if not value.is_integer():
            raise ctx.error(key, f"expected int, got {value!r}")
        return int(value)
    return value


def read_yaml(path: str | Path):
    """A YAML file's data; a missing file or a syntax error is one line naming FILE:LINE:COLUMN."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a YAML file ({type(e).__name__})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{at}: invalid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None


def apply_overrides(data: dict, overrides: list[str], path: str | Path | None = None) -> dict:
    """`a.b=3` sets data['a']['b'] = 3 (value parsed as YAML); `path`: where `data` came from."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is already {node!r} (in {path or 'the command line'}), "
                                 f"not a section of keys")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML") from None
    return data


def load_yaml_config(cls, path: str | Path | None, overrides: list[str] = ()):
    """YAML file (may be None) + dotted overrides -> frozen dataclass `cls`. Errors name the file (or
    "command line") and the dotted key."""
    overrides = list(overrides)
    data = {}
    if path is not None:
        data = read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got a YAML {type(data).__name__}")
    given = [o.split("=", 1)[0] for o in overrides]

    def source(key: str) -> str:
        if path is None or any(key == g or key.startswith(g + ".") for g in given):
            return "command line"
        if any(not key or g.startswith(key + ".") for g in given):  # a section with some keys from each
            return f"{path} with command-line overrides"
        return str(path)

    return build_dataclass(cls, apply_overrides(data, overrides, path), "", source)
