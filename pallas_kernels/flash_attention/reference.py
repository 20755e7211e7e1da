"""Dense attention in plain jnp: the ground truth for the kernels and the CPU fallback.

Scores for every (query, key) pair are materialized, so memory is O(B N T S): use
``blockwise_attention`` for long prompts on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import soft_cap, visible


def as_per_batch(x: jax.Array | int | None, batch: int, default: int) -> jax.Array:
    """Broadcasts an optional scalar or i32[B] to i32[B]."""
    if x is None:
        x = default
    return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))


def attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    q_offset: jax.Array | int | None = None,  # i32[B] or scalar; default 0
    kv_lens: jax.Array | int | None = None,  # i32[B] or scalar; default S
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> jax.Array:  # [B, T, N, H], dtype of q
    """Softmax attention, computed in f32 at highest matmul precision.

    Query ``t`` of batch row ``b`` sits at absolute position ``q_offset[b] + t``;
    keys at positions ``>= kv_lens[b]`` do not exist. Query head ``n`` reads kv head
    ``n // G``. A query that sees no key (only possible with ``kv_lens`` or a
    ``q_offset`` that leaves it before every key) gets a zero output.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = H**-0.5 if scale is None else scale
    q_offset = as_per_batch(q_offset, B, 0)
    kv_lens = as_per_batch(kv_lens, B, S)

    qg = q.reshape(B, T, K, G, H).astype(jnp.float32)
    s = jnp.einsum(
        "btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    s = soft_cap(s * scale, logits_soft_cap)

    q_pos = q_offset[:, None] + jnp.arange(T)[None, :]  # i32[B, T]
    kv_pos = jnp.arange(S)
    mask = visible(
        q_pos[:, :, None],
        kv_pos[None, None, :],
        kv_lens[:, None, None],
        causal=causal,
        sliding_window=sliding_window,
    )  # bool[B, T, S]
    mask = mask[:, None, None, :, :]  # bool[B, 1, 1, T, S]

    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    # Masked values are selected away rather than multiplied by zero so that a
    # NaN beyond kv_lens cannot leak into the output.
    v = jnp.where(
        (kv_pos[None, :] < kv_lens[:, None])[:, :, None, None], v.astype(jnp.float32), 0.0
    )
    o = jnp.einsum("bkgts,bskh->btkgh", p, v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(B, T, N, H).astype(q.dtype)
