"""llama.cpp beside jax_infer on one GGUF file: the pieces `scripts/benchmark_llamacpp.py` uses,
without flags so tests can import them. llama-cpp-python is not a jax_infer dependency: it is
imported only when a function needs it, and its absence is a SystemExit saying how to install
it (pip install llama-cpp-python==0.3.36).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import numpy as np

INSTALL_HINT = (
    "scripts/benchmark_llamacpp.py needs llama-cpp-python, which jax_infer does not depend "
    "on: pip install llama-cpp-python==0.3.36"
)
# llama.cpp's `general.file_type` (enum llama_ftype) -> our quantization of the same file.
# Quantized files store the embedding (also the tied LM head) quantized too (Q8_0, Q4_0,
# Q4_1 or Q6_K), so ours quantizes it as well (+embed): a float32 head would read 113 MB a
# token for SmolLM2 and 671 MB for Gemma-3-270M, more than all their int8 layers.
FILE_TYPES = {
    0: ("F32", None),
    1: ("F16", None),
    2: ("Q4_0", "int4+embed"),
    3: ("Q4_1", "int4+embed"),
    7: ("Q8_0", "int8+embed"),
    14: ("Q4_K_S", "int4+embed"),
    15: ("Q4_K_M", "int4+embed"),
}
REQUANTIZE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}


def import_llama_cpp():
    """The llama_cpp module, or SystemExit saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemExit(INSTALL_HINT) from e
    return llama_cpp


def file_type(path: str) -> int:
    """`general.file_type` of a GGUF file (llama.cpp's llama_ftype)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        raise ValueError(f"{path!r} has no general.file_type: cannot match its precision")
    return int(field.parts[field.data[0]][0])


def ours_for(path: str) -> tuple[str, str | None]:
    """(the file's type name, our quantization at the matching precision)."""
    ftype = file_type(path)
    if ftype not in FILE_TYPES:
        raise ValueError(
            f"{path!r} has general.file_type={ftype}: no matching precision of ours; "
            f"supported are {sorted(name for name, _ in FILE_TYPES.values())}"
        )
    return FILE_TYPES[ftype]


def requantized(src: str, target: str, cache_dir: str) -> str:
    """A copy of src requantized to `target` (a key of REQUANTIZE), made once under cache_dir."""
    if target not in REQUANTIZE:
        raise ValueError(f"requantize={target!r} is not supported: allowed are {list(REQUANTIZE)}")
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(src))[0]
    out = os.path.join(cache_dir, f"{stem}.{target}.gguf")
    if os.path.isfile(out):
        return out
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = REQUANTIZE[target]
    params.allow_requantize = True
    params.nthread = max(1, os.cpu_count() or 1)
    tmp = out + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src!r} -> {target}) returned {rc}")
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _no_extra_bufts(llama_cpp):
    """`Llama` builds its model params from `llama_model_default_params()` with no way to set
    use_extra_bufts; patch the default while the model loads."""
    module = llama_cpp.llama.llama_cpp
    default = module.llama_model_default_params

    def patched():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = patched
    try:
        yield
    finally:
        module.llama_model_default_params = default


class LlamaCpp:
    """One llama.cpp model and context: greedy batch-1 runs over token ids."""

    def __init__(self, path: str, n_ctx: int, n_threads: int):
        llama_cpp = import_llama_cpp()
        self.llama_cpp = llama_cpp
        with _no_extra_bufts(llama_cpp):
            self.llm = llama_cpp.Llama(
                path,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
            )
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def run(self, prompt_ids: list[int], decode_tokens: int) -> tuple[float, float, list[int]]:
        """(seconds to the first token, decode tokens/s after it, the greedy tokens), timed
        as `jax_infer.eval.speed.run_once` times ours: first token = prefill + its argmax."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt_ids)
        out = [self._argmax()]
        t1 = time.perf_counter()
        for _ in range(decode_tokens - 1):
            self.llm.eval([out[-1]])
            out.append(self._argmax())
        t2 = time.perf_counter()
        return t1 - t0, (decode_tokens - 1) / (t2 - t1), out


def cpu_flags() -> dict:
    """`lscpu`'s model name and flags (empty where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {
        "model_name": fields.get("Model name", "").strip(),
        "flags": fields.get("Flags", "").split(),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"
