"""Ragged paged attention (TPU and GPU Pallas kernels) beside its jnp reference.

Layout: q [T, N, H] (all sequences' new tokens, flattened), k/v pages [P, L, K, H],
metadata ``kv_lens`` i32[max_seqs], ``block_tables`` i32[max_seqs, pages_per_seq],
``cu_q_lens`` i32[max_seqs + 1], ``num_seqs`` i32[1]; output [T, N, H].
"""

from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.kernel import (
    BlockSizes,
    ragged_paged_attention_gpu,
    ragged_paged_attention_tpu,
    schedule_work,
)
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.validate import validate_inputs, validate_metadata

__all__ = [
    "BlockSizes",
    "ragged_paged_attention",
    "ragged_paged_attention_gpu",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_tpu",
    "schedule_work",
    "validate_inputs",
    "validate_metadata",
]
