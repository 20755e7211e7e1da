"""Pruning: pure transforms `(params, config) -> (params, config, info)` calibrated on text,
and healing by distillation.

    from jax_infer.prune import calibration_tokens, prune_layers, prune_width, heal
    tokens = calibration_tokens(tokenizer.encode(text), seq_len=256, num_seqs=8)
    p, c, info = prune_layers(params, config, tokens, 0.25)        # depth: fewer layers
    p, c, info = prune_width(params, config, tokens, mlp_fraction=0.25)   # smaller matrices
    p, c, info = prune_sparse(params, config, tokens, criterion="wanda", pattern="2:4")
    p, history = heal(p, c, params, config, tokens, HealConfig(steps=100))

Layer and width pruning give a physically smaller model whose config says so; it saves with
`weights.save_orbax` and loads with `LLM(model=dir)`. Sparse pruning zeros weights (same
shapes and speed on this CPU).
"""

from jax_infer.prune.calibration import (
    LayerwiseRunner,
    calibration_tokens,
    full_causal_attention,
    layer_forward,
    layer_names,
)
from jax_infer.prune.heal import HealConfig, distillation_loss, heal, model_logits
from jax_infer.prune.layers import (
    LayerDistances,
    layer_distances,
    prune_layers,
    remove_layers,
    select_layers,
)
from jax_infer.prune.sparse import nm_mask, parse_pattern, prune_sparse, unstructured_mask
from jax_infer.prune.width import choose_heads, kept_count, prune_width, slice_heads, slice_mlp

__all__ = [
    "HealConfig",
    "LayerDistances",
    "LayerwiseRunner",
    "calibration_tokens",
    "choose_heads",
    "distillation_loss",
    "full_causal_attention",
    "heal",
    "kept_count",
    "layer_distances",
    "layer_forward",
    "layer_names",
    "model_logits",
    "nm_mask",
    "parse_pattern",
    "prune_layers",
    "prune_sparse",
    "prune_width",
    "remove_layers",
    "select_layers",
    "slice_heads",
    "slice_mlp",
    "unstructured_mask",
]
