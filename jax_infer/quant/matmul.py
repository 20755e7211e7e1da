"""Products with quantized matrices: what the `model.layers` seams call for them.

Two formulations, chosen by the platform:

* on the CPU: the native kernels of `jax_infer.cpu.matmul` (matmul_quant.cc), which read
  the quantized bytes once and multiply them in registers (int8 dot products, VNNI). At batch 1 decode is bound by
  reading the weights, and this is the only formulation we found for which fewer bytes is
  faster; with more rows (prefill) it stays level with XLA's f32 GEMM, while every XLA
  formulation on quantized weights is 2-5x slower than f32 at 8 to 128 rows
  (scripts/bench_quant_matmul.py, 30 chained layers). The reason: XLA:CPU does not fuse a
  conversion into its dot, and in a whole forward it hoists every layer's dequantization
  to the start of the step and holds them all at once (424 MB of f32 temporaries for
  SmolLM2; 150-300 ms a decode step).
* elsewhere (GPU, TPU), or where the kernels cannot be built: dequantize to f32 and let
  XLA's dot run. GPU and TPU compilers fuse the conversion into the dot. For per-column int8
  the scale is applied to the [M, N] output instead of the [K, N] weight (one multiply per
  output, not per weight).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jax_infer.cpu import matmul as cpu_matmul
from jax_infer.quant.arrays import (
    Int4Array,
    Int8Array,
    QuantizedArray,
    dequantize_stored,
)


def xla_matmul(x, q: QuantizedArray):
    """x f32[M, K] @ q -> f32[M, N] by dequantize-then-dot."""
    if isinstance(q, Int8Array) and q.groups == 1:
        y = jnp.einsum("mk,tkc->mtc", x, q.values.astype(jnp.float32))  # [M, N/T, T]
        return y.reshape(x.shape[0], -1) * q.scales[0]
    return x @ dequantize_stored(q, jnp.float32)


def kernel_matmul(x, q: QuantizedArray):
    """x f32[M, K] @ q -> f32[M, N] by the CPU kernels (jax_infer/cpu/matmul_quant.cc)."""
    return kernel_matmul_many(x, (q,))[0]


def kernel_matmul_many(x, qs):
    """x f32[M, K] @ each of qs (one format) -> a list of f32[M, N_i], in one kernel call."""
    if all(isinstance(q, Int8Array) for q in qs):
        return cpu_matmul.int8_matvec_multi(x, [(q.values, q.scales) for q in qs])
    if all(isinstance(q, Int4Array) for q in qs):
        return cpu_matmul.int4_matvec_multi(
            x, [(q.packed, q.block_scale, q.block_min, q.scale_step, q.min_step) for q in qs]
        )
    raise TypeError(f"no kernel for {[type(q).__name__ for q in qs]} in one call")


def use_kernel(q: QuantizedArray) -> bool:
    """Whether q fits the kernels' tiling and its kernel is built here."""
    k, n = q.stored_shape
    return cpu_matmul.supports(k, n, q.group_size, q.bits) and cpu_matmul.available(q.bits)


def quantized_matmul(x, q: QuantizedArray, *, force_xla: bool = False):
    """x [..., K] @ the stored [K, N] matrix of q -> [..., N] in x's dtype (f32 inside)."""
    k, n = q.stored_shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the quantized matrix expects K={k}")
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, k).astype(jnp.float32)
    if rows > 0 and not force_xla and use_kernel(q):
        y = jax.lax.platform_dependent(
            x2,
            cpu=functools.partial(kernel_matmul, q=q),
            default=functools.partial(xla_matmul, q=q),
        )
    else:
        y = xla_matmul(x2, q)
    return y.reshape(*lead, n).astype(x.dtype)


def quantized_matmul_many(x, qs, *, force_xla: bool = False):
    """x [..., K] @ each stored [K, N_i] matrix of qs -> a tuple of [..., N_i] in x's dtype.
    Where the kernels take every matrix and they share one format, it is one kernel call
    (x quantized once, all column tiles one job; see jax_infer/cpu/matmul_quant.cc);
    otherwise one `quantized_matmul` each. The results are the same either way: the kernel
    computes each matrix's tiles exactly as it does alone."""
    qs = tuple(qs)
    k = x.shape[-1]
    for q in qs:
        if q.stored_shape[0] != k:
            raise ValueError(
                f"x has {k} features but a quantized matrix expects K={q.stored_shape[0]}"
            )
    lead = x.shape[:-1]
    rows = math.prod(lead)
    fused = (
        len(qs) > 1
        and rows > 0
        and not force_xla
        and len({type(q) for q in qs}) == 1
        and all(use_kernel(q) for q in qs)
    )
    if not fused:
        return tuple(quantized_matmul(x, q, force_xla=force_xla) for q in qs)
    x2 = x.reshape(rows, k).astype(jnp.float32)
    ys = jax.lax.platform_dependent(
        x2,
        cpu=lambda a: tuple(kernel_matmul_many(a, qs)),
        default=lambda a: tuple(xla_matmul(a, q) for q in qs),
    )
    return tuple(y.reshape(*lead, q.stored_shape[1]).astype(x.dtype) for y, q in zip(ys, qs))


def quantized_take(q: QuantizedArray, tokens, dtype):
    """Rows of a quantized embedding (stored transposed, as the LM head [D, V]) for tokens
    i32[...] -> [..., D] in dtype: gather the token columns, dequantize only those."""
    if not q.transposed:
        raise ValueError(
            "a quantized embedding must be stored transposed (as the LM head [D, V]); "
            f"got a {type(q).__name__} of shape {q.shape} with transposed=False"
        )
    flat = tokens.reshape(-1)
    cols = dequantize_stored(q.take_columns(flat), jnp.float32)  # [D, T]
    return cols.T.reshape(*tokens.shape, q.stored_shape[0]).astype(dtype)
