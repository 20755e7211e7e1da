"""Helpers shared by the attention kernels: backend choice, interpret mode, masking."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import tpu as pltpu

Backend = Literal["tpu", "gpu", "reference"]
BACKENDS: tuple[str, ...] = ("tpu", "gpu", "reference")

# Finite stand-in for -inf in masked scores: exp(MASK_VALUE - m) underflows to 0
# for any real m, and MASK_VALUE - MASK_VALUE = 0 cannot make a NaN the way
# -inf - -inf does. 0.7 of the f32 maximum leaves room to subtract scores.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# TPU vregs are 8 sublanes by 128 lanes: row-blocks must be multiples of 8 and the
# per-row softmax statistics are kept replicated across 128 lanes, so that they
# broadcast against score tiles without relayouts.
SUBLANES = 8
LANES = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def is_power_of_2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """Picks the kernel variant: the device's own, else the reference on the CPU.

    With ``interpret=True`` on a CPU the TPU kernel runs in the Mosaic interpreter,
    which models the TPU pipeline (resident output blocks, scalar prefetch) most
    faithfully; pass ``backend="gpu"`` to interpret the Triton variant instead.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; allowed: None or one of {BACKENDS}")
        return backend
    platform = jax.default_backend()
    if platform in ("tpu", "gpu"):
        return platform
    return "tpu" if interpret else "reference"


def tpu_interpret(interpret: bool) -> pltpu.InterpretParams | bool:
    """The ``interpret`` argument of a TPU ``pallas_call``."""
    return pltpu.InterpretParams() if interpret else False


def div(x: jax.Array, d: int) -> jax.Array:
    """Integer division of a non-negative i32 by a positive constant.

    ``jnp.floor_divide`` fixes up signs through ``lax.sign``, whose Mosaic lowering
    needs a TPU device; for non-negative values plain truncation is the same answer.
    """
    return jax.lax.div(x, jnp.asarray(d, x.dtype))


def soft_cap(s: jax.Array, cap: float | None) -> jax.Array:
    """Gemma-style logit soft-capping: ``cap * tanh(s / cap)``, identity when None."""
    if cap is None:
        return s
    return cap * jnp.tanh(s / cap)


def visible(
    q_pos: jax.Array,
    kv_pos: jax.Array,
    kv_len: jax.Array | int,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
    """Whether the key at ``kv_pos`` is visible from the query at ``q_pos``.

    Both positions are absolute positions in the sequence, broadcast against each
    other. A key is visible when it exists (``kv_pos < kv_len``), is not in the
    future (causal) and is one of the last ``sliding_window`` positions up to and
    including the query's own.
    """
    mask = kv_pos < kv_len
    if causal:
        mask = mask & (kv_pos <= q_pos)
    if sliding_window is not None:
        mask = mask & (kv_pos > q_pos - sliding_window)
    return mask


def online_softmax_step(s, mask, m_prev, l_prev, acc_prev, v):
    """One K/V tile of the online softmax.

    s, mask: f32/bool[R, C] scores and visibility; m_prev, l_prev: f32[R, X] with X 1
    or lane-replicated; acc_prev: f32[R, H]; v: [C, H] with rows past kv_len zeroed.
    Masked scores are selected away, never multiplied by zero, so a row that has seen
    no key yet keeps l = 0 and acc = 0.
    """
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    acc_next = alpha[:, :1] * acc_prev + pv
    return m_next, l_next, acc_next


def normalize(acc, l_i):
    """acc / l_i per row, zero for rows that saw no key."""
    return acc * jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
