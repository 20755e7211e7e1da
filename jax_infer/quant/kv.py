"""int8 KV cache: keys and values stored as int8 with one f32 scale per (token, KV head).

Each cached vector x [H] (one token, one KV head) is stored symmetric:

    values = round(x / s) in [-127, 127] (s8),   s = max|x| / 127 (f32; 1 for an all-zero x)

so the error per element is at most s / 2 and a vector's scale follows its own range: keys
have a few large channels that differ per head and per token, which a scale shared across
heads or tokens would spend most of its 256 levels on. A token then costs H + 4 bytes per head
and per K or V, against 4H at f32 and 2H at bf16: for SmolLM2 (H = 64) 68 bytes against 256
(3.8x the tokens in the same budget) and 128 (1.9x).

The pool stores exactly `quantize_kv(k)`, and attention reads `dequantize_kv` of the gathered
pages; `fake_quantize_kv` is the same round trip for paths without a quantized pool (the
perplexity evaluator), so both see identical keys and values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

KV_DTYPES = ("auto", "float32", "bfloat16", "int8")
INT8_MAX = 127


class QuantizedPages(NamedTuple):
    """A quantized K or V pool: values s8[P, L, K, H] and scales f32[P, L, K]."""

    values: Any
    scales: Any


def quantize_kv(x):
    """x [..., H] float -> (values s8[..., H], scales f32[...])."""
    xf = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(xf), axis=-1)
    scales = jnp.where(absmax == 0, 1.0, absmax / INT8_MAX)
    values = jnp.clip(jnp.round(xf / scales[..., None]), -INT8_MAX, INT8_MAX)
    return values.astype(jnp.int8), scales


def dequantize_kv(values, scales, dtype=jnp.float32):
    """Inverse of `quantize_kv` (up to rounding): values [..., H] * scales [...] in dtype."""
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def fake_quantize_kv(x):
    """x as the int8 cache would return it: dequantize_kv(quantize_kv(x)) in x's dtype."""
    return dequantize_kv(*quantize_kv(x), x.dtype)


def init_quantized_pages(shape) -> QuantizedPages:
    """Zeroed pool of shape [P, L, K, H] (scales [P, L, K])."""
    return QuantizedPages(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:-1], jnp.float32))


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype, backend: str | None = None):
    """The pool's element dtype for a `kv_cache_dtype` name. "auto" follows the model, except
    a bfloat16 model under the "cpu" attention backend, which gets float32 pages: its C++
    attention kernels read f32 pages, and a bf16 pool falls back to XLA's bf16 attention,
    whose decode step ran ~9x slower for SmolLM2 (786 against 88 ms, loaded 2-core EPYC)."""
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {KV_DTYPES}")
    if kv_cache_dtype == "auto":
        if backend == "cpu" and jnp.dtype(model_dtype) == jnp.bfloat16:
            return jnp.dtype(jnp.float32)
        return jnp.dtype(model_dtype)
    return jnp.dtype(kv_cache_dtype)


def kv_bytes_per_head(dtype, head_dim: int) -> int:
    """Bytes one token's K (or V) takes per KV head in a pool of this dtype."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return head_dim + 4  # int8 values and one f32 scale
    return head_dim * dtype.itemsize
