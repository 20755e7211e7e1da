"""Model definitions: pure functions of (params, tokens, positions, cache)."""

from jax_infer.model.llama import Llama, init_cache, init_params

__all__ = ["Llama", "init_cache", "init_params"]
