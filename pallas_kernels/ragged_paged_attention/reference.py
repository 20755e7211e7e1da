"""Ragged paged attention in plain jnp: ground truth for the kernels and the CPU fallback.

Each query token is handled on its own (``lax.map`` in small batches): find its
sequence, gather that sequence's pages into a dense ``[S_max, K, H]`` K/V, and run
masked softmax attention. Memory is O(batch_size S_max K H), independent of the
number of tokens; time is O(T S_max N H), like the kernels without their skipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import soft_cap, visible


def token_metadata(
    cu_q_lens: jax.Array,  # i32[max_seqs + 1]
    kv_lens: jax.Array,  # i32[max_seqs]
    num_seqs: jax.Array,  # i32[1]
    num_tokens: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per query token: its sequence, its absolute position, whether it is real.

    Sequence ``s`` owns tokens ``cu_q_lens[s] <= t < cu_q_lens[s + 1]``; its query
    ``i`` sits at position ``kv_lens[s] - q_len + i`` because the new tokens are the
    last ``q_len`` of its ``kv_lens[s]``. Tokens from ``cu_q_lens[num_seqs]`` on are
    padding.
    """
    max_seqs = kv_lens.shape[0]
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    # side="right" skips empty sequences: with cu = [0, 3, 3, 5], token 3 is in seq 2.
    seq = jnp.searchsorted(cu_q_lens[1:], tok, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, max_seqs - 1)
    q_start, q_end = cu_q_lens[seq], cu_q_lens[seq + 1]
    pos = kv_lens[seq] - (q_end - q_start) + (tok - q_start)
    real = tok < cu_q_lens[num_seqs[0]]
    return seq, pos, real


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, L, K, H]
    v_pages: jax.Array,  # [P, L, K, H]
    kv_lens: jax.Array,  # i32[max_seqs]
    block_tables: jax.Array,  # i32[max_seqs, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[max_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    batch_size: int = 8,
) -> jax.Array:  # [T, N, H], dtype of q; zeros for padding tokens
    """Causal attention of each sequence's new tokens over its paged K/V."""
    T, N, H = q.shape
    P, L, K, _ = k_pages.shape
    G = N // K
    pages_per_seq = block_tables.shape[1]
    S_max = pages_per_seq * L
    scale = H**-0.5 if scale is None else scale
    seq, pos, real = token_metadata(cu_q_lens, kv_lens, num_seqs, T)
    kv_pos = jnp.arange(S_max)

    def attend(args):
        q_t, s, p, is_real = args  # [N, H], seq, position, bool
        kv_len = kv_lens[s]
        # Table entries past the sequence's last page may be anything: read page 0
        # there instead, and select every key past kv_len away below.
        slot = jnp.arange(pages_per_seq)
        pages = jnp.where(slot * L < kv_len, block_tables[s], 0)
        k = k_pages[jnp.clip(pages, 0, P - 1)].reshape(S_max, K, H).astype(jnp.float32)
        v = v_pages[jnp.clip(pages, 0, P - 1)].reshape(S_max, K, H).astype(jnp.float32)
        scores = jnp.einsum(
            "kgh,skh->kgs",
            q_t.reshape(K, G, H).astype(jnp.float32),
            k,
            precision=jax.lax.Precision.HIGHEST,
        )
        scores = soft_cap(scores * scale, logits_soft_cap)
        mask = visible(p, kv_pos, kv_len, causal=True, sliding_window=sliding_window) & is_real
        scores = jnp.where(mask, scores, -jnp.inf)
        m = jnp.max(scores, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.where(mask, jnp.exp(scores - m), 0.0)
        denom = jnp.sum(w, axis=-1, keepdims=True)
        w = w / jnp.where(denom > 0, denom, 1.0)
        v = jnp.where((kv_pos < kv_len)[:, None, None], v, 0.0)
        out = jnp.einsum("kgs,skh->kgh", w, v, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(N, H)

    out = jax.lax.map(attend, (q, seq, pos, real), batch_size=min(batch_size, T))
    return out.astype(q.dtype)
