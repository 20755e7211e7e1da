"""A run's configuration as one nested dict, its defaults read from the library's dataclasses.

    resolved = resolve({"engine": {"max_num_seqs": 64}, "model": {"dtype": "bfloat16"}})
    llm = LLM(**llm_kwargs(resolved))
    plan = make_plan(resolved)          # what --dry_run prints, no weights read

Sections and where each default comes from (nothing is written twice):

    model        name, dtype, quantization, max_model_len: `LLM`'s signature; config: the
                 architecture a dry run plans with (a `config.PRESETS` name, an HF
                 config.json or its directory, a .gguf, an orbax dir; None: from name)
    engine       the EngineConfig fields LLM takes (max_num_seqs, kv_cache_gb, ...)
    speculative  speculative/config.py's keys (vLLM's); method None: off
    sampling     SamplingParams' fields (what scripts/generate.py samples with)
    mesh         data, model: the (data, model) mesh sizes (1 x 1: one device)
    device       plan.DeviceSpec: kind, memory_gib, memory_utilization (for the dry run)

`resolve` accepts a partial tree (only what it changes), fills the rest with the defaults and
checks every key and type (an unknown key, a wrong type: ValueError naming the key, the value
and what is allowed), then the values (by constructing EngineConfig, SamplingParams, ...).

The configs/*.py files of the repository are ml_collections ConfigDicts of this tree
(`default_config()`, the one place that imports ml_collections, lazily: the library itself
works on plain dicts); scripts/shared_flags.py reads them with `--config`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Mapping

from jax_infer import config as model_configs
from jax_infer import plan as plan_lib
from jax_infer.engine import EngineConfig
from jax_infer.llm import LLM
from jax_infer.quant import parse_scheme
from jax_infer.sampling import SamplingParams
from jax_infer.speculative import config as spec_config


@dataclasses.dataclass(frozen=True)
class Field:
    default: typing.Any
    types: tuple[type, ...]  # allowed value types (NoneType included when optional)
    seq_of: type | None = None  # tuple fields: the element type


def _field(hint, default) -> Field:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported type {hint!r}")
        f = _field(inner[0], default)
        return Field(default, (*f.types, type(None)), f.seq_of)
    if origin is tuple:
        return Field(default, (tuple,), args[0])
    if hint is float:
        return Field(default, (float, int))
    if hint in (int, str, bool):
        return Field(default, (hint,))
    raise TypeError(f"unsupported type {hint!r}")


def _from_dataclass(cls, names=None, per_request=()) -> dict[str, Field]:
    """Fields of a dataclass as config keys; `per_request` names fields left out (values a
    config file cannot spell, such as a token-id mapping or a grammar: set per request)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _field(hints[f.name], f.default)
        for f in dataclasses.fields(cls)
        if (names is None or f.name in names) and f.name not in per_request
    }


def _llm_default(name: str):
    return inspect.signature(LLM).parameters[name].default


def _schema() -> dict[str, dict[str, Field]]:
    llm_params = inspect.signature(LLM).parameters
    engine_names = [f.name for f in dataclasses.fields(EngineConfig) if f.name in llm_params]
    str_or_none = (str, type(None))
    int_or_none = (int, type(None))
    return {
        "model": {
            "name": Field(_llm_default("model"), (str,)),
            "config": Field(None, str_or_none),
            "dtype": Field(_llm_default("dtype"), (str,)),
            "quantization": Field(_llm_default("quantization"), str_or_none),
            "max_model_len": Field(_llm_default("max_model_len"), int_or_none),
        },
        "engine": _from_dataclass(EngineConfig, engine_names),
        "speculative": {
            key: Field(None, int_or_none if key in _SPEC_INTS else str_or_none)
            for key in spec_config.KEYS
        },
        "sampling": _from_dataclass(
            SamplingParams, per_request=("logit_bias", "structured_outputs")
        ),
        "mesh": {"data": Field(1, (int,)), "model": Field(1, (int,))},
        "device": _from_dataclass(plan_lib.DeviceSpec),
    }


_SPEC_INTS = (
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "disable_by_batch_size",
)
SCHEMA = _schema()


def defaults() -> dict:
    """The whole tree, every value the library's default."""
    return {s: {k: f.default for k, f in fields.items()} for s, fields in SCHEMA.items()}


def default_config():
    """`defaults()` as an ml_collections ConfigDict, for configs/*.py: a preset changes what it
    names, and `--config.section.key=value` can override any key. None defaults are typed
    placeholders, so that they too can be set from the command line."""
    from ml_collections import config_dict

    tree = {}
    for section, fields in SCHEMA.items():
        tree[section] = {}
        for key, f in fields.items():
            value = f.default
            if value is None:
                base = next(t for t in f.types if t is not type(None))
                value = config_dict.placeholder(base)
            tree[section][key] = value
    return config_dict.ConfigDict(tree)


def type_names(f: Field) -> str:
    """'int', 'str or None', 'tuple of str': the types a field allows."""
    names = [t.__name__ if t is not type(None) else "None" for t in f.types]
    if f.seq_of is not None:
        names = [f"tuple of {f.seq_of.__name__}" if n == "tuple" else n for n in names]
    return " or ".join(names)


def _check_type(path: str, value, f: Field):
    """value, normalized (lists to tuples), or ValueError naming path, value and types."""
    ok = isinstance(value, f.types) and not (isinstance(value, bool) and bool not in f.types)
    if f.seq_of is not None and isinstance(value, (list, tuple)):
        value = tuple(value)
        ok = all(
            isinstance(v, f.seq_of) and not (isinstance(v, bool) and f.seq_of is not bool)
            for v in value
        )
    if not ok:
        raise ValueError(
            f"config.{path}={value!r} has type {type(value).__name__}; allowed is {type_names(f)}"
        )
    if isinstance(value, int) and not isinstance(value, bool) and float in f.types:
        value = float(value)
    return value


def resolve(tree: Mapping | None = None) -> dict:
    """The full, checked tree: the defaults updated with `tree` (a dict or a ConfigDict, whole
    or naming only what it changes)."""
    if tree is not None and hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    tree = dict(tree or {})
    out = defaults()
    unknown = sorted(set(tree) - set(SCHEMA))
    if unknown:
        raise ValueError(f"config has unknown section(s) {unknown}: allowed are {sorted(SCHEMA)}")
    for section, values in tree.items():
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ValueError(
                f"config.{section}={values!r} must be a section (a dict of "
                f"{sorted(SCHEMA[section])})"
            )
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ValueError(
                    f"config.{section}.{key}={value!r}: unknown key; allowed in config."
                    f"{section} are {sorted(SCHEMA[section])}"
                )
            out[section][key] = _check_type(f"{section}.{key}", value, SCHEMA[section][key])
    _check_values(out)
    return out


def _check_values(cfg: dict) -> None:
    """Raise ValueError, prefixed with the section, for values the library would refuse."""

    def check(section, fn):
        try:
            fn()
        except ValueError as e:
            msg = str(e)
            if msg.startswith(f"{section}."):
                msg = f"config.{msg}"
            elif not msg.startswith("config."):
                msg = f"config.{section}: {msg}"
            raise ValueError(msg) from None

    m = cfg["model"]
    if m["dtype"] not in plan_lib.FLOAT_DTYPES:
        raise ValueError(
            f"config.model.dtype={m['dtype']!r} is not supported: allowed are "
            f"{sorted(plan_lib.FLOAT_DTYPES)}"
        )
    if m["quantization"] is not None:
        check("model", lambda: parse_scheme(m["quantization"]))
    if m["max_model_len"] is not None and m["max_model_len"] < 2:
        raise ValueError(f"config.model.max_model_len={m['max_model_len']} must be >= 2 or None")
    check("engine", lambda: EngineConfig(**engine_fields(cfg)))
    check("sampling", lambda: SamplingParams(**cfg["sampling"]))
    check("device", lambda: plan_lib.DeviceSpec(**cfg["device"]))
    for axis, size in cfg["mesh"].items():
        if size < 1:
            raise ValueError(f"config.mesh.{axis}={size} is invalid: must be an int >= 1")


def speculative_config(cfg: dict) -> dict | None:
    """The normalized speculative_config for LLM, or None when speculative.method is None."""
    spec = cfg["speculative"]
    if spec["method"] is None:
        others = sorted(k for k, v in spec.items() if v is not None)
        if others:
            raise ValueError(
                f"config.speculative sets {others} but speculative.method is None: set "
                f"method to one of {spec_config.SPECULATIVE_METHODS}"
            )
        return None
    try:
        return spec_config.normalize({k: v for k, v in spec.items() if v is not None})
    except ValueError as e:
        raise ValueError(f"config.speculative: {e}") from None


def engine_fields(cfg: dict) -> dict:
    """EngineConfig keyword arguments (the engine section and the speculative fields)."""
    spec = speculative_config(cfg)
    return {**cfg["engine"], **(spec_config.engine_fields(spec) if spec else {})}


def llm_kwargs(cfg: dict) -> dict:
    """`LLM(...)` keyword arguments (mesh as (data, model) sizes, None for one device)."""
    m = cfg["model"]
    mesh = (cfg["mesh"]["data"], cfg["mesh"]["model"])
    return {
        "model": m["name"],
        "dtype": m["dtype"],
        "quantization": m["quantization"],
        "max_model_len": m["max_model_len"],
        **cfg["engine"],
        "mesh": None if mesh == (1, 1) else mesh,
        "speculative_config": speculative_config(cfg),
    }


def sampling_params(cfg: dict) -> SamplingParams:
    return SamplingParams(**cfg["sampling"])


# -- the dry run -----------------------------------------------------------------------


def model_config(spec: str) -> model_configs.ModelConfig:
    """The architecture named by `spec`, without reading weights: a `config.PRESETS` name,
    an HF config.json (or its directory), a .gguf (its metadata only) or an orbax directory
    (its jax_infer.json)."""
    if spec in model_configs.PRESETS:
        return model_configs.PRESETS[spec]
    from jax_infer import weights

    if os.path.isfile(spec) and spec.endswith(".json"):
        return model_configs.ModelConfig.from_hf_config(spec)
    if spec in weights.NAMED_MODELS or os.path.exists(spec):
        fmt, path = weights.resolve(spec)
        if fmt == "hf":
            return model_configs.ModelConfig.from_hf_config(path)
        if fmt == "gguf":
            from jax_infer.weights.gguf_loader import open_gguf, read_metadata

            reader = open_gguf(path)  # memory-mapped: only the header is read
            names = {t.name for t in reader.tensors}
            return model_configs.ModelConfig.from_gguf(read_metadata(reader), names)
        from jax_infer.weights.orbax_io import read_meta

        return model_configs.ModelConfig.from_dict(read_meta(path)["config"])
    raise ValueError(
        f"model config {spec!r} is neither a preset ({sorted(model_configs.PRESETS)}) nor an "
        "existing HF config.json, HF directory, .gguf file or orbax checkpoint"
    )


def make_plan(cfg: dict) -> plan_lib.Plan:
    """The memory plan of a resolved config (`plan.make_plan`); the architecture is
    model.config, or model.name's when model.config is None."""
    m, e = cfg["model"], cfg["engine"]
    label = m["config"] or m["name"]
    arch = model_config(label)
    spec = speculative_config(cfg)
    draft_config = draft_quant = None
    if spec is not None and spec["method"] == spec_config.DRAFT_MODEL:
        draft_config = arch if spec["model"] is None else model_config(spec["model"])
        draft_quant = spec["quantization"]
    return plan_lib.make_plan(
        arch,
        model=label,
        dtype=m["dtype"],
        quantization=m["quantization"],
        kv_cache_dtype=e["kv_cache_dtype"],
        page_size=e["page_size"],
        kv_cache_gb=e["kv_cache_gb"],
        num_pages=e["num_pages"],
        max_model_len=m["max_model_len"],
        max_num_seqs=e["max_num_seqs"],
        attention_backend=e["attention_backend"],
        mesh_data=cfg["mesh"]["data"],
        mesh_model=cfg["mesh"]["model"],
        device=plan_lib.DeviceSpec(**cfg["device"]),
        draft_config=draft_config,
        draft_quantization=draft_quant,
    )


__all__ = [
    "SCHEMA",
    "default_config",
    "defaults",
    "engine_fields",
    "llm_kwargs",
    "make_plan",
    "model_config",
    "resolve",
    "sampling_params",
    "speculative_config",
    "type_names",
]
