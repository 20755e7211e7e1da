"""Blockwise online-softmax attention in pure jnp, for long prompts on the CPU.

The same algorithm as the kernels, written with ``lax.map`` over query chunks and a
``lax.fori_loop`` over K/V blocks: peak memory is the output-sized accumulator plus
one ``[B, N, block_q, block_kv]`` score block, linear in the sequence length, where
the dense reference needs O(T S). The K/V loop runs only over the blocks some query
of the chunk can see (causal and sliding-window skipping), so it also does about
half the work of the dense reference on causal prefill.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import MASK_VALUE, normalize, round_up, soft_cap, visible
from pallas_kernels.flash_attention.kernel import kv_tile_range
from pallas_kernels.flash_attention.reference import as_per_batch
from pallas_kernels.flash_attention.validate import (
    validate_block_size,
    validate_inputs,
    validate_length_values,
)


def _attend_chunk(
    q: jax.Array,  # [B, C, K, G, H], C = block_q tokens
    k: jax.Array,  # [B, Sp, K, H]
    v: jax.Array,  # [B, Sp, K, H]
    i: jax.Array,  # index of this query chunk
    q_offset: jax.Array,  # i32[B]
    kv_lens: jax.Array,  # i32[B]
    *,
    T: int,
    block_kv: int,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    compute_dtype: jnp.dtype,
) -> jax.Array:  # f32[B, C, K, G, H]
    B, C, K, G, H = q.shape
    tile_range = functools.partial(
        kv_tile_range,
        T=T,
        block_q=C,
        block_kv=block_kv,
        causal=causal,
        sliding_window=sliding_window,
    )
    first, last = tile_range(q_offset, kv_lens, i)  # i32[B] each
    # One loop for the whole batch: the union of the rows' ranges.
    first, last = jnp.min(first), jnp.max(last)
    q_pos = q_offset[:, None] + i * C + jnp.arange(C)[None, :]  # i32[B, C]
    q = q.astype(compute_dtype)

    def body(j, carry):
        m_i, l_i, acc = carry
        start = j * block_kv
        kb = lax.dynamic_slice_in_dim(k, start, block_kv, axis=1).astype(compute_dtype)
        vb = lax.dynamic_slice_in_dim(v, start, block_kv, axis=1).astype(compute_dtype)
        s = jnp.einsum("bckgh,bskh->bkgcs", q, kb, preferred_element_type=jnp.float32)
        s = soft_cap(s * scale, logits_soft_cap)
        kv_pos = start + jnp.arange(block_kv)
        mask = visible(
            q_pos[:, :, None],
            kv_pos[None, None, :],
            kv_lens[:, None, None],
            causal=causal,
            sliding_window=sliding_window,
        )[:, None, None]  # bool[B, 1, 1, C, block_kv]
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_i, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
        alpha = jnp.exp(m_i - m_next)
        l_next = alpha * l_i + jnp.sum(p, axis=-1, keepdims=True)
        # Keys past kv_len may hold anything (a cache's stale slots): select them
        # away so that a NaN there cannot reach the output through 0 * NaN.
        v_ok = (kv_pos[None, :] < kv_lens[:, None])[:, :, None, None]
        vb = jnp.where(v_ok, vb, jnp.zeros_like(vb))
        pv = jnp.einsum(
            "bkgcs,bskh->bkgch", p.astype(compute_dtype), vb, preferred_element_type=jnp.float32
        )
        return m_next, l_next, alpha * acc + pv

    init = (
        jnp.full((B, K, G, C, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((B, K, G, C, 1), jnp.float32),
        jnp.zeros((B, K, G, C, H), jnp.float32),
    )
    _, l_i, acc = lax.fori_loop(first, last + 1, body, init)
    out = normalize(acc, l_i)
    return out.transpose(0, 3, 1, 2, 4)  # [B, C, K, G, H]


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_q",
        "block_kv",
        "causal",
        "scale",
        "sliding_window",
        "logits_soft_cap",
    ),
)
def _blockwise(
    q, k, v, q_offset, kv_lens, *, block_q, block_kv, causal, scale, sliding_window, logits_soft_cap
):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    block_q = min(block_q, round_up(T, 8))
    block_kv = min(block_kv, round_up(S, 8))
    Tp, Sp = round_up(T, block_q), round_up(S, block_kv)
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    # Chunks on a leading axis for lax.map: [Tp // block_q, B, block_q, K, G, H].
    chunks = q.reshape(B, Tp // block_q, block_q, K, G, H).transpose(1, 0, 2, 3, 4, 5)
    # bf16 dots are several times slower than f32 on the CPU; elsewhere keep the
    # input dtype so that the matmul units run at full rate.
    compute_dtype = jnp.float32 if jax.default_backend() == "cpu" else q.dtype
    attend = functools.partial(
        _attend_chunk,
        T=T,
        block_kv=block_kv,
        scale=H**-0.5 if scale is None else scale,
        causal=causal,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
        compute_dtype=compute_dtype,
    )

    def attend_one(args):
        chunk, i = args
        return attend(chunk, k, v, i, q_offset, kv_lens)

    out = lax.map(attend_one, (chunks, jnp.arange(Tp // block_q)))
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(B, Tp, N, H)
    return out[:, :T].astype(q.dtype)


def blockwise_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    block_kv: int = 512,
    block_q: int = 512,
    causal: bool = True,
    q_offset: jax.Array | int | None = None,  # i32[B] or scalar; default 0
    kv_lens: jax.Array | int | None = None,  # i32[B] or scalar; default S
    scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> jax.Array:  # [B, T, N, H]
    """Attention with memory linear in length; same semantics as ``attention_reference``.

    ``block_q`` query tokens are processed at a time (``lax.map``), each against
    ``block_kv``-key blocks (``lax.fori_loop``).
    """
    validate_inputs(
        q,
        k,
        v,
        q_offset=q_offset,
        kv_lens=kv_lens,
        scale=scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    validate_block_size("block_q", block_q)
    validate_block_size("block_kv", block_kv)
    validate_length_values(q_offset, kv_lens, S=k.shape[1])
    B, S = q.shape[0], k.shape[1]
    return _blockwise(
        q,
        k,
        v,
        as_per_batch(q_offset, B, 0),
        as_per_batch(kv_lens, B, S),
        block_q=block_q,
        block_kv=block_kv,
        causal=causal,
        scale=scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
