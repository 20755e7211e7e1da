"""Flag groups shared by the scripts, each written once, and the `LLM(...)` kwargs they make.

    import shared_flags
    shared_flags.define_model_flags()      # --model, --dtype, --quantization
    shared_flags.define_engine_flags()     # --max_num_seqs ... --kv_cache_dtype
    shared_flags.define_mesh_flags()       # --mesh_data, --mesh_model, multi-process flags
    shared_flags.define_json_flag()
    shared_flags.define_config_flags()     # --config (an ml_collections file), --dry_run
    ...
    app.run(main, flags_parser=shared_flags.parse_flags)   # clear errors for --config.*

    def main(argv):
        cfg = shared_flags.apply_config()  # the config folded into the flags (see below)
        if FLAGS.dry_run:
            return shared_flags.dry_run(cfg)
        llm = LLM(**shared_flags.llm_kwargs())

Engine knobs take their defaults from `dataclasses.fields(EngineConfig)`, so a default is
written in one place, the dataclass; the model default is `weights.DEFAULT_MODEL`. A script
may define a subset of a group (`names=`) when it fixes the others itself (a batch-1
benchmark fixes max_num_seqs), and `llm_kwargs` reads only the flags that are defined.

Configs (`--config=configs/x.py`, ml_collections files of `jax_infer.run_config`'s tree;
`--config.engine.max_num_seqs=64` overrides a key). How a config and the flags combine, in
increasing precedence: the library's defaults (the dataclasses), the config file, its
`--config.*` overrides, then a flag given explicitly on the command line (`--max_num_seqs=4`).
`apply_config` folds the resolved config into the flags each script defines (so
`FLAGS.max_num_seqs`, `llm_kwargs()` and the JSON records see the config's values) and returns
the whole resolved tree, where the values no flag carries live (speculative, sampling, device,
and mesh for scripts without mesh flags). A config value of None means "the library chooses"
and leaves a script's own flag default standing where that default is not None (a benchmark's
--max_model_len=2048). Without --config the flags alone decide, as before; the dry run then
plans the flags' values.

Every function takes `flag_values` (default `absl.flags.FLAGS`) so tests can use their own
`flags.FlagValues()`. Scripts run as `python scripts/x.py`, which puts scripts/ on sys.path;
this module is imported by its bare name.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import jax
from absl import flags
from ml_collections import config_flags

from jax_infer import run_config, sharding, weights
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
    "async_scheduling": "Schedule and lay out step n + 1 while step n computes (steps that "
    "cannot overlap run synchronously, with the same results).",
    "precompile": "Compile every step bucket at start, with a progress bar (default: on for "
    "serve.py, off elsewhere).",
    "compilation_cache_dir": "jax's persistent compilation cache: auto "
    "($JAX_INFER_COMPILATION_CACHE_DIR, else ~/.cache/jax_infer/xla), a directory, or off.",
    "batch_invariant": "Each request's logits bitwise independent of the other requests in its "
    "step, the prefill chunk size and preemption (CPU kernels, float32 KV cache, no "
    "quantization).",
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
        elif name in ("enable_prefix_caching", "async_scheduling", "precompile", "batch_invariant"):
            flags.DEFINE_bool(name, default, help_, flag_values=fv)
        elif name == "compilation_cache_dir":
            flags.DEFINE_string(name, default, help_, flag_values=fv)
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


def llm_kwargs(flag_values=None, *, mesh=None, config: dict | None = None) -> dict:
    """`LLM(...)` keyword arguments from the parsed flags of the groups a script defined.

    The mesh flags, when defined, start jax.distributed and build the mesh here (call it
    once per process; or build the mesh once with `mesh_from_flags` and pass it as `mesh`).
    config: the tree `apply_config` returned, for what no flag carries: its speculative
    section and, in a script without mesh flags, its mesh. Scripts that cannot use those (the
    static engine) leave it out.
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
    if config is not None:
        spec = run_config.speculative_config(config)
        if spec is not None:
            kwargs["speculative_config"] = spec
        sizes = (config["mesh"]["data"], config["mesh"]["model"])
        if "mesh" not in kwargs and sizes != (1, 1):
            kwargs["mesh"] = sizes
    return kwargs


# -- config files -----------------------------------------------------------------------

# Flag -> (section, key) of the config tree, for the flags of the shared groups. A script
# maps its own flags with the same meaning through `apply_config(extra=...)`.
CONFIG_PATHS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"),
    "dtype": ("model", "dtype"),
    "quantization": ("model", "quantization"),
    "max_model_len": ("model", "max_model_len"),
    **{name: ("engine", name) for name in ENGINE_FLAGS},
    "mesh_data": ("mesh", "data"),
    "mesh_model": ("mesh", "model"),
}
# Flags that spell the config's None another way.
_NONE_AS = {"quantization": "none", "max_num_partial_prefills": 0}


def define_config_flags(flag_values=None, sys_argv: list[str] | None = None) -> None:
    """--config (an ml_collections config file, overridable as --config.section.key=value)
    and --dry_run. config_flags registers the --config.* overrides it finds in sys_argv
    (default sys.argv) when the flag is defined: tests with FlagValues of their own pass theirs."""
    fv = _fv(flag_values)
    config_flags.DEFINE_config_file(
        "config",
        None,
        "A config file (configs/*.py: get_config() returning a ConfigDict of "
        "jax_infer.run_config's sections model, engine, speculative, sampling, mesh, device). "
        "Override a key with --config.engine.max_num_seqs=64; a flag given explicitly "
        "(--max_num_seqs=4) wins over the config.",
        flag_values=fv,
        sys_argv=sys_argv,
    )
    flags.DEFINE_bool(
        "dry_run",
        False,
        "Print the plan (mesh, weight and KV cache bytes per device, pages and requests of "
        "max_model_len, fit in device.memory_gib) without reading weights, then exit: 0 if it "
        "fits, 1 if not.",
        flag_values=fv,
    )


def _from_flag(name: str, value):
    if name in _NONE_AS and value == _NONE_AS[name]:
        return None
    return value


def apply_config(flag_values=None, extra: dict[str, tuple[str, str]] | None = None) -> dict:
    """The resolved config tree (`run_config.resolve`), folded into the defined flags.

    extra: more flag -> (section, key) pairs (generate.py's --max_tokens is sampling.max_tokens).
    An unknown key, a wrong type or a refused value exits (SystemExit, status 1) with a
    message naming the key, the value and what is allowed."""
    fv = _fv(flag_values)
    try:
        return _apply_config(fv, {**CONFIG_PATHS, **(extra or {})})
    except ValueError as e:  # one line on stderr and exit status 1, no traceback
        raise SystemExit(f"FATAL config error: {e}") from e


def _apply_config(fv, paths) -> dict:
    given = "config" in fv and fv["config"].value is not None
    cfg = run_config.resolve(fv["config"].value if given else None)
    for name, (section, key) in paths.items():
        if name not in fv:
            continue
        flag = fv[name]
        if not given or flag.present:
            cfg[section][key] = _from_flag(name, flag.value)
            continue
        value = cfg[section][key]
        if value is None and name in _NONE_AS:
            flag.value = _NONE_AS[name]
        elif value is None and flag.default is not None:
            cfg[section][key] = _from_flag(name, flag.value)  # the script's own default
        else:
            flag.value = value
    return run_config.resolve(cfg)


def dry_run(cfg: dict, out=None) -> int:
    """Print the plan of a resolved config; 0 if it fits, 1 (with the problems) if not."""
    out = out or sys.stdout
    try:
        plan = run_config.make_plan(cfg)
    except (ValueError, OSError) as e:  # an unknown model config, an unreadable file
        raise SystemExit(f"FATAL dry run: {e}") from e
    print(plan.format(), file=out)
    print(
        f"(dry run: no weights read; this process sees {jax.device_count()} "
        f"{jax.default_backend()} device(s))",
        file=out,
    )
    return 0 if plan.fits else 1


_CONFIG_ARG = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(?:=(.*))?$")


def _config_arg_problem(arg: str) -> str | None:
    """Why a --config.section.key argument names no key of the tree, or None."""
    m = _CONFIG_ARG.match(arg)
    if not m:
        return None
    parts = m[1].split(".")
    if parts[0] not in run_config.SCHEMA:
        return f"{arg}: config has no section {parts[0]!r}: allowed are {sorted(run_config.SCHEMA)}"
    keys = run_config.SCHEMA[parts[0]]
    if len(parts) != 2 or parts[1] not in keys:
        return f"{arg}: config.{parts[0]} has no key {'.'.join(parts[1:])!r}: allowed are {sorted(keys)}"
    return None


def parse_flags(argv: list[str], flag_values=None) -> list[str]:
    """`app.run(main, flags_parser=parse_flags)`: absl's parsing, with errors about --config
    keys that name the key and what is allowed, and `--config.section.key=None` accepted for
    keys whose default is None."""
    fv = _fv(flag_values)
    nones, rest = [], []
    for arg in argv:
        m = _CONFIG_ARG.match(arg)
        if m and m[2] in ("None", "none", "null"):
            nones.append((arg, m[1]))
        else:
            rest.append(arg)
    try:
        for arg in argv[1:]:
            problem = _config_arg_problem(arg)
            if problem:
                raise flags.Error(problem)
        args = fv(rest)
        for arg, path in nones:
            if "config" not in fv or fv.config is None:
                raise flags.Error(f"{arg} needs --config")
            section, key = path.split(".")
            fv.config[section][key] = None
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e)
        for arg in argv[1:]:
            m = _CONFIG_ARG.match(arg)
            if m and m[1] in message and not _config_arg_problem(arg):
                section, key = m[1].split(".")
                allowed = run_config.type_names(run_config.SCHEMA[section][key])
                message += f" (config.{m[1]}: allowed is {allowed})"
                break
        sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    return args


__all__ = [
    "CONFIG_PATHS",
    "DTYPES",
    "ENGINE_FLAGS",
    "apply_config",
    "define_config_flags",
    "define_engine_flags",
    "define_json_flag",
    "define_mesh_flags",
    "define_model_flags",
    "dry_run",
    "engine_defaults",
    "llm_kwargs",
    "mesh_from_flags",
    "parse_flags",
    "quantization",
]
