"""What jax_infer's on-disk caches share: atomic writes, LRU bounds, a source fingerprint.

Two caches live next to jax's compilation cache (compile_cache.py), in subdirectories of its
directory, and are off when it is off:

* `weights/` (weights/cache.py): converted weights, so a second start skips dequantizing and
  laying them out;
* `programs/` (program_store.py): serialized step executables, so a second start skips
  tracing and lowering the step.

Both are keyed, among other things, by `source_fingerprint()`: a hash of jax_infer's own
source, so that an edit to the code that converts weights or traces the step can never be
answered from an entry the old code made. Entries are written to a temporary name and
renamed (a reader never sees half a file; a crash leaves a temporary file that `evict`
removes later), and each directory is bounded: past its size, the least recently used
entries (oldest mtime; a hit touches its file) are deleted.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Temporary files older than this are a crashed writer's: eviction removes them.
_STALE_TMP_SECONDS = 3600.0


@functools.cache
def source_fingerprint() -> str:
    """sha256 (16 hex digits) of every source file of the jax_infer package (.py, and the C++
    kernels' .cc/.h), by relative path and content, plus the jax and jaxlib versions. Read
    once per process (a few ms)."""
    import jax
    import jaxlib

    h = hashlib.sha256(f"jax {jax.__version__} jaxlib {jaxlib.__version__}\0".encode())
    for root, dirs, files in os.walk(_PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".cc", ".h")):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
                h.update(b"\0")
    return h.hexdigest()[:16]


def touch(path: str) -> None:
    """Mark an entry as just used (its mtime orders eviction)."""
    try:
        os.utime(path)
    except OSError:
        pass


def write_atomic(path: str, write: Callable) -> None:
    """write(f) into a temporary file beside `path`, then rename it to `path`."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def evict(directory: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Delete the least recently used entries of `directory` (files, by mtime) until their
    total is at most max_bytes (-1: no bound), never `keep`; stale temporary files go too.
    Returns the deleted paths."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    entries, removed, now = [], [], time.time()
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if name.startswith(".tmp-"):
            if now - st.st_mtime > _STALE_TMP_SECONDS:
                remove(path)
                removed.append(path)
            continue
        entries.append((st.st_mtime, st.st_size, path))
    if max_bytes < 0:
        return removed
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path == keep:
            continue
        remove(path)
        removed.append(path)
        total -= size
    if removed:
        log.info("cache %s: evicted %d entries", directory, len(removed))
    return removed


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def env_bytes(name: str, default_gb: float) -> int:
    """A size bound in GiB from the environment variable `name` (default `default_gb`; -1: no
    bound), in bytes."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return int(default_gb * 2**30)
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is invalid: allowed are a size in GiB "
            "(e.g. 4 or 0.5) or -1 (no bound)"
        ) from None
    return -1 if gb < 0 else int(gb * 2**30)


__all__ = ["env_bytes", "evict", "remove", "source_fingerprint", "touch", "write_atomic"]
