"""The matmul and embedding seams of the model.

Every projection goes through `linear`, the embedding lookup through `embed_lookup` and a
tied LM head through `linear_transposed`, so a transform of the params (quantization,
pruning) changes what `w` is without the model code branching on it.
"""

from __future__ import annotations

import jax.numpy as jnp


def linear(x, w):
    """x [..., in] @ w [in, out] in the activation dtype."""
    return jnp.matmul(x, w.astype(x.dtype))


def linear_transposed(x, w):
    """x [..., D] against w [V, D] (a tied embedding used as the LM head) -> [..., V]."""
    return jnp.einsum("...d,vd->...v", x, w.astype(x.dtype))


def embed_lookup(table, tokens, dtype):
    """Rows of table [V, D] for tokens i32[...] -> [..., D] in dtype."""
    return jnp.take(table, tokens, axis=0).astype(dtype)
