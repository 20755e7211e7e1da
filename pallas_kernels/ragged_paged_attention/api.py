"""The public ragged-paged-attention entry point: validation, backend, the jitted call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import Backend, resolve_backend
from pallas_kernels.ragged_paged_attention.kernel import (
    BlockSizes,
    ragged_paged_attention_gpu,
    ragged_paged_attention_tpu,
)
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.validate import validate_inputs, validate_metadata


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "sliding_window",
        "logits_soft_cap",
        "block_sizes",
        "backend",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _ragged_paged_attention(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    cu_q_lens,
    num_seqs,
    *,
    scale,
    sliding_window,
    logits_soft_cap,
    block_sizes,
    backend,
    num_warps,
    num_stages,
    interpret,
):
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    semantics = dict(
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    if backend == "reference":
        return ragged_paged_attention_reference(*args, **semantics)
    if backend == "tpu":
        out = ragged_paged_attention_tpu(
            *args, block_sizes=block_sizes, interpret=interpret, **semantics
        )
    else:
        out = ragged_paged_attention_gpu(
            *args,
            block_sizes=block_sizes,
            num_warps=num_warps,
            num_stages=num_stages,
            interpret=interpret,
            **semantics,
        )
    # The kernels write only rows that belong to a sequence.
    real = jnp.arange(q.shape[0]) < cu_q_lens[num_seqs[0]]
    return jnp.where(real[:, None, None], out, jnp.zeros_like(out))


def ragged_paged_attention(
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
    block_sizes: BlockSizes | None = None,
    backend: Backend | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H], dtype of q; zeros for padding tokens
    """Attention for a ragged batch of decode tokens and prefill chunks over a paged cache.

    Sequence ``s < num_seqs[0]`` owns query tokens ``cu_q_lens[s]:cu_q_lens[s + 1]``
    (1 for decode, n for a prefill chunk). Its ``kv_lens[s]`` keys, the new tokens'
    included, live in pages ``block_tables[s, :ceil(kv_lens[s] / L)]``; its query
    ``i`` sits at position ``kv_lens[s] - q_len + i`` and sees the keys at or before
    that position (and, with ``sliding_window``, after ``position - sliding_window``).
    Query head ``n`` reads kv head ``n // (N // K)``. Tokens past
    ``cu_q_lens[num_seqs]`` are padding and get zeros. Block-table entries past a
    sequence's last page are never read.

    Args:
      block_sizes: tile sizes (see ``BlockSizes``); None takes the defaults.
      backend: "tpu", "gpu" or "reference"; None picks the device's kernel, or on a
        CPU the reference (the TPU kernel when ``interpret``).
      num_warps, num_stages: Triton launch knobs (GPU only).
      interpret: run the kernel in interpret mode (on a CPU).
    """
    validate_inputs(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        cu_q_lens,
        num_seqs,
        scale=scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    if block_sizes is None:
        block_sizes = BlockSizes()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes={block_sizes!r}; allowed: a BlockSizes")
    metadata = (kv_lens, block_tables, cu_q_lens, num_seqs)
    if all(isinstance(x, np.ndarray) for x in metadata):
        validate_metadata(
            *metadata,
            num_tokens=q.shape[0],
            num_pages=k_pages.shape[0],
            page_size=k_pages.shape[1],
        )
    return _ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        cu_q_lens,
        num_seqs,
        scale=None if scale is None else float(scale),
        sliding_window=sliding_window,
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        block_sizes=block_sizes,
        backend=resolve_backend(backend, interpret),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
