"""Cold start: jax's persistent compilation cache, on by default, and compile counters.

    compile_cache.enable("auto")     # ~/.cache/jax_infer/xla (or $JAX_INFER_COMPILATION_CACHE_DIR)
    compile_cache.enable(None)       # off for this process
    compile_cache.stats()            # {"programs": 12, "cache_hits": 12, "compiled": 0, ...}

Why: every start of a server re-traces and re-compiles the same step programs; on a TPU a
program takes tens of seconds. jax can keep compiled executables on disk, keyed by the HLO,
the compile options, the backend and the jax/jaxlib versions, so a second start of the same
engine loads them instead of compiling. The cache is one per process (a jax setting), so it is
set from the first `LLM`/`LLMEngine` built; its directory is, in order of precedence:

1. an explicit `compilation_cache_dir` (a path; None or "off": no persistent cache);
2. "auto": $JAX_INFER_COMPILATION_CACHE_DIR (a path, or "off"), else a directory the user
   already gave jax (`jax_compilation_cache_dir`, $JAX_COMPILATION_CACHE_DIR), else
   $XDG_CACHE_HOME/jax_infer/xla (default ~/.cache/jax_infer/xla).

Every program is cached, however small or fast to compile (on a CPU most compile in well under
jax's default 1 s threshold, and a second start should compile nothing). The directory is
bounded: jax evicts the least recently used entries past `MAX_CACHE_BYTES` (2 GiB; the
setting `jax_compilation_cache_max_size`, -1 for no bound). The key includes the jaxlib
version, so entries of an old jaxlib are never read again (eviction removes them).

Counters (from `jax.monitoring`, process totals since the listeners were installed): programs
jax asked the backend for (`programs`), of them loaded from the persistent cache
(`cache_hits`) or compiled now (`compiled`, written to the cache when it is on: `cache_writes`),
and the seconds spent in backend compilation (`compile_seconds`, cache loads included) and in
tracing and lowering to HLO (`trace_seconds`: the cache key is the HLO). Step programs loaded
whole from the program store (program_store.py, no trace at all) count as programs and cache
hits too, and on their own as `stored_programs`; programs written there, `stored_writes` (they
are compiled bypassing jax's cache, so not in `cache_writes`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

log = logging.getLogger(__name__)

ENV_VAR = "JAX_INFER_COMPILATION_CACHE_DIR"
OFF = ("", "off", "none", "0", "false")
MAX_CACHE_BYTES = 2 * 2**30

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_WRITE = "/jax/compilation_cache/cache_misses"  # recorded when an entry is written

_lock = threading.Lock()
_counts = {
    "programs": 0,
    "cache_hits": 0,
    "cache_writes": 0,
    "stored_programs": 0,
    "stored_writes": 0,
}
_seconds = {"compile_seconds": 0.0, "trace_seconds": 0.0}
_installed = False
_enabled_dir: str | None = None


def _on_event(event: str, **_) -> None:
    if event == _HIT:
        with _lock:
            _counts["cache_hits"] += 1
    elif event == _WRITE:
        with _lock:
            _counts["cache_writes"] += 1


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == _BACKEND_COMPILE:
        with _lock:
            _counts["programs"] += 1
            _seconds["compile_seconds"] += seconds
    elif event in (_TRACE, _LOWER):
        with _lock:
            _seconds["trace_seconds"] += seconds


def count_stored_program(seconds: float) -> None:
    """One program loaded from the program store (program_store.py): a program and a cache
    hit, with no trace or XLA compile."""
    with _lock:
        _counts["programs"] += 1
        _counts["cache_hits"] += 1
        _counts["stored_programs"] += 1
        _seconds["compile_seconds"] += seconds


def count_stored_write() -> None:
    """One program written to the program store (compiled afresh, not to jax's cache)."""
    with _lock:
        _counts["stored_writes"] += 1


def install_listeners() -> None:
    """Start counting (idempotent; `enable` calls it)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    monitoring.register_event_listener(_on_event)
    monitoring.register_event_duration_secs_listener(_on_duration)


def stats() -> dict:
    """Process totals: programs, cache_hits, compiled (= programs - cache_hits), cache_writes,
    stored_programs, stored_writes, compile_seconds, trace_seconds, and cache_dir (None: the
    persistent cache is off)."""
    with _lock:
        out = {**_counts, **{k: round(v, 3) for k, v in _seconds.items()}}
    out["compiled"] = out["programs"] - out["cache_hits"]
    out["cache_dir"] = cache_dir()
    return out


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/jax_infer/xla, or ~/.cache/jax_infer/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_infer", "xla")


def resolve_dir_setting(value, *, param: str, env_var: str, off_means: str) -> str | None:
    """The directory a cache setting names (shared by this cache and the weights cache): None
    (off), an absolute path, or "auto" where neither `value` nor $env_var decides. Anything
    but a string/path/None raises a ValueError naming `param`."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(
            f"{param}={value!r} is invalid: allowed are 'auto', a directory path, or "
            f"None/'off' ({off_means})"
        )
    if value is None:
        return None
    value = os.fspath(value)
    if value.strip().lower() in OFF:
        return None
    if value != "auto":
        return os.path.abspath(os.path.expanduser(value))
    env = os.environ.get(env_var)
    if env is not None and env.strip().lower() != "auto":
        return None if env.strip().lower() in OFF else os.path.abspath(os.path.expanduser(env))
    return "auto"


def resolve_cache_dir(cache_dir: str | None = "auto") -> str | None:
    """The directory `enable(cache_dir)` uses (None: off); see the module docstring."""
    chosen = resolve_dir_setting(
        cache_dir,
        param="compilation_cache_dir",
        env_var=ENV_VAR,
        off_means="no persistent cache",
    )
    if chosen != "auto":
        return chosen
    given = jax.config.jax_compilation_cache_dir
    if given:
        return given
    return default_cache_dir()


@contextlib.contextmanager
def bypassed():
    """Compiles inside skip the persistent cache (neither read nor written): the one way to
    get an executable compiled afresh when the cache holds it. jax's switch is process-wide,
    so a compile on another thread meanwhile skips it too (it then just compiles)."""
    on = jax.config.jax_enable_compilation_cache and _enabled_dir is not None
    if on:
        jax.config.update("jax_enable_compilation_cache", False)
        _jax_cache.reset_cache()
    try:
        yield
    finally:
        if on:
            jax.config.update("jax_enable_compilation_cache", True)
            _jax_cache.reset_cache()


def cache_dir() -> str | None:
    """The persistent cache directory this process uses (None: off)."""
    return _enabled_dir


def enable(cache_dir: str | None = "auto") -> str | None:
    """Point jax's persistent compilation cache at `cache_dir` (see `resolve_cache_dir`) and
    install the counters; returns the directory (None: off). Calling it again with another
    directory moves the cache (later compiles read and write there)."""
    global _enabled_dir
    install_listeners()
    path = resolve_cache_dir(cache_dir)
    if path == _enabled_dir and (path is None or jax.config.jax_compilation_cache_dir == path):
        return path
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            log.warning("compilation cache %s is not writable (%s): cache off", path, e)
            return enable(None)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        if jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    # jax opens its cache once, at the first compile: forget it so the new setting applies.
    _jax_cache.reset_cache()
    _enabled_dir = path
    log.info("persistent compilation cache: %s", path or "off")
    return path


__all__ = [
    "ENV_VAR",
    "bypassed",
    "MAX_CACHE_BYTES",
    "cache_dir",
    "default_cache_dir",
    "enable",
    "install_listeners",
    "resolve_cache_dir",
    "stats",
]
