"""Attention over the KV cache: one interface, several backends (see paged.py)."""

from jax_infer.attention.metadata import NULL_PAGE, AttentionMetadata, build_metadata, flat_tokens
from jax_infer.attention.paged import (
    BACKENDS,
    default_backend,
    paged_attend_fn,
    reference_attention,
    write_pages,
    xla_attention,
)

__all__ = [
    "BACKENDS",
    "NULL_PAGE",
    "AttentionMetadata",
    "build_metadata",
    "flat_tokens",
    "default_backend",
    "paged_attend_fn",
    "reference_attention",
    "write_pages",
    "xla_attention",
]
