"""The public flash-attention entry point: validation, backend choice, the jitted call."""

from __future__ import annotations

import functools

import jax

from pallas_kernels.common import Backend, resolve_backend
from pallas_kernels.flash_attention.kernel import (
    BlockSizes,
    flash_attention_gpu,
    flash_attention_tpu,
)
from pallas_kernels.flash_attention.reference import as_per_batch, attention_reference
from pallas_kernels.flash_attention.validate import validate_inputs, validate_length_values


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
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
def _flash_attention(
    q,
    k,
    v,
    q_offset,
    kv_lens,
    *,
    causal,
    scale,
    sliding_window,
    logits_soft_cap,
    block_sizes,
    backend,
    num_warps,
    num_stages,
    interpret,
):
    semantics = dict(
        causal=causal,
        scale=scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    if backend == "reference":
        return attention_reference(q, k, v, q_offset=q_offset, kv_lens=kv_lens, **semantics)
    semantics["scale"] = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "tpu":
        return flash_attention_tpu(
            q, k, v, q_offset, kv_lens, block_sizes=block_sizes, interpret=interpret, **semantics
        )
    return flash_attention_gpu(
        q,
        k,
        v,
        q_offset,
        kv_lens,
        block_sizes=block_sizes,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        **semantics,
    )


def flash_attention(
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
    block_sizes: BlockSizes | None = None,
    backend: Backend | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:  # [B, T, N, H], dtype of q
    """Flash attention for prefill, with grouped-query heads and an optional cache prefix.

    Query ``t`` of batch row ``b`` sits at absolute position ``q_offset[b] + t`` and
    sees keys ``s < kv_lens[b]`` with ``s <= q_offset[b] + t`` when causal, and
    ``s > q_offset[b] + t - sliding_window`` with a window. So a prefill chunk that
    continues a cached prefix passes the prefix length as ``q_offset`` and K/V holding
    prefix plus chunk. Query head ``n`` reads kv head ``n // (N // K)``. A query that
    sees no key gets zeros. ``scale`` defaults to ``1 / sqrt(H)``; ``logits_soft_cap``
    applies ``cap * tanh(s / cap)`` to the scaled scores.

    Args:
      block_sizes: tile sizes (see ``BlockSizes``); None takes the defaults.
      backend: "tpu", "gpu" or "reference"; None picks the device's kernel, or on a
        CPU the reference (the TPU kernel when ``interpret``).
      num_warps, num_stages: Triton launch knobs (GPU only); num_warps None picks 4
        for H <= 64, else 8.
      interpret: run the kernel in interpret mode (on a CPU): the Mosaic interpreter
        for the TPU kernel, the generic Pallas interpreter for the GPU kernel.
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
    if block_sizes is None:
        block_sizes = BlockSizes()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes={block_sizes!r}; allowed: a BlockSizes")
    validate_length_values(q_offset, kv_lens, S=k.shape[1])
    B, S = q.shape[0], k.shape[1]
    return _flash_attention(
        q,
        k,
        v,
        as_per_batch(q_offset, B, 0),
        as_per_batch(kv_lens, B, S),
        causal=causal,
        scale=None if scale is None else float(scale),
        sliding_window=sliding_window,
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        block_sizes=block_sizes,
        backend=resolve_backend(backend, interpret),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
