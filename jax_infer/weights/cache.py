"""A cache of converted weights: a second start maps them from disk instead of converting.

    cache = WeightsCache.resolve("auto")                    # None: off
    key = cache.key(path, dtype="float32", quantization=None)
    hit = cache.load(key)        # (config, params on the device, tokenizer) or None
    cache.store(key, config, params, tokenizer)             # written on a background thread

Why: every start of `LLM(model=...)` reads the weights file and converts it: a GGUF's
tensors dequantized in numpy, cast to the dtype, quantized, laid out for the backend (the
CPU's f32 column tiles, an untied LM head), and the tokenizer parsed from the file's
metadata. For SmolLM2 on the 2-core CPU that is ~3 s of every start. The result is a fixed
function of the file and the options, so the first start stores it and later starts map it:
`np.memmap` views of one file, placed on the device (zero-copy on a CPU), the config and
tokenizer unpickled.

Key: the source's identity (resolved path, size and mtime of the file, or of every file under
a checkpoint directory), every option that changes the result (dtype, quantization scheme,
the backend and the CPU kernel families built, which pick the layout), the jax_infer source
fingerprint (disk_cache.py: any code change misses) and `FORMAT_VERSION`.

Entry: one file `<key>.weights`: a fixed 16-byte prefix (magic, header length), a JSON header
(leaves: dtype, shape, offset; the data's checksum; a pickled blob of the tree structure,
config and tokenizer with its own CRC), then each leaf's bytes at a 64-byte aligned offset.
A load checks the magic, the file size, the blob's CRC and the data checksum (a wrapping
uint64 sum of the data: ~40 ms for 540 MB, the same pass that maps the pages in); any
mismatch or parse error drops the entry with a warning and the caller converts afresh.

Where: `<compilation cache dir>/weights` (off when the compilation cache is off), or
$JAX_INFER_WEIGHTS_CACHE_DIR (a directory, or "off"), or `LLM(weights_cache_dir=...)`.
Bounded to $JAX_INFER_WEIGHTS_CACHE_MAX_GB GiB (default 4; -1: no bound), least recently
used entries evicted after each write. Entries hold pickles: a cache directory must be as
trusted as the code (as jax's own compilation cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import struct
import threading
import zlib

import numpy as np

from jax_infer import compile_cache, disk_cache

log = logging.getLogger(__name__)

ENV_VAR = "JAX_INFER_WEIGHTS_CACHE_DIR"
MAX_ENV_VAR = "JAX_INFER_WEIGHTS_CACHE_MAX_GB"
DEFAULT_MAX_GB = 4.0
FORMAT_VERSION = 1
MAGIC = b"JIWCACHE"
SUFFIX = ".weights"
ALIGN = 64

_pending: list[threading.Thread] = []
_pending_lock = threading.Lock()


class CacheEntryError(ValueError):
    """An entry that cannot be read back (truncated, corrupted, or of another format)."""


def resolve_dir(weights_cache_dir="auto") -> str | None:
    """The directory for `weights_cache_dir` (None: off): "auto" is $JAX_INFER_WEIGHTS_CACHE_DIR
    (a path or "off"), else `weights/` in this process's compilation cache directory (off
    when that is off); a path; None or "off"."""
    chosen = compile_cache.resolve_dir_setting(
        weights_cache_dir,
        param="weights_cache_dir",
        env_var=ENV_VAR,
        off_means="no weights cache",
    )
    if chosen != "auto":
        return chosen
    xla = compile_cache.cache_dir()
    return None if xla is None else os.path.join(xla, "weights")


def source_identity(path: str) -> list:
    """[(relative path, size, mtime_ns)] of the file, or of every file under the directory."""
    path = os.path.realpath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [(path, st.st_size, st.st_mtime_ns)]
    out = [path]
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return out


def _leaf_bytes(dtype: np.dtype, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _checksum(data: np.ndarray) -> int:
    """Wrapping uint64 sum of a byte array whose length is a multiple of 8."""
    return int(np.add.reduce(data.view(np.uint64), dtype=np.uint64)) if data.size else 0


class WeightsCache:
    """One cache directory of converted weights (see the module docstring)."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory = directory
        self.max_bytes = (
            disk_cache.env_bytes(MAX_ENV_VAR, DEFAULT_MAX_GB) if max_bytes is None else max_bytes
        )

    @classmethod
    def resolve(cls, weights_cache_dir="auto") -> WeightsCache | None:
        directory = resolve_dir(weights_cache_dir)
        return None if directory is None else cls(directory)

    def key(self, path: str, **options) -> str:
        """The entry name for the weights at `path` converted with `options` (every option
        that changes the result; values are compared by repr)."""
        import jax

        from jax_infer.cpu import build

        parts = {
            "format": FORMAT_VERSION,
            "source": source_identity(path),
            "options": {k: repr(v) for k, v in sorted(options.items())},
            "backend": jax.default_backend(),
            "cpu_kernels": build.features() if jax.default_backend() == "cpu" else 0,
            "code": disk_cache.source_fingerprint(),
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key + SUFFIX)

    # -- read ------------------------------------------------------------------------------

    def load(self, key: str):
        """(config, params as device arrays, tokenizer, extra) of entry `key`, or None (absent,
        or unreadable: then removed, with a warning)."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            out = read_entry(path)
        except (CacheEntryError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            log.warning("weights cache entry %s is unreadable (%s): converting afresh", path, e)
            disk_cache.remove(path)
            return None
        disk_cache.touch(path)
        return out

    # -- write -----------------------------------------------------------------------------

    def store(self, key: str, config, params, tokenizer, extra=None, background: bool = True):
        """Write entry `key` (params: any pytree of arrays, e.g. device arrays) atomically, on a
        background thread unless `background` is False (`flush()` waits for it). A failure
        to write is logged, never raised: the cache is an optimization."""

        def run():
            try:
                disk_cache.write_atomic(
                    self.path(key), lambda f: write_entry(f, config, params, tokenizer, extra)
                )
                disk_cache.evict(self.directory, self.max_bytes, keep=self.path(key))
                log.info("weights cache: stored %s", self.path(key))
            except Exception as e:  # noqa: BLE001 -- a cache write never fails the caller
                log.warning("weights cache: could not store %s: %s", self.path(key), e)

        if not background:
            run()
            return
        thread = threading.Thread(target=run, name="weights-cache-store")
        with _pending_lock:
            _pending[:] = [t for t in _pending if t.is_alive()]
            _pending.append(thread)
        thread.start()


def flush() -> None:
    """Wait for every background store of this process to finish."""
    with _pending_lock:
        threads = list(_pending)
    for t in threads:
        t.join()


def write_entry(f, config, params, tokenizer, extra=None) -> None:
    import jax

    leaves, treedef = jax.tree.flatten(params)
    arrays = [np.asarray(leaf) for leaf in leaves]  # zero-copy for CPU device arrays
    blob = pickle.dumps(
        {"treedef": treedef, "config": config, "tokenizer": tokenizer, "extra": extra},
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    specs, offset = [], 0
    for a in arrays:
        specs.append({"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset})
        offset = _aligned(offset + a.nbytes)
    data_bytes = offset
    blob_offset = data_bytes
    checksum = 0
    for a in arrays:
        if a.nbytes:
            flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            pad = (-flat.size) % 8
            if pad:
                flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
            checksum = (checksum + _checksum(flat)) % 2**64
    header = {
        "version": FORMAT_VERSION,
        "leaves": specs,
        "data_bytes": data_bytes,
        "checksum": checksum,
        "blob": [blob_offset, len(blob), zlib.crc32(blob)],
    }
    head = json.dumps(header).encode()
    data_start = _aligned(len(MAGIC) + 8 + len(head))
    f.write(MAGIC + struct.pack("<Q", len(head)) + head)
    f.write(b"\0" * (data_start - len(MAGIC) - 8 - len(head)))
    pos = 0
    for a, spec in zip(arrays, specs):
        f.write(b"\0" * (spec["offset"] - pos))
        # Bytes through a uint8 view: the buffer protocol has no bfloat16 (ml_dtypes) format.
        f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        pos = spec["offset"] + a.nbytes
    f.write(b"\0" * (data_bytes - pos))
    f.write(blob)


def read_entry(path: str):
    """(config, params on the default device, tokenizer, extra); CacheEntryError if the file is
    not a whole entry of this format."""
    import jax

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(len(MAGIC) + 8)
        if len(prefix) < len(MAGIC) + 8 or prefix[: len(MAGIC)] != MAGIC:
            raise CacheEntryError("not a weights cache entry (bad magic)")
        (head_len,) = struct.unpack("<Q", prefix[len(MAGIC) :])
        if head_len > size:
            raise CacheEntryError(f"header length {head_len} past the end of the file")
        header = json.loads(f.read(head_len))
        if header.get("version") != FORMAT_VERSION:
            raise CacheEntryError(f"format version {header.get('version')} != {FORMAT_VERSION}")
        data_start = _aligned(len(MAGIC) + 8 + head_len)
        blob_offset, blob_len, blob_crc = header["blob"]
        expected = data_start + blob_offset + blob_len
        if size != expected:
            raise CacheEntryError(f"file is {size} bytes, expected {expected} (truncated?)")
        f.seek(data_start + blob_offset)
        blob = f.read(blob_len)
    if zlib.crc32(blob) != blob_crc:
        raise CacheEntryError("metadata checksum mismatch")
    meta = pickle.loads(blob)
    data_bytes = header["data_bytes"]
    if data_bytes:
        data = np.memmap(path, np.uint8, "r", offset=data_start, shape=(data_bytes,))
        if _checksum(data) != header["checksum"]:
            raise CacheEntryError("data checksum mismatch (corrupted)")
    leaves = []
    for spec in header["leaves"]:
        dtype = np.dtype(jax.numpy.dtype(spec["dtype"]))
        shape = tuple(spec["shape"])
        n = _leaf_bytes(dtype, shape)
        if n == 0:
            leaves.append(np.zeros(shape, dtype))
        else:
            leaves.append(data[spec["offset"] : spec["offset"] + n].view(dtype).reshape(shape))
    treedef = meta["treedef"]
    if treedef.num_leaves != len(leaves):
        raise CacheEntryError(f"{len(leaves)} leaves for a tree of {treedef.num_leaves}")
    params = jax.tree.unflatten(treedef, jax.device_put(leaves))
    return meta["config"], params, meta["tokenizer"], meta["extra"]


__all__ = ["ENV_VAR", "MAX_ENV_VAR", "CacheEntryError", "WeightsCache", "flush", "resolve_dir"]
