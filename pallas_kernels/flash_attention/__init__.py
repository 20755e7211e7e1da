"""Causal flash attention for prefill (TPU and GPU Pallas kernels) beside its references.

Layout: q [B, T, N, H], k/v [B, S, K, H], output [B, T, N, H] (see ``kernel`` for the
layouts the kernels use internally, and why).
"""

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.blockwise import blockwise_attention
from pallas_kernels.flash_attention.kernel import (
    BlockSizes,
    flash_attention_gpu,
    flash_attention_tpu,
)
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.flash_attention.validate import validate_inputs, validate_length_values

__all__ = [
    "BlockSizes",
    "attention_reference",
    "blockwise_attention",
    "flash_attention",
    "flash_attention_gpu",
    "flash_attention_tpu",
    "validate_inputs",
    "validate_length_values",
]
