"""The one matmul seam of the model.

Every projection goes through `linear`, so a transform of the params (quantization, pruning)
changes what `w` is without the model code branching on it.
"""

from __future__ import annotations

import jax.numpy as jnp


def linear(x, w):
    """x [..., in] @ w [in, out] in the activation dtype."""
    return jnp.matmul(x, w.astype(x.dtype))
