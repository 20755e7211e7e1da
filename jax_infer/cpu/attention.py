"""Python bindings of the paged attention kernels (attention.cc) of attention backend "cpu":
decode rows (`paged_decode_attention`) and causal prefill rows (`paged_prefill_attention`).
They read K/V pages in place through the block table, where the XLA formulation first
gathers every row's pages into a copy and scores every query against every gathered key.

Their availability is their own (`available()`): they need neither the int8 nor the f32
matmul kernel, only a build of the library (jax_infer/cpu/build.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.cpu import build


def available() -> bool:
    """Whether the attention kernels are built and registered here."""
    return build.has(build.PAGED_ATTENTION)


def attention_supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `paged_decode_attention` takes these head shapes (and is built here)."""
    group = num_heads // num_kv_heads if num_kv_heads else 0
    ok = num_heads % num_kv_heads == 0 and 1 <= group <= 16 and head_dim % 16 == 0
    return ok and head_dim <= 256 and available()


def paged_decode_attention(q, k_pages, v_pages, tables, kv_lens, positions, window: int = 0):
    """One query per row against its pages: q f32[D, N, H], float pools f32[P, L, K, H],
    tables i32[D, pages], kv_lens i32[D], positions i32[D] -> f32[D, N, H]. window > 0 is a
    sliding window (keys at positions > position - window)."""
    return _attention_call(
        build.DECODE_TARGET, q, k_pages, v_pages, tables, kv_lens, positions, window=window
    )


def paged_prefill_attention(q, k_pages, v_pages, tables, positions, window: int = 0, starts=None):
    """Causal prefill rows: row r's queries are q[starts[r] .. starts[r + 1]) (q f32[T, N, H],
    starts i32[P + 1] nondecreasing in [0, T]), read through tables i32[P, pages]; positions
    i32[T] (-1 for padding, whose output is zero, as is any query outside every row). starts
    None: T a multiple of P, row r's Q = T / P queries at r * Q. Query at position p sees keys
    0..p of its row (window > 0: those > p - window). Float pools f32[P_, L, K, H] ->
    f32[T, N, H]; each query's result equals `paged_decode_attention` with kv_len = p + 1."""
    _require()
    if starts is None:
        if q.shape[0] % tables.shape[0]:
            raise ValueError(
                f"paged_prefill_attention: q has {q.shape[0]} queries, not a multiple of the "
                f"{tables.shape[0]} table rows (give starts for rows of other lengths)"
            )
        per_row = q.shape[0] // tables.shape[0]
        starts = np.arange(tables.shape[0] + 1, dtype=np.int32) * per_row
    elif tuple(starts.shape) != (tables.shape[0] + 1,):
        raise ValueError(
            f"paged_prefill_attention: starts has shape {tuple(starts.shape)}, expected "
            f"({tables.shape[0] + 1},): one offset per table row and the end"
        )
    return _attention_call(
        build.PREFILL_TARGET, q, k_pages, v_pages, tables, positions, starts, window=window
    )


def _require() -> None:
    if not available():
        raise RuntimeError(
            f"the CPU attention kernels are not available here (features={build.features()}); "
            'use attention backend "xla"'
        )


def _attention_call(target, q, k_pages, v_pages, *index_arrays, window):
    """An attention kernel's FFI call: f32 q and pools, int32 index arrays, out like q."""
    _require()
    ints = [a.astype(jnp.int32) for a in index_arrays]
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )(q.astype(jnp.float32), k_pages, v_pages, *ints, window=np.int64(window))
