"""Paged attention backends over a page pool, behind one interface.

Each layer keeps K and V pools [P, L, K, H] (P pages of L tokens). A step first scatters the
new tokens' K/V to their slots (`slot_mapping`), then attends every query over its sequence's
pages, read through the block table. Backends:

  reference  per-token gather of the whole sequence, dense softmax: obviously correct, slow.
  xla        decode rows as one batched gather + einsum; prefill chunks gathered into a
             [P_pad, Q] block with a causal mask. Plain jnp.
  cpu        decode rows and causal prefill rows by C++ kernels (jax_infer/cpu/attention.cc, built
             on first use) that read pages in place: the CPU default when they build (float
             pools only; int8 pools and unsupported head shapes take the xla path). The xla
             prefill path scores every query against every key of the step's page bucket
             (a 480-token prompt chunk beside decodes at ~600 tokens: ~1.2 s of a 1.8 s
             step); the kernel skips the masked half and reads each K/V chunk once per
             block of queries (~80 ms over SmolLM2's 30 layers).
  pallas     the ragged paged attention kernel (pallas_kernels/), for TPU/GPU.

A pool is either a float array or, for the int8 KV cache, a `QuantizedPages` (values
s8[P, L, K, H], scales f32[P, L, K]; see quant/kv.py): `write_pages` quantizes what it
stores and the jnp backends dequantize only the pages they gather, so a step reads a
quarter of the f32 bytes. The Pallas kernel reads float pages only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.attention.metadata import AttentionMetadata
from jax_infer.cpu import attention as cpu_kernels
from jax_infer.quant.kv import QuantizedPages, dequantize_kv, quantize_kv

BACKENDS = ("reference", "xla", "cpu", "pallas")


def write_pages(pages, new, slot_mapping):
    """Scatter new [T, K, H] into pages [P, L, K, H] at flat slots i32[T], in place once the
    pool is donated. Indexed as (page, offset) rather than through a reshaped [P*L] view: with
    a single token XLA:CPU otherwise copied the whole pool every layer (measured: a batch-1
    decode step went from 40 ms to 1.1 s with a 1,024-page pool)."""
    if isinstance(pages, QuantizedPages):
        values, scales = quantize_kv(new)
        return QuantizedPages(
            write_pages(pages.values, values, slot_mapping),
            write_pages(pages.scales, scales, slot_mapping),
        )
    page_size = pages.shape[1]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    return pages.at[page, offset].set(new.astype(pages.dtype))


def _softmax_attend(scores, mask, v_dtype, softcap=None):
    if softcap is not None:
        # Gemma 2's soft-capping of the scaled scores, before the mask (as HF).
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    # A row with no visible key (padding) has NaN probabilities: zero them, its output is unused.
    return jnp.where(jnp.isnan(probs), 0.0, probs).astype(v_dtype)


def _gather_rows(pages, tables, dtype):
    """pages [P, L, K, H], tables i32[R, pages] -> [R, pages * L, K, H] in dtype (an int8
    pool is dequantized after the gather, so only the gathered pages are converted)."""
    if isinstance(pages, QuantizedPages):
        g = dequantize_kv(pages.values[tables], pages.scales[tables], dtype)
    else:
        g = pages[tables]
    rows, num, page_size, kh, h = g.shape
    return g.reshape(rows, num * page_size, kh, h)


def _kv_heads(pages) -> int:
    return (pages.values if isinstance(pages, QuantizedPages) else pages).shape[2]


def _page_size(pages) -> int:
    return (pages.values if isinstance(pages, QuantizedPages) else pages).shape[1]


def reference_attention(
    q, k_pages, v_pages, meta: AttentionMetadata, sliding_window=None, softcap=None
):
    """q [T, N, H] -> [T, N, H]: each flat token gathers its own row's pages."""
    t, n, h = q.shape
    kh = _kv_heads(k_pages)
    g = n // kh
    cu = meta.cu_q_lens
    flat = jnp.arange(t)
    # Row of each flat token: the last row whose cu offset is <= the token index.
    row = jnp.clip(jnp.searchsorted(cu[1:], flat, side="right"), 0, cu.shape[0] - 2)
    k = _gather_rows(k_pages, meta.block_tables[row], q.dtype)  # [T, S, K, H]
    v = _gather_rows(v_pages, meta.block_tables[row], q.dtype)
    scores = jnp.einsum(
        "tkgh,tskh->tkgs", q.reshape(t, kh, g, h), k, preferred_element_type=jnp.float32
    ) / np.sqrt(h)
    kv_pos = jnp.arange(k.shape[1])
    pos = meta.positions
    mask = (kv_pos[None, :] <= pos[:, None]) & (kv_pos[None, :] < meta.kv_lens[row][:, None])
    if sliding_window is not None:
        mask &= pos[:, None] - kv_pos[None, :] < sliding_window
    probs = _softmax_attend(scores, mask[:, None, None, :], v.dtype, softcap)
    return jnp.einsum("tkgs,tskh->tkgh", probs, v).reshape(t, n, h)


def _xla_decode(
    q, k_pages, v_pages, meta: AttentionMetadata, d_pad: int, sliding_window, softcap=None
):
    """Decode rows 0..d_pad-1 (one query each, at the end of its sequence) -> [D, N, H]: the
    rows' pages gathered, one batched einsum. Causality is implied by kv_len."""
    n, h = q.shape[1:]
    kh = _kv_heads(k_pages)
    g = n // kh
    s_len = meta.block_tables.shape[1] * _page_size(k_pages)
    kv_pos = jnp.arange(s_len)
    tables = meta.block_tables[:d_pad]
    k = _gather_rows(k_pages, tables, q.dtype)  # [D, S, K, H]
    v = _gather_rows(v_pages, tables, q.dtype)
    qd = q[:d_pad].reshape(d_pad, kh, g, h)
    scores = jnp.einsum("dkgh,dskh->dkgs", qd, k, preferred_element_type=jnp.float32)
    mask = kv_pos[None, :] < meta.kv_lens[:d_pad, None]  # bool[D, S]
    if sliding_window is not None:
        mask &= meta.positions[:d_pad, None] - kv_pos[None, :] < sliding_window
    probs = _softmax_attend(scores / np.sqrt(h), mask[:, None, None, :], v.dtype, softcap)
    # In q's dtype, as the native branch returns (f32 pages under bf16 activations).
    return jnp.einsum("dkgs,dskh->dkgh", probs, v).reshape(d_pad, n, h).astype(q.dtype)


def _native_decode(q, k_pages, v_pages, meta: AttentionMetadata, d_pad: int, sliding_window):
    """The decode rows by the C++ kernel (jax_infer/cpu/attention.cc), reading pages in place."""
    out = cpu_kernels.paged_decode_attention(
        q[:d_pad],
        k_pages,
        v_pages,
        meta.block_tables[:d_pad],
        meta.kv_lens[:d_pad],
        meta.positions[:d_pad],
        window=sliding_window or 0,
    )
    return out.astype(q.dtype)


def use_native_decode(k_pages, num_heads: int) -> bool:
    """Whether backend 'cpu' can send this pool's decode rows to the C++ kernel: float32
    pages of a supported head shape, and the kernel built here."""
    if isinstance(k_pages, QuantizedPages) or k_pages.dtype != jnp.float32:
        return False
    return cpu_kernels.attention_supports(num_heads, k_pages.shape[2], k_pages.shape[3])


def xla_attention(
    q,
    k_pages,
    v_pages,
    meta: AttentionMetadata,
    sliding_window=None,
    softcap=None,
    *,
    native: bool = False,
):
    """q [T, N, H] -> [T, N, H], decode rows and prefill chunks each in one batched einsum
    (native: both by the C++ kernels instead, on the CPU; never with softcap, which the
    kernels lack)."""
    native = native and softcap is None
    t, n, h = q.shape
    p_pad, q_pad = meta.prefill_token_index.shape
    d_pad = meta.block_tables.shape[0] - p_pad
    out = jnp.zeros((t, n, h), q.dtype)
    if d_pad:
        static = dict(d_pad=d_pad, sliding_window=sliding_window)
        if native and use_native_decode(k_pages, n):
            od = jax.lax.platform_dependent(
                q,
                k_pages,
                v_pages,
                meta,
                cpu=functools.partial(_native_decode, **static),
                default=functools.partial(_xla_decode, **static),
            )
        else:
            od = _xla_decode(q, k_pages, v_pages, meta, softcap=softcap, **static)
        out = out.at[:d_pad].set(od)  # od covers every decode row, padding ones included
    if p_pad:
        xla = functools.partial(
            _xla_chunks, d_pad=d_pad, sliding_window=sliding_window, softcap=softcap
        )
        if native and use_native_decode(k_pages, n):
            # The kernel takes the flat prefill region as it lies: its output is the rows
            # after the decode rows, with no scatter (and no zeroed [T, N, H] to scatter into).
            def scatter(op):
                return (
                    jnp.zeros((t - d_pad, n, h), q.dtype)
                    .at[meta.prefill_token_index - d_pad]
                    .set(op, mode="drop")
                )

            def xla_flat(q, k_pages, v_pages, meta):
                return scatter(xla(q, k_pages, v_pages, meta))

            native_fn = functools.partial(
                _native_prefill, d_pad=d_pad, sliding_window=sliding_window
            )
            flat = jax.lax.platform_dependent(
                q, k_pages, v_pages, meta, cpu=native_fn, default=xla_flat
            )
            return jnp.concatenate([od, flat]) if d_pad else flat
        op = xla(q, k_pages, v_pages, meta)
        out = out.at[meta.prefill_token_index].set(op, mode="drop")
    return out


def _xla_chunks(
    q, k_pages, v_pages, meta: AttentionMetadata, d_pad: int, sliding_window, softcap=None
):
    """The prefill rows' queries -> [P, Q, N, H]: each row's pages gathered, causal masks,
    batched einsums."""
    t, n, h = q.shape
    kh = _kv_heads(k_pages)
    g = n // kh
    p_pad, q_pad = meta.prefill_token_index.shape
    scale = 1.0 / np.sqrt(h)
    s_len = meta.block_tables.shape[1] * _page_size(k_pages)
    kv_pos = jnp.arange(s_len)
    index = meta.prefill_token_index  # i32[P, Q], t for padding
    tables = meta.block_tables[d_pad:]
    k = _gather_rows(k_pages, tables, q.dtype)  # [P, S, K, H]
    v = _gather_rows(v_pages, tables, q.dtype)
    qp = jnp.take(q, index, axis=0, mode="fill", fill_value=0)  # [P, Q, N, H]
    qpos = jnp.take(meta.positions, index, mode="fill", fill_value=-1)  # i32[P, Q]
    scores = jnp.einsum(
        "pqkgh,pskh->pkgqs",
        qp.reshape(p_pad, q_pad, kh, g, h),
        k,
        preferred_element_type=jnp.float32,
    )
    mask = kv_pos[None, None, :] <= qpos[:, :, None]  # bool[P, Q, S]
    mask &= kv_pos[None, None, :] < meta.kv_lens[d_pad:, None, None]
    if sliding_window is not None:
        mask &= qpos[:, :, None] - kv_pos[None, None, :] < sliding_window
    probs = _softmax_attend(scores * scale, mask[:, None, None], v.dtype, softcap)
    out = jnp.einsum("pkgqs,pskh->pqkgh", probs, v).reshape(p_pad, q_pad, n, h)
    return out.astype(q.dtype)  # as the native branch (f32 pages under bf16 activations)


def _native_prefill(q, k_pages, v_pages, meta: AttentionMetadata, d_pad: int, sliding_window):
    """The flat prefill region q[d_pad:] by the C++ causal kernel, reading pages in place and
    the chunks where they lie (row r's at cu_q_lens[d_pad + r]..) -> [T - d_pad, N, H], zero
    past the last chunk (each query's output equals a decode row's at its position: same
    loop, same order). No gather of q into padded [P, Q] rows, no scatter back."""
    starts = meta.cu_q_lens[d_pad:] - d_pad  # i32[P + 1]
    # Positions past the last chunk are padding (0 in the metadata): the kernel zeroes them.
    out = cpu_kernels.paged_prefill_attention(
        q[d_pad:],
        k_pages,
        v_pages,
        meta.block_tables[d_pad:],
        meta.positions[d_pad:],
        window=sliding_window or 0,
        starts=starts,
    )
    return out.astype(q.dtype)


def cpu_attention(q, k_pages, v_pages, meta: AttentionMetadata, sliding_window=None):
    """The xla backend with decode and prefill rows by the C++ kernels (float pools,
    supported shapes; otherwise exactly the xla backend)."""
    return xla_attention(q, k_pages, v_pages, meta, sliding_window, native=True)


def pallas_attention(q, k_pages, v_pages, meta: AttentionMetadata, sliding_window=None):
    # Imported here, not at the top: a downward arrow kept lazy because Pallas costs ~0.2 s
    # to import and the CPU backends never use it.
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention

    if isinstance(k_pages, QuantizedPages):
        raise ValueError(
            "attention backend='pallas' reads float pages; kv_cache_dtype='int8' needs "
            "attention_backend='xla' or 'reference'"
        )

    # On a CPU the kernel runs in the Pallas interpreter: slow, but the same kernel code, so
    # the engine can be checked end to end without an accelerator.
    return ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        meta.kv_lens,
        meta.block_tables,
        meta.cu_q_lens,
        meta.num_seqs,
        sliding_window=sliding_window,
        backend="gpu" if jax.default_backend() == "cpu" else None,
        interpret=jax.default_backend() == "cpu",
    )


ATTENTION = {
    "reference": reference_attention,
    "xla": xla_attention,
    "cpu": cpu_attention,
    "pallas": pallas_attention,
}


def default_backend(sharded: bool = False) -> str:
    """Pallas where a compiler for it exists; on the CPU the C++ attention kernels where they
    are built ("cpu"), else the jnp path ("xla"). Sharded (a mesh): "xla", which XLA partitions
    (a custom call would gather the whole pool onto every device)."""
    if jax.default_backend() != "cpu":
        return "pallas"
    return "cpu" if not sharded and cpu_kernels.available() else "xla"


def paged_attend_fn(meta, backend: str, groups: tuple = (None,)):
    """attend_fn for the model over a paged cache: (k_pages, v_pages) per layer; `window` is
    the layer's sliding window (`ModelConfig.layer_windows`), None for full attention;
    `softcap` the layer's attention logit soft-capping (Gemma 2), None for none.

    With page groups (`model.cache.page_group_windows`: sliding-window layers in pools of
    their own), `meta` is one AttentionMetadata per group, identical but for block tables
    and slot mapping, and each layer reads and writes through its window's group."""
    if backend not in ATTENTION:
        raise ValueError(f"attention backend={backend!r} is not one of {BACKENDS}")
    attention = ATTENTION[backend]
    metas = (meta,) if isinstance(meta, AttentionMetadata) else tuple(meta)
    if len(metas) != len(groups):
        raise ValueError(f"{len(metas)} attention metadata for page groups {groups}")

    def attend_fn(q, k, v, layer_cache, window=None, softcap=None):
        m = metas[groups.index(window)] if len(groups) > 1 else metas[0]
        # The model runs the flat tokens as a batch of one: [1, T, heads, H].
        k_pages = write_pages(layer_cache[0], k[0], m.slot_mapping)
        v_pages = write_pages(layer_cache[1], v[0], m.slot_mapping)
        if softcap is None:
            out = attention(q[0], k_pages, v_pages, m, window)
        else:
            # Soft-capped scores (Gemma 2) exist in the jnp backends only: the C++ and Pallas
            # kernels' layers take the xla path.
            capped = reference_attention if backend == "reference" else xla_attention
            out = capped(q[0], k_pages, v_pages, m, window, softcap)
        return out.reshape(1, q.shape[1], -1), (k_pages, v_pages)

    return attend_fn
