"""Tiny random HF models saved with save_pretrained, shared by the loader and model tests
(Llama, Mistral, Qwen2, Gemma 2 and Gemma 3)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

CASES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama_tied_mha": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500.0),
    ),
    "llama3_scaled_gqa8": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=8,
            num_key_value_heads=1,
            hidden_size=128,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral_sliding": (transformers.MistralConfig, dict(sliding_window=8, head_dim=16)),
    "qwen2_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    # Hybrid layers: layer 0 full attention, the others a sliding window of 8 (`layer_types`).
    "qwen2_hybrid_window": (
        transformers.Qwen2Config,
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
    # Gemma 2: (1 + w) norms, post norms, GeGLU, sqrt(D) embeddings, a query scale of its
    # own, attention and final-logit soft-capping (wider init so the caps bite), alternate
    # sliding layers.
    "gemma2_softcap": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            initializer_range=0.15,
            rms_norm_eps=1e-6,
        ),
    ),
    # Gemma 3: QK-norm, a local RoPE base for the sliding layer and a linearly scaled global
    # one, no soft-capping.
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
            },
            initializer_range=0.1,
            rms_norm_eps=1e-6,
        ),
    ),
}
ARCH = {
    transformers.Gemma2Config: transformers.Gemma2ForCausalLM,
    transformers.Gemma3TextConfig: transformers.Gemma3ForCausalLM,
    transformers.LlamaConfig: transformers.LlamaForCausalLM,
    transformers.MistralConfig: transformers.MistralForCausalLM,
    transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
}


def make_hf_model(name, tmp_path, save_kwargs=None, **overrides):
    config_cls, extra = CASES[name]
    config = config_cls(**(COMMON | extra | overrides))
    torch.manual_seed(0)
    model = ARCH[config_cls](config).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so they are checked too.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "bias" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, **(save_kwargs or {}))
    return model
