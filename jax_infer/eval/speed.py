"""Batch-1 speed of an `LLM`: prefill and decode tokens/s, and the weight bytes they read.

Shared by `scripts/benchmark.py` and `scripts/model_report.py`, so both measure the same way:
time to the first token of one prompt (prefill, sampling included), then tokens/s over the
generated tokens through the loop `LLM.generate` runs (host round trip included). Decode at
batch 1 reads every weight once per token, so weight bytes x tokens/s is the bandwidth
achieved; `read_bandwidth_gbs` measures the machine's the same way.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.sampling import SamplingParams


def read_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a jitted sum over an f32 array far larger than the caches."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    reduce = jax.jit(jnp.sum)
    reduce(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reduce(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


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
