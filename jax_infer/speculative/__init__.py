"""Speculative decoding: proposers (n-gram prompt lookup, draft model, quantized self-draft),
the lossless acceptance rule, and the engine-side glue (see decoder.py for one step)."""

from jax_infer.speculative.config import SPECULATIVE_METHODS
from jax_infer.speculative.decoder import SpecStats, SpeculativeDecoder, make_speculative_decoder
from jax_infer.speculative.proposers import (
    Draft,
    DraftModelProposer,
    DraftRow,
    NgramProposer,
    Proposer,
    lookup,
)
from jax_infer.speculative.rejection import (
    rejection_sample,
    supports_speculation,
    target_probs,
    verify,
)

__all__ = [
    "SPECULATIVE_METHODS",
    "Draft",
    "DraftModelProposer",
    "DraftRow",
    "NgramProposer",
    "Proposer",
    "SpecStats",
    "SpeculativeDecoder",
    "lookup",
    "make_speculative_decoder",
    "rejection_sample",
    "supports_speculation",
    "target_probs",
    "verify",
]
