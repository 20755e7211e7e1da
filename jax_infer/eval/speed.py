"""Batch-1 speed of an `LLM`: prefill and decode tokens/s, and the weight bytes they read.

Shared by `scripts/benchmark.py` and `scripts/model_report.py`, so both measure the same way:
time to the first token of one prompt (prefill, sampling included), then tokens/s over the
generated tokens through the loop `LLM.generate` runs (host round trip included). Decode at
batch 1 reads every weight once per token, so weight bytes x tokens/s is the bandwidth
achieved; `measure_read_bandwidth` measures the machine's the same way (streaming reads on
the kernels' threads).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class ReadBandwidth:
    """A read-bandwidth measurement: the best pass (the ceiling) and every timed pass, so a
    report can show how far apart they were on a shared machine."""

    best_gb_per_s: float
    runs_gb_per_s: tuple[float, ...]
    sizes_bytes: tuple[int, ...]
    method: str  # "kernel pool, N threads" (probe.cc) or "xla sum" (no kernels here)

    @property
    def spread(self) -> tuple[float, float, float]:
        """(min, median, max) GB/s over every timed pass."""
        runs = sorted(self.runs_gb_per_s)
        return runs[0], float(np.median(runs)), runs[-1]

    def describe(self) -> str:
        lo, mid, hi = self.spread
        sizes = "/".join(f"{b / 2**20:.0f}" for b in self.sizes_bytes)
        return (
            f"best {self.best_gb_per_s:.1f} GB/s (min {lo:.1f}, median {mid:.1f} over "
            f"{len(self.runs_gb_per_s)} passes of {sizes} MiB; {self.method})"
        )


def _xla_sum_pass(nbytes: int):
    x = jnp.ones(nbytes // 4, jnp.float32)
    reduce = jax.jit(jnp.sum)
    reduce(x).block_until_ready()
    return lambda: reduce(x).block_until_ready()


def _kernel_pass(lib, buffer: np.ndarray, chunk_floats: int):
    fn = lib.JaxInferReadSum
    fn.restype = ctypes.c_float
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    pointer, n = buffer.ctypes.data, buffer.size
    return lambda: fn(pointer, n, chunk_floats)


def measure_read_bandwidth(
    sizes: tuple[int, ...] = (64 * 2**20, 256 * 2**20),
    repeats: int = 12,
    chunk_bytes: int = 2**20,
    buffer_bytes: int = 768 * 2**20,
) -> ReadBandwidth:
    """Bytes/s of streaming reads of memory the caches do not hold: passes of each size in
    `sizes` (a few x the last-level cache) over consecutive windows of one buffer of
    buffer_bytes, so each pass reads what the last (buffer - size) bytes of reads pushed out,
    as a decode step reads weights that the previous step's other layers pushed out.
    `repeats` timed passes per size after one untimed. With the C++ kernels, a vectorized sum
    on their worker pool, the threads a decode step's matmuls read the weights with (chunks of
    chunk_bytes handed out as the kernels hand out tiles); without them, a jitted XLA sum over
    an array of the size. The best pass is the ceiling: on a shared machine a long pass is
    more likely to lose its cores for a while, so smaller windows, many of them, find it."""
    if not sizes or min(sizes) < 2**20:
        raise ValueError(f"sizes={sizes!r} is invalid: give sizes of at least 1 MiB")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid: must be an int >= 1")
    from jax_infer.cpu import build  # here: eval must not build the kernels on import

    lib = build.library()
    runs = []
    if lib is not None:
        total = max(buffer_bytes, 2 * max(sizes)) // 4 // 128 * 128
        # Distinct values on every page: a host that merges identical pages (a buffer of ones
        # is one page repeated) would serve the reads from one cached page.
        buffer = np.arange(total, dtype=np.float32)
        method = f"kernel pool, {os.cpu_count()} threads"
    else:
        method = "xla sum"
    chunk = max(128, chunk_bytes // 4 // 128 * 128)
    for nbytes in sizes:
        if lib is not None:
            n = nbytes // 4 // 128 * 128
            windows = [
                _kernel_pass(lib, buffer[i * n : (i + 1) * n], chunk) for i in range(total // n)
            ]
            passes = [windows[i % len(windows)] for i in range(repeats + 1)]
        else:
            passes = [_xla_sum_pass(nbytes)] * (repeats + 1)
        passes[0]()
        for one in passes[1:]:
            t0 = time.perf_counter()
            one()
            runs.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return ReadBandwidth(max(runs), tuple(runs), tuple(sizes), method)


def read_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best bytes/s of streaming reads over `nbytes` (see measure_read_bandwidth)."""
    return measure_read_bandwidth((nbytes,), repeats).best_gb_per_s


def tree_bytes(tree) -> int:
    """Bytes of the arrays in a params (sub)tree; a quantized matrix is a pytree of its
    arrays (int8 values or packed int4 bytes, scales), so this counts what is stored."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def decode_read_bytes(params) -> int:
    """Weight bytes one decode step reads: every weight, except the embedding table when a
    separate [D, V] LM head exists (the lookup reads one row; on CPU a tied f32 embedding
    also gets a head copy, see model.llama.untie_lm_head)."""
    total = tree_bytes(params)
    if "lm_head" in params and "embed" in params:
        total -= tree_bytes(params["embed"])
    return total


def run_once(llm, prompt_ids: list[int], decode_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) for one greedy request."""
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    stamps = []
    t0 = time.perf_counter()
    for _ in llm.stream([prompt_ids], params):
        stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    decode_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return ttft, decode_rate


def measure_speed(llm, prompt_ids: list[int], decode_tokens: int, repeats: int = 3) -> dict:
    """Median prefill and decode tokens/s over `repeats` runs after one compiling run.
    Build the LLM with enable_prefix_caching=False: a cache hit on the repeated prompt would
    turn the prefill measurement into a one-token step."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid: must be an int >= 1")
    run_once(llm, prompt_ids, decode_tokens)  # compile every shape used below
    runs = [run_once(llm, prompt_ids, decode_tokens) for _ in range(repeats)]
    ttft = float(np.median([r[0] for r in runs]))
    return {
        "prompt_len": len(prompt_ids),
        "decode_tokens": decode_tokens,
        "ttft_s": ttft,
        "prefill_tokens_per_s": len(prompt_ids) / ttft,
        "decode_tokens_per_s": float(np.median([r[1] for r in runs])),
        "decode_runs_tokens_per_s": [r[1] for r in runs],
    }
