"""Device-side KV caches: created empty, on one device or directly in their sharding.

Two layouts, one per engine:

    contiguous (static engine, `model.step.forward`): per layer (k, v), each [B, S, K, H]
    paged (continuous engine, `model.step.paged_forward`): per layer (k_pages, v_pages),
        each [P, L, K, H]; page 0 is the reserved null page. dtype int8 makes each pool a
        `quant.kv.QuantizedPages` (int8 values and per-token, per-head scales).

Page groups: with `page_group_windows`, layers of different attention windows keep separate
pools (P per group: the sliding-window layers' pools are smaller, since a request holds only
the pages its window reaches) and separate block tables; `init_paged_cache` takes one page
count per group and `layer_page_groups` says which group each layer's pool belongs to.

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


def page_group_windows(config: ModelConfig, free_window_pages: bool = True) -> tuple:
    """The page groups of a model's paged cache: one per distinct layer window, full attention
    (None) first, then windows ascending. A model without windows, or free_window_pages=False
    (every page kept, the layers' masks still apply their windows), has one group (None,)."""
    windows = set(config.layer_windows)
    if not free_window_pages or windows == {None}:
        return (None,)
    return tuple(sorted(windows, key=lambda w: -1 if w is None else w))


def layer_page_groups(config: ModelConfig, groups: tuple) -> tuple[int, ...]:
    """The page group of each layer, for `groups` from `page_group_windows`."""
    if len(groups) == 1:
        return (0,) * config.num_layers
    return tuple(groups.index(w) for w in config.layer_windows)


def init_paged_cache(
    config: ModelConfig, num_pages, page_size: int, dtype=jnp.float32, groups: tuple = (None,)
):
    """Per layer (k_pages, v_pages), each [P, L, K, H]. Page 0 is the reserved null page.

    num_pages: an int, or one per page group (`groups`, from `page_group_windows`): a layer's
    P is its group's. dtype int8 gives the int8 KV cache: each pool a `QuantizedPages`
    (quant/kv.py)."""
    counts = (num_pages,) * len(groups) if isinstance(num_pages, int) else tuple(num_pages)
    if len(counts) != len(groups):
        raise ValueError(f"num_pages={num_pages!r} needs one entry per page group {groups}")
    pools = []
    for g in layer_page_groups(config, groups):
        shape = (counts[g], page_size, config.num_kv_heads, config.head_dim)
        if jnp.dtype(dtype) == jnp.int8:
            pools.append((init_quantized_pages(shape), init_quantized_pages(shape)))
        else:
            pools.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    return pools


def kv_bytes_per_page_group(
    config: ModelConfig, groups: tuple, page_size: int, dtype=jnp.float32
) -> list[int]:
    """Bytes one page takes in each page group (K and V of the group's layers)."""
    per_layer = 2 * config.num_kv_heads * kv_bytes_per_head(dtype, config.head_dim) * page_size
    layers = layer_page_groups(config, groups)
    return [per_layer * layers.count(g) for g in range(len(groups))]


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
    groups: tuple = (None,),
):
    """`init_paged_cache` (float or int8 pools), created directly in its sharding: split by
    kv heads over `model` (replicated where K does not divide it); over `data` as `rules`
    map "pages" (the default replicates; the data-parallel engine splits pages)."""

    def zeros():
        return init_paged_cache(config, num_pages, page_size, dtype, groups)

    shapes = jax.eval_shape(zeros)
    shardings = cache_shardings(shapes, config, mesh, rules, PAGED_CACHE_AXES)
    return jax.jit(zeros, out_shardings=shardings)()


__all__ = [
    "KVCache",
    "init_cache",
    "init_paged_cache",
    "init_sharded_cache",
    "init_sharded_paged_cache",
    "kv_bytes_per_page_group",
    "kv_bytes_per_token",
    "layer_page_groups",
    "page_group_windows",
]
