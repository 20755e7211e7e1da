"""Model definitions: pure functions of (params, tokens, positions, cache)."""

from jax_infer.model.cache import init_cache, init_paged_cache
from jax_infer.model.llama import Llama, init_params

__all__ = ["Llama", "init_cache", "init_paged_cache", "init_params"]
