"""Input checks for flash attention; each error names the argument, its value and the rule.

Shapes and dtypes are static, so ``validate_inputs`` runs at trace time and costs
nothing per call. Values of ``q_offset``/``kv_lens`` are checked only when they are
host data (Python ints or numpy arrays): checking device arrays would force a sync.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ALLOWED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dtype_names() -> str:
    return ", ".join(jnp.dtype(d).name for d in ALLOWED_DTYPES)


def validate_block_size(name: str, value: object, *, multiple_of: int = 8) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}; allowed: a positive int")
    if value % multiple_of:
        raise ValueError(f"{name}={value}; allowed: a multiple of {multiple_of}")


def validate_optional_positive(name: str, value: object, *, integer: bool) -> None:
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "int" if integer else "number"
        raise ValueError(f"{name}={value!r}; allowed: None or a positive {kind}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}; allowed: None or a positive finite value")


def validate_length_arg(name: str, value: object, batch: int) -> None:
    """``q_offset``/``kv_lens``: None, an int, or an integer array of shape () or [B]."""
    if value is None:
        return
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}; allowed: None, an int or an integer array")
    if isinstance(value, int):
        return
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"{name} has type {type(value).__name__} dtype {dtype}; "
            "allowed: None, an int or an integer array"
        )
    if tuple(shape) not in ((), (batch,)):
        raise ValueError(f"{name}.shape={tuple(shape)}; allowed: () or ({batch},) = (B,)")


def validate_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_offset: object = None,
    kv_lens: object = None,
    scale: object = None,
    sliding_window: object = None,
    logits_soft_cap: object = None,
) -> None:
    """Static checks of q [B, T, N, H] and k, v [B, S, K, H]; raises ValueError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            axes = "[B, T, N, H]" if name == "q" else "[B, S, K, H]"
            raise ValueError(f"{name}.shape={tuple(x.shape)}; allowed: rank 4 {axes}")
        if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in ALLOWED_DTYPES]:
            raise ValueError(f"{name}.dtype={x.dtype}; allowed: {_dtype_names()}")
    if k.shape != v.shape:
        raise ValueError(f"v.shape={tuple(v.shape)}; allowed: equal to k.shape={tuple(k.shape)}")
    if k.dtype != v.dtype:
        raise ValueError(f"v.dtype={v.dtype}; allowed: equal to k.dtype={k.dtype}")
    B, T, N, H = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k.shape[0]={k.shape[0]}; allowed: the batch of q, {B}")
    if k.shape[3] != H:
        raise ValueError(f"k.shape[3]={k.shape[3]}; allowed: the head dim of q, {H}")
    if min(B, T, N, H) <= 0 or min(k.shape) <= 0:
        raise ValueError(
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}; allowed: no empty axis"
        )
    K = k.shape[2]
    if N % K:
        raise ValueError(
            f"k.shape[2]={K} kv heads with q.shape[2]={N} query heads; "
            "allowed: N a multiple of K (grouped-query attention)"
        )
    validate_length_arg("q_offset", q_offset, B)
    validate_length_arg("kv_lens", kv_lens, B)
    validate_optional_positive("scale", scale, integer=False)
    validate_optional_positive("sliding_window", sliding_window, integer=True)
    validate_optional_positive("logits_soft_cap", logits_soft_cap, integer=False)


def _host_values(value: object) -> np.ndarray | None:
    if isinstance(value, int) or isinstance(value, np.ndarray | np.integer):
        return np.asarray(value)
    return None


def validate_length_values(q_offset: object, kv_lens: object, *, S: int) -> None:
    """Value checks of host-side ``q_offset`` and ``kv_lens``; device arrays are skipped."""
    offsets = _host_values(q_offset)
    if offsets is not None and (offsets < 0).any():
        raise ValueError(f"q_offset={offsets.tolist()}; allowed: >= 0")
    lens = _host_values(kv_lens)
    if lens is not None and ((lens < 0) | (lens > S)).any():
        raise ValueError(f"kv_lens={lens.tolist()}; allowed: 0 <= kv_lens <= S={S}")
