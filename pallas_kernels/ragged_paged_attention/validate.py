"""Input checks for ragged paged attention; errors name the argument, its value, the rule.

``validate_inputs`` checks shapes and dtypes (static, free at trace time).
``validate_metadata`` checks the values of the metadata; the wrapper runs it when the
metadata is host data (numpy), which is how a scheduler builds it, and skips device
arrays, whose values would cost a sync to read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention.validate import (
    ALLOWED_DTYPES,
    validate_optional_positive,
)


def _check_int_array(name: str, x: object, shape: tuple[int, ...], meaning: str) -> None:
    got_shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if got_shape is None or dtype is None:
        raise ValueError(f"{name} has type {type(x).__name__}; allowed: an i32{list(shape)} array")
    if jnp.dtype(dtype) != jnp.int32:
        raise ValueError(f"{name}.dtype={dtype}; allowed: int32")
    if tuple(got_shape) != shape:
        raise ValueError(f"{name}.shape={tuple(got_shape)}; allowed: {shape} = {meaning}")


def validate_inputs(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    scale: object = None,
    sliding_window: object = None,
    logits_soft_cap: object = None,
) -> None:
    """Static checks of q [T, N, H], pages [P, L, K, H] and the i32 metadata."""
    allowed = [jnp.dtype(d) for d in ALLOWED_DTYPES]
    names = ", ".join(d.name for d in allowed)
    if q.ndim != 3:
        raise ValueError(f"q.shape={tuple(q.shape)}; allowed: rank 3 [T, N, H]")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.ndim != 4:
            raise ValueError(f"{name}.shape={tuple(x.shape)}; allowed: rank 4 [P, L, K, H]")
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if jnp.dtype(x.dtype) not in allowed:
            raise ValueError(f"{name}.dtype={x.dtype}; allowed: {names}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(
            f"v_pages.shape={tuple(v_pages.shape)}; allowed: equal to "
            f"k_pages.shape={tuple(k_pages.shape)}"
        )
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages.dtype={v_pages.dtype}; allowed: equal to {k_pages.dtype}")
    T, N, H = q.shape
    P, L, K, Hk = k_pages.shape
    if min(T, N, H) <= 0 or min(P, L, K, Hk) <= 0:
        raise ValueError(
            f"q.shape={tuple(q.shape)}, k_pages.shape={tuple(k_pages.shape)}; "
            "allowed: no empty axis"
        )
    if Hk != H:
        raise ValueError(f"k_pages.shape[3]={Hk}; allowed: the head dim of q, {H}")
    if N % K:
        raise ValueError(
            f"k_pages.shape[2]={K} kv heads with q.shape[1]={N} query heads; "
            "allowed: N a multiple of K (grouped-query attention)"
        )
    kv_shape = getattr(kv_lens, "shape", None)
    if kv_shape is None or len(kv_shape) != 1 or kv_shape[0] <= 0:
        raise ValueError(f"kv_lens.shape={kv_shape}; allowed: (max_seqs,) with max_seqs >= 1")
    max_seqs = kv_shape[0]
    _check_int_array("kv_lens", kv_lens, (max_seqs,), "(max_seqs,)")
    _check_int_array("cu_q_lens", cu_q_lens, (max_seqs + 1,), "(max_seqs + 1,)")
    bt_shape = getattr(block_tables, "shape", None)
    if bt_shape is None or len(bt_shape) != 2 or bt_shape[1] <= 0:
        raise ValueError(
            f"block_tables.shape={bt_shape}; allowed: (max_seqs={max_seqs}, pages_per_seq >= 1)"
        )
    _check_int_array(
        "block_tables", block_tables, (max_seqs, bt_shape[1]), "(max_seqs, pages_per_seq)"
    )
    _check_int_array("num_seqs", num_seqs, (1,), "(1,)")
    validate_optional_positive("scale", scale, integer=False)
    validate_optional_positive("sliding_window", sliding_window, integer=True)
    validate_optional_positive("logits_soft_cap", logits_soft_cap, integer=False)


def validate_metadata(
    kv_lens: np.ndarray,  # i32[max_seqs]
    block_tables: np.ndarray,  # i32[max_seqs, pages_per_seq]
    cu_q_lens: np.ndarray,  # i32[max_seqs + 1]
    num_seqs: np.ndarray,  # i32[1]
    *,
    num_tokens: int,
    num_pages: int,
    page_size: int,
) -> None:
    """Value checks of host metadata; only the first ``num_seqs`` sequences are read."""
    kv_lens, block_tables = np.asarray(kv_lens), np.asarray(block_tables)
    cu_q_lens, num_seqs = np.asarray(cu_q_lens), np.asarray(num_seqs)
    max_seqs, pages_per_seq = block_tables.shape
    n = int(num_seqs[0])
    if not 0 <= n <= max_seqs:
        raise ValueError(f"num_seqs={n}; allowed: 0 <= num_seqs <= max_seqs={max_seqs}")
    cu = cu_q_lens[: n + 1]
    if cu[0] != 0:
        raise ValueError(f"cu_q_lens[0]={int(cu[0])}; allowed: 0")
    q_lens = np.diff(cu)
    if (q_lens < 0).any():
        s = int(np.argmax(q_lens < 0))
        raise ValueError(
            f"cu_q_lens[{s}:{s + 2}]={cu[s : s + 2].tolist()}; allowed: non-decreasing"
        )
    if cu[-1] > num_tokens:
        raise ValueError(
            f"cu_q_lens[num_seqs={n}]={int(cu[-1])}; allowed: <= q.shape[0]={num_tokens}"
        )
    lens = kv_lens[:n]
    max_len = pages_per_seq * page_size
    for s in range(n):
        if not q_lens[s] <= lens[s] <= max_len:
            raise ValueError(
                f"kv_lens[{s}]={int(lens[s])} with q_len={int(q_lens[s])}; allowed: "
                f"q_len <= kv_lens <= pages_per_seq * page_size = {max_len} (the new "
                "tokens' K/V are already in the pages)"
            )
        used = block_tables[s, : -(-int(lens[s]) // page_size)]
        bad = (used < 0) | (used >= num_pages)
        if bad.any():
            p = int(np.argmax(bad))
            raise ValueError(
                f"block_tables[{s}, {p}]={int(used[p])}; allowed: 0 <= page < P={num_pages}"
            )
