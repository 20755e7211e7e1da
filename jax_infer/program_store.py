"""Stored step programs: a second start loads the compiled step instead of tracing it.

    step = StoredFunction(forward_and_sample, "forward_and_sample")
    out = step(params, tokens, ..., config=config, flags=flags)   # as forward_and_sample(...)

Why: jax's persistent compilation cache (compile_cache.py) saves the XLA compile, but its key
is the lowered program, so every start still traces the model and lowers it to HLO: for
SmolLM2's fused step ~1.5 s of a 2-core CPU's second start, more than the compile it saves.
Here the compiled executable itself (`jax.experimental.serialize_executable`) is stored under
a key computed without tracing: the function's name, its static arguments, the arguments'
tree structure, shapes and dtypes, the jax_infer source fingerprint (disk_cache.py: an edit
to the model code misses), jax's trace context (x64, matmul precision...), and the device
(platform, kind, count; on a CPU the C++ kernel families registered, and the CPU's flags).
A hit deserializes the very executable the first process compiled, so outputs are the same
bits. A miss traces, lowers and compiles as `jax.jit` would, but bypassing jax's persistent cache
(on a CPU an executable loaded from there serializes without its compiled functions, and
the copy fails when run: so a stored program is always one compiled afresh), and a
background thread serializes the executable into the store.

In memory, each program is looked up per call by the static arguments and the shapes of the
arguments; a params pytree (hundreds of leaves) is read once per object, a page pool once
(`fixed` and `stable` argument positions): the lookup costs tens of microseconds a step.

Where: `programs/` in the compilation cache directory (off when that is off, or with
$JAX_INFER_STORED_PROGRAMS=0); bounded to $JAX_INFER_PROGRAMS_MAX_GB GiB (default 1),
least recently used first. An entry that does not load (corrupted, or a kernel missing) is
removed with a warning and compiled afresh. Entries hold pickles: the directory must be as
trusted as the code (as jax's own cache).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import queue
import threading
import time
import zlib

import jax

from jax_infer import compile_cache, disk_cache

log = logging.getLogger(__name__)

SWITCH_ENV = "JAX_INFER_STORED_PROGRAMS"
MAX_ENV_VAR = "JAX_INFER_PROGRAMS_MAX_GB"
DEFAULT_MAX_GB = 1.0
FORMAT_VERSION = 2
SUFFIX = ".program"
MAGIC = b"JIPROG02"


def store_dir() -> str | None:
    """The directory of stored programs for this process (None: off)."""
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in compile_cache.OFF:
        return None
    xla = compile_cache.cache_dir()
    return None if xla is None else os.path.join(xla, "programs")


def _leaf_signature(leaf):
    # Attribute reads only: jax.typeof costs ~20 us a leaf, a step has a hundred.
    try:
        return (leaf.shape, leaf.dtype, getattr(leaf, "weak_type", False))
    except AttributeError:  # a Python scalar: weakly typed
        return ((), type(leaf).__name__, True)


def signature(tree):
    """(treedef, per-leaf (shape, dtype, weak type)): what a compiled program's inputs fix."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(_leaf_signature(x) for x in leaves)


def _stable_repr(x) -> str:
    """repr without memory addresses (objects that print one are named by their type)."""
    text = repr(x)
    return type(x).__name__ if " at 0x" in text else text


@functools.cache
def _device_key() -> str:
    dev = jax.devices()[0]
    parts = [
        dev.platform,
        dev.device_kind,
        str(jax.device_count()),
        getattr(dev.client, "platform_version", ""),
    ]
    if dev.platform == "cpu":
        from jax_infer.cpu import build

        # features() also registers the C++ kernels' custom-call targets, which a stored
        # program calls: a hit is read only after this key, hence after them.
        parts += [str(build.features()), " ".join(sorted(build.cpu_features().flags))]
    return "\0".join(parts)


def _trace_key() -> str:
    from jax._src import config as jax_config

    return ",".join(_stable_repr(x) for x in jax_config.trace_context())


class _Writer:
    """One background thread that serializes compiled programs and writes them."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def submit(self, job) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="program-store")
                self.thread.start()
            self.queue.put(job)

    def _run(self):
        while True:
            try:
                job = self.queue.get(timeout=1.0)
            except queue.Empty:
                with self.lock:
                    if self.queue.empty():
                        self.thread = None
                        return
                continue
            try:
                job()
            except Exception as e:  # noqa: BLE001 -- a store failure never fails a step
                log.warning("program store: could not store a program: %s", e)
            finally:
                self.queue.task_done()

    def flush(self):
        self.queue.join()


_writer = _Writer()


def flush() -> None:
    """Wait until every program submitted for storing is written."""
    _writer.flush()


def _write(path: str, compiled, directory: str, max_bytes: int) -> None:
    from jax.experimental import serialize_executable

    # The devices the program runs on, by id: a load must name them (deserialize_and_load
    # otherwise spreads it over every device of the process, and a one-device program then
    # wants 8 shards in a process with 8 CPU devices).
    ids = sorted({d.id for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set})
    payload = (*serialize_executable.serialize(compiled), ids)
    blob = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
    crc = zlib.crc32(blob).to_bytes(4, "little")
    disk_cache.write_atomic(path, lambda f: f.write(MAGIC + crc + blob))
    compile_cache.count_stored_write()
    disk_cache.evict(directory, max_bytes, keep=path)


def _read(path: str):
    from jax.experimental import serialize_executable

    with open(path, "rb") as f:
        data = f.read()
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a stored program (bad magic)")
    crc, blob = data[len(MAGIC) : len(MAGIC) + 4], data[len(MAGIC) + 4 :]
    if zlib.crc32(blob).to_bytes(4, "little") != crc:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    serialized, in_tree, out_tree, ids = pickle.loads(blob)
    by_id = {d.id: d for d in jax.devices()}
    if not ids or any(i not in by_id for i in ids):
        raise ValueError(f"stored for devices {ids}, not all present here")
    return serialize_executable.deserialize_and_load(
        serialized, in_tree, out_tree, execution_devices=[by_id[i] for i in ids]
    )


class StoredFunction:
    """A jitted function called through compiled programs kept in memory and on disk.

    fn: a `jax.jit` function whose keyword arguments are its static ones. name: names its
    entries. fixed: positions of arguments whose signature is memoized by identity (the same
    params object every step). stable: positions whose signature never changes (a page pool,
    replaced by the step's output of the same shapes): read on the first call only. Either
    way a wrong memo cannot run a wrong program: a compiled program checks its arguments'
    shapes and dtypes and raises TypeError on a mismatch."""

    def __init__(self, fn, name: str, fixed: tuple[int, ...] = (), stable: tuple[int, ...] = ()):
        self.fn, self.name, self.fixed, self.stable = fn, name, tuple(fixed), tuple(stable)
        self._programs: dict = {}
        self._fixed_sigs: dict[int, tuple] = {}  # position -> (object, signature id)
        self._sig_ids: dict = {}  # signature -> its id

    def _arg_signature(self, args) -> tuple:
        """Per argument its signature, or for a `fixed` one a small int standing for it (a
        params signature has hundreds of entries: hashing it every step would cost more
        than the lookup saves)."""
        out = []
        for i, a in enumerate(args):
            if i in self.fixed or i in self.stable:
                memo = self._fixed_sigs.get(i)
                if memo is None or (memo[0] is not a and i in self.fixed):
                    sig = signature(a)
                    memo = (a, self._sig_ids.setdefault(sig, len(self._sig_ids)))
                    self._fixed_sigs[i] = memo
                out.append(memo[1])
            else:
                out.append(signature(a))
        return tuple(out)

    def __call__(self, *args, **static):
        key = (tuple(sorted(static.items())), self._arg_signature(args))
        program = self._programs.get(key)
        if program is None:
            program = self._load_or_compile(key, args, static)
            self._programs[key] = program
        return program(*args)

    def _disk_key(self, key) -> str:
        static, sigs = key
        by_id = {v: k for k, v in self._sig_ids.items()}
        sigs = [by_id[s] if i in self.fixed or i in self.stable else s for i, s in enumerate(sigs)]
        text = "\0".join(
            [
                f"v{FORMAT_VERSION}",
                self.name,
                disk_cache.source_fingerprint(),
                _device_key(),
                _trace_key(),
                repr([(k, _stable_repr(v)) for k, v in static]),
                repr(sigs),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _load_or_compile(self, key, args, static):
        directory = store_dir()
        path = None
        if directory is not None:
            path = os.path.join(directory, f"{self.name}-{self._disk_key(key)}{SUFFIX}")
            if os.path.exists(path):
                t0 = time.perf_counter()
                try:
                    program = _read(path)
                except Exception as e:  # noqa: BLE001 -- any unreadable entry is recompiled
                    log.warning("stored program %s does not load (%s): compiling", path, e)
                    disk_cache.remove(path)
                else:
                    disk_cache.touch(path)
                    compile_cache.count_stored_program(time.perf_counter() - t0)
                    return program
        lowered = self.fn.lower(*args, **static)
        if path is None:
            return lowered.compile()
        # Compiled afresh, bypassing jax's persistent cache: on a CPU an executable loaded
        # from there serializes without its compiled functions ("Function ... not found" when
        # the copy runs). The store is this program's cache instead.
        with compile_cache.bypassed():
            program = lowered.compile()
        if path is not None:
            max_bytes = disk_cache.env_bytes(MAX_ENV_VAR, DEFAULT_MAX_GB)
            _writer.submit(functools.partial(_write, path, program, directory, max_bytes))
        return program


__all__ = ["StoredFunction", "flush", "signature", "store_dir"]
