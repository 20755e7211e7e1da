"""Flag groups shared by the scripts, each written once, and the `LLM(...)` kwargs they make.

    import shared_flags
    shared_flags.define_model_flags()      # --model, --dtype, --quantization
    shared_flags.define_engine_flags()     # --max_num_seqs ... --kv_cache_dtype
    shared_flags.define_mesh_flags()       # --mesh_data, --mesh_model, multi-process flags
    shared_flags.define_json_flag()
    ...
    llm = LLM(**shared_flags.llm_kwargs())

Engine knobs take their defaults from `dataclasses.fields(EngineConfig)`, so a default is
written in one place, the dataclass; the model default is `weights.DEFAULT_MODEL`. A script
may define a subset of a group (`names=`) when it fixes the others itself (a batch-1
benchmark fixes max_num_seqs), and `llm_kwargs` reads only the flags that are defined.

Every function takes `flag_values` (default `absl.flags.FLAGS`) so tests can use their own
`flags.FlagValues()`. Scripts run as `python scripts/x.py`, which puts scripts/ on sys.path;
this module is imported by its bare name.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import flags

from jax_infer import sharding, weights
from jax_infer.attention.paged import BACKENDS
from jax_infer.distributed import initialize_distributed
from jax_infer.engine import EngineConfig
from jax_infer.quant.kv import KV_DTYPES

DTYPES = ("float32", "bfloat16")

# EngineConfig fields that LLM(...) takes as keyword arguments, with their help text. The
# rest (speculative_*, ngram_*, long_prefill_chunk) reach the engine another way or not at all.
ENGINE_FLAGS: dict[str, str] = {
    "max_num_seqs": "Most requests in one step (the batch size, for the static engine).",
    "max_num_batched_tokens": "Token budget of one step (chunked prefill splits longer prompts).",
    "max_num_partial_prefills": "Most prompt chunks in one step (0: as many as the budget holds).",
    "page_size": "Tokens per KV cache page.",
    "kv_cache_gb": "KV cache budget in GB (sizes the page pool unless --num_pages is given).",
    "num_pages": "Pages in the pool, the null page included (overrides --kv_cache_gb).",
    "enable_prefix_caching": "Share the KV pages of identical prompt prefixes.",
    "attention_backend": "Paged attention backend (default: the platform's; 'cpu' on a CPU "
    "without a mesh).",
    "kv_cache_dtype": "KV cache storage: auto (the model dtype), float32, bfloat16 or int8 "
    "(per-token, per-head scales).",
}


def _fv(flag_values):
    return flags.FLAGS if flag_values is None else flag_values


def engine_defaults() -> dict:
    """EngineConfig's field defaults for the flags in ENGINE_FLAGS."""
    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    return {name: fields[name] for name in ENGINE_FLAGS}


# -- model -----------------------------------------------------------------------------


def define_model_flags(
    flag_values=None, *, dtype: bool = True, quantization: bool = True, dtype_help: str = ""
) -> None:
    """--model, and unless turned off --dtype and --quantization."""
    fv = _fv(flag_values)
    flags.DEFINE_string(
        "model",
        weights.DEFAULT_MODEL,
        "Model name, .gguf file, HF directory or orbax checkpoint directory.",
        flag_values=fv,
    )
    if dtype:
        flags.DEFINE_enum(
            "dtype",
            "float32",
            list(DTYPES),
            dtype_help or "Weights and compute dtype.",
            flag_values=fv,
        )
    if quantization:
        flags.DEFINE_string(
            "quantization",
            "none",
            "none, or a jax_infer.quant scheme applied on load: int8, int8-g64, int4, ... "
            "(+embed also quantizes the embedding and LM head).",
            flag_values=fv,
        )


def quantization(flag_values=None) -> str | None:
    """--quantization as LLM takes it (None for 'none')."""
    value = _fv(flag_values).quantization
    return None if value in (None, "none") else value


# -- engine ----------------------------------------------------------------------------


def define_engine_flags(flag_values=None, names=None) -> None:
    """The engine knobs in `names` (default: all of ENGINE_FLAGS), defaults from EngineConfig."""
    fv = _fv(flag_values)
    names = list(ENGINE_FLAGS) if names is None else list(names)
    unknown = sorted(set(names) - set(ENGINE_FLAGS))
    if unknown:
        raise ValueError(f"names={unknown} are not engine flags: allowed are {list(ENGINE_FLAGS)}")
    defaults = engine_defaults()
    for name in names:
        default, help_ = defaults[name], ENGINE_FLAGS[name]
        if name == "attention_backend":
            flags.DEFINE_enum(name, default, list(BACKENDS), help_, flag_values=fv)
        elif name == "kv_cache_dtype":
            flags.DEFINE_enum(name, default, list(KV_DTYPES), help_, flag_values=fv)
        elif name == "enable_prefix_caching":
            flags.DEFINE_bool(name, default, help_, flag_values=fv)
        elif name == "kv_cache_gb":
            flags.DEFINE_float(name, default, help_, flag_values=fv)
        else:
            flags.DEFINE_integer(name, default, help_, flag_values=fv)


# -- mesh and multi-process start-up ---------------------------------------------------


def define_mesh_flags(flag_values=None) -> None:
    """--mesh_data, --mesh_model and the multi-process flags."""
    fv = _fv(flag_values)
    flags.DEFINE_integer(
        "mesh_data", 1, "data-parallel mesh size (batch split)", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "mesh_model",
        1,
        "tensor-parallel mesh size (heads, MLP channels, vocabulary)",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (multi-process)", flag_values=fv
    )
    flags.DEFINE_integer("num_processes", None, "processes in the job", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process, in [0, num_processes)", flag_values=fv)
    flags.DEFINE_bool(
        "distributed",
        False,
        "start jax.distributed, auto-detecting unset values (TPU pod, Slurm, Open MPI)",
        flag_values=fv,
    )


def mesh_from_flags(flag_values=None) -> jax.sharding.Mesh | None:
    """Starts jax.distributed if the flags ask for it, then builds the mesh; None for a 1x1
    mesh on one process, so a default run takes the unsharded path unchanged."""
    fv = _fv(flag_values)
    initialize_distributed(
        fv.coordinator_address, fv.num_processes, fv.process_id, auto_detect=fv.distributed
    )
    if fv.mesh_data == fv.mesh_model == 1 and jax.process_count() == 1:
        return None
    return sharding.make_mesh(fv.mesh_data, fv.mesh_model)


# -- output ----------------------------------------------------------------------------


def define_json_flag(flag_values=None, default: str | None = None) -> None:
    flags.DEFINE_string(
        "json", default, "Write the results to this JSON file.", flag_values=_fv(flag_values)
    )


# -- LLM -------------------------------------------------------------------------------


def llm_kwargs(flag_values=None, *, mesh=None) -> dict:
    """`LLM(...)` keyword arguments from the parsed flags of the groups a script defined.

    The mesh flags, when defined, start jax.distributed and build the mesh here (call it
    once per process; or build the mesh once with `mesh_from_flags` and pass it as `mesh`).
    """
    fv = _fv(flag_values)
    kwargs: dict = {}
    if "model" in fv:
        kwargs["model"] = fv.model
    if "dtype" in fv:
        kwargs["dtype"] = fv.dtype
    if "quantization" in fv:
        kwargs["quantization"] = quantization(fv)
    for name in ENGINE_FLAGS:
        if name in fv:
            kwargs[name] = fv[name].value
    if kwargs.get("max_num_partial_prefills") == 0:
        kwargs["max_num_partial_prefills"] = None
    if mesh is not None:
        kwargs["mesh"] = mesh
    elif "mesh_data" in fv:
        kwargs["mesh"] = mesh_from_flags(fv)
    return kwargs


__all__ = [
    "DTYPES",
    "ENGINE_FLAGS",
    "define_engine_flags",
    "define_json_flag",
    "define_mesh_flags",
    "define_model_flags",
    "engine_defaults",
    "llm_kwargs",
    "mesh_from_flags",
    "quantization",
]
