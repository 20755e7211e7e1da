"""Device-side KV caches: created empty, on one device or directly in their sharding.

Two layouts, one per engine:

    contiguous (static engine, `model.step.forward`): per layer (k, v), each [B, S, K, H]
    paged (continuous engine, `model.step.paged_forward`): per layer (k_pages, v_pages),
        each [P, L, K, H]; page 0 is the reserved null page. dtype int8 makes each pool a
        `quant.kv.QuantizedPages` (int8 values and per-token, per-head scales).

The sharded variants build the same pytree inside one `jit` whose outputs carry the rules'
shardings (`sharding.cache_shardings`), so no device ever holds a whole cache. They live
here, beside the layouts, so that `sharding` stays pure rules and imports no model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jax_infer.config import ModelConfig
from jax_infer.quant.kv import init_quantized_pages, kv_bytes_per_head
from jax_infer.sharding import PAGED_CACHE_AXES, Rules, cache_shardings

KVCache = list  # [(k, v) per layer], each [B, S, K, H]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """The contiguous cache, zeros: per layer (k, v), each [B, S, K, H]."""
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


def init_paged_cache(config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32):
    """Per layer (k_pages, v_pages), each [P, L, K, H]. Page 0 is the reserved null page.

    dtype int8 gives the int8 KV cache: each pool a `QuantizedPages` (quant/kv.py)."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    if jnp.dtype(dtype) == jnp.int8:
        return [
            (init_quantized_pages(shape), init_quantized_pages(shape))
            for _ in range(config.num_layers)
        ]
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


def kv_bytes_per_token(config: ModelConfig, dtype=jnp.float32) -> int:
    """Cache bytes one token takes over all layers (K and V; int8 includes its scales)."""
    per_head = kv_bytes_per_head(dtype, config.head_dim)
    return 2 * config.num_layers * config.num_kv_heads * per_head


def init_sharded_cache(
    config: ModelConfig,
    batch: int,
    max_len: int,
    mesh: Mesh,
    rules: Rules | None = None,
    dtype=jnp.float32,
) -> KVCache:
    """`init_cache`, created directly in its sharding (no full copy anywhere): the batch
    over `data`, kv heads over `model` (each where it divides)."""

    def zeros():
        return init_cache(config, batch, max_len, dtype)

    shardings = cache_shardings(jax.eval_shape(zeros), config, mesh, rules)
    return jax.jit(zeros, out_shardings=shardings)()


def init_sharded_paged_cache(
    config: ModelConfig,
    num_pages: int,
    page_size: int,
    mesh: Mesh,
    rules: Rules | None = None,
    dtype=jnp.float32,
):
    """`init_paged_cache` (float or int8 pools), created directly in its sharding: split by
    kv heads over `model` (replicated where K does not divide it); over `data` as `rules`
    map "pages" (the default replicates; the data-parallel engine splits pages)."""

    def zeros():
        return init_paged_cache(config, num_pages, page_size, dtype)

    shapes = jax.eval_shape(zeros)
    shardings = cache_shardings(shapes, config, mesh, rules, PAGED_CACHE_AXES)
    return jax.jit(zeros, out_shardings=shardings)()


__all__ = [
    "KVCache",
    "init_cache",
    "init_paged_cache",
    "init_sharded_cache",
    "init_sharded_paged_cache",
    "kv_bytes_per_token",
]
