"""Batch invariance: a request's logits bitwise the same whatever else runs in its step.

Why results move with the batch at all: a float sum's value depends on the order of its
additions, and the pieces of a step pick their order by shape. XLA splits a row reduction
(`jnp.mean` in RMSNorm) by the number of rows, its dot picks blockings by the rows of the
product, and the jnp attention backends reduce over the step's padded page bucket. So a
prompt's logits differed in the last bits between a 16- and a 128-token prefill chunk, or
alone and beside other requests (tests/test_batch_invariant.py), and greedy outputs could
flip where two logits were within those bits.

`LLM(batch_invariant=True)` (EngineConfig.batch_invariant) runs only pieces whose order per
row is fixed:

* projections: the CPU's tiled f32/bf16 kernels (jax_infer/cpu/matmul_f32.cc,
  matmul_bf16.cc), one multiply-add chain over k = 0..K-1 per output whatever the rows
  (bf16 takes the kernel at every row count, where XLA's AMX dot would take many rows); a
  float matrix the kernels cannot hold (N not a multiple of 64) by `fixed_order_matmul`;
* attention: the CPU kernels (attention.cc), which score every query in chunks of 32 keys
  from key 0 of its own sequence, whatever the query chunk, the page layout or the other
  rows; a prompt token's output equals what a decode step would give it, so chunking and
  the recompute after a preemption give the same bits;
* RMSNorm: the mean of squares by `fixed_order_sum`;
* everything else in the step is elementwise or a gather (exact).

What cannot be made invariant here is refused (`check_batch_invariant`, ValueError naming
the parameter): other attention backends (their reductions span the padded page bucket),
the int8 KV cache and soft-capped layers (both take the jnp attention), quantized weights
(their kernels quantize activations on the fly, an untested order), a mesh (XLA partitions
the reductions), the static engine, and a CPU where the kernels are not built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fixed_order_sum(x, axis: int = -1, *, squares: bool = False):
    """x summed over `axis` (kept, size 1) in one fixed order, by elementwise adds only: the
    axis is cut into C slices of L (L the largest power of two up to 64 dividing its
    length; zero-padded to a multiple of 16 where that is under 8), the slices added in
    order, then the L partial sums halved (p[:h] + p[h:]) down to one. XLA does not
    reassociate elementwise float adds, so an entry's sum is the same bits whatever the
    other dimensions and however XLA fuses the ops around it; `jnp.sum` promises no order
    (measured: a prompt's first-layer RMSNorm differed in the last bit between 32- and
    64-token steps). squares: sum x * x instead, each slice squared where it is added (one
    XLA fusion fewer than squaring first, for RMSNorm)."""
    x = jnp.moveaxis(x, axis, -1)
    d = x.shape[-1]
    lanes = min(d & -d, 64)
    if lanes < 8:
        width = -(-d // 16) * 16
        x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], width - d), x.dtype)], axis=-1)
        d, lanes = width, 16
    y = x.reshape(*x.shape[:-1], d // lanes, lanes)

    def part(c):
        return y[..., c, :] * y[..., c, :] if squares else y[..., c, :]

    acc = part(0)
    for c in range(1, d // lanes):
        acc = acc + part(c)
    while acc.shape[-1] > 1:
        h = acc.shape[-1] // 2
        acc = acc[..., :h] + acc[..., h:]
    return jnp.moveaxis(acc, -1, axis)


def fixed_order_matmul(x, w):
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype (f32 inside), each output the
    `fixed_order_sum` of its K products: the batch-invariant product of a float matrix the
    tiled kernels cannot hold. It materializes [rows, K, N] products, so it is meant for
    the odd small matrix (a [64, 32] projection of a tiny model); a real model's
    projections all take the kernels."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    products = x2[:, :, None] * w.astype(jnp.float32)[None]  # f32[M, K, N]
    # The products are rounded before they are added (no fused multiply-add): pin that with
    # an optimization barrier, so the order of operations cannot depend on fusion.
    products = jax.lax.optimization_barrier(products)
    y = fixed_order_sum(products, axis=1)[:, 0]
    return y.reshape(*lead, w.shape[-1]).astype(x.dtype)


__all__ = ["fixed_order_matmul", "fixed_order_sum"]


def check_batch_invariant(config, params, *, backend: str, cache_dtype, mesh=None) -> None:
    """Raise ValueError, naming the parameter, where this setup cannot run batch-invariant:
    params are the runner's (`runner.backend_params`), backend the attention backend."""
    # Imported here: model/ sits below the CPU kernels' bindings only at call time (they
    # import jax_infer.quant, which imports model.layers).
    from jax_infer.cpu import attention as cpu_attention
    from jax_infer.cpu.layout import TiledF32Array
    from jax_infer.quant.arrays import QuantizedArray

    if jax.default_backend() != "cpu":
        raise ValueError(
            f"batch_invariant=True runs on the CPU kernels; this platform is "
            f"{jax.default_backend()!r} (use batch_invariant=False)"
        )
    if mesh is not None:
        raise ValueError(
            "batch_invariant=True needs one device (mesh=None): XLA partitions a mesh's "
            "reductions in an order of its own"
        )
    if backend != "cpu":
        raise ValueError(
            f"batch_invariant=True needs attention_backend='cpu' (the C++ kernels, fixed "
            f"32-key chunks from key 0); got attention_backend={backend!r}, whose reductions "
            "span the step's padded page bucket"
        )
    if jnp.dtype(cache_dtype) != jnp.float32:
        raise ValueError(
            "batch_invariant=True needs a float32 KV cache (the attention kernels read f32 "
            f"pages); got kv_cache_dtype={jnp.dtype(cache_dtype).name!r}: use "
            "kv_cache_dtype='float32' (or 'auto' with dtype='float32')"
        )
    if not cpu_attention.attention_supports(config.num_heads, config.num_kv_heads, config.head_dim):
        raise ValueError(
            "batch_invariant=True needs the CPU attention kernels for this model's heads "
            f"(num_heads={config.num_heads}, num_kv_heads={config.num_kv_heads}, "
            f"head_dim={config.head_dim}): not built here, or a shape they do not take"
        )
    if config.attn_logit_softcapping is not None:
        raise ValueError(
            "batch_invariant=True: this model soft-caps attention scores "
            f"(attn_logit_softcapping={config.attn_logit_softcapping}), which only the jnp "
            "attention does"
        )

    def is_boxed(x):
        return isinstance(x, (TiledF32Array, QuantizedArray))

    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_boxed)[0]:
        if isinstance(leaf, QuantizedArray):
            raise ValueError(
                f"batch_invariant=True does not take quantized weights ({jax.tree_util.keystr(path)} "
                f"is {type(leaf).__name__}): use quantization=None"
            )
        if isinstance(leaf, TiledF32Array):
            from jax_infer.cpu import matmul

            bits = 16 if leaf.values.dtype == jnp.bfloat16 else 32
            if not matmul.available(bits):
                raise ValueError(
                    f"batch_invariant=True needs the CPU's {bits}-bit tiled matmul kernel, "
                    f"not built here (features={matmul.features()})"
                )
