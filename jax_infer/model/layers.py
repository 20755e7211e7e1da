"""The matmul and embedding seams of the model.

Every projection goes through `linear`, the embedding lookup through `embed_lookup` and a
tied LM head through `linear_transposed`, so a transform of the params (quantization,
pruning) changes what `w` is without the model code branching on it.

A quantized param reaches these functions as a `jax_infer.quant.QuantizedView` (flax unboxes
the stored `QuantizedArray` into one); each seam hands it to `jax_infer.quant`, which picks
the formulation. An f32 projection in the CPU kernel's column tiles (`TiledF32Array`, see
jax_infer/cpu/layout.py) arrives as a `TiledF32View` and goes to `tiled_matmul`; it is only
ever a projection (`tile_f32_params` leaves the embedding alone). Float params take exactly
the code path they always did, except under `batch_invariant=True` (model/invariant.py):
then a tiled product takes the kernel at every row count, an untiled float matrix
`fixed_order_matmul`, and a quantized one is an error (the engine refuses it up front).
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_infer.cpu.layout import as_tiled
from jax_infer.cpu.matmul import tiled_matmul, tiled_matmul_many
from jax_infer.model.invariant import fixed_order_matmul
from jax_infer.quant.arrays import as_quantized
from jax_infer.quant.matmul import quantized_matmul, quantized_matmul_many, quantized_take


def linear(x, w, *, batch_invariant: bool = False):
    """x [..., in] @ w [in, out] in the activation dtype. batch_invariant: each row's result
    independent of the other rows (see the module docstring)."""
    t = as_tiled(w)
    if t is not None:
        return tiled_matmul(x, t, batch_invariant=batch_invariant)
    q = as_quantized(w)
    if q is not None:
        if batch_invariant:
            raise ValueError(
                "batch_invariant=True does not take quantized weights (quantization=None)"
            )
        return quantized_matmul(x, q)
    if batch_invariant:
        return fixed_order_matmul(x, w)
    return jnp.matmul(x, w.astype(x.dtype))


def linear_many(x, ws, *, batch_invariant: bool = False):
    """(x @ w for w in ws): the projections of one input (a layer's q/k/v, its gate/up).
    Quantized matrices of one format go to the kernels in one call, which quantizes x once
    and spreads all their column tiles over the threads at once; column-tiled f32 or bf16
    matrices likewise (`tiled_matmul_many`); anything else is one `linear` per matrix, with
    the same results."""
    if not batch_invariant and len(ws) > 1:
        qs = [as_quantized(w) for w in ws]
        if all(q is not None for q in qs):
            return quantized_matmul_many(x, qs)
        ts = [as_tiled(w) for w in ws]
        if all(t is not None for t in ts):
            # Column-tiled f32/bf16 matrices: one kernel call where each would take one.
            return tiled_matmul_many(x, ts)
    return tuple(linear(x, w, batch_invariant=batch_invariant) for w in ws)


def linear_transposed(x, w, *, batch_invariant: bool = False):
    """x [..., D] against w [V, D] (a tied embedding used as the LM head) -> [..., V]."""
    q = as_quantized(w)
    if q is not None:
        # A quantized embedding is stored as the head [D, V]: the product is a plain linear.
        return linear(x, q, batch_invariant=batch_invariant)
    if batch_invariant:
        return fixed_order_matmul(x, w.T)
    return jnp.einsum("...d,vd->...v", x, w.astype(x.dtype))


def embed_lookup(table, tokens, dtype):
    """Rows of table [V, D] for tokens i32[...] -> [..., D] in dtype."""
    q = as_quantized(table)
    if q is not None:
        return quantized_take(q, tokens, dtype)
    return jnp.take(table, tokens, axis=0).astype(dtype)
