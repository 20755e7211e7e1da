import pytest

from jax_infer.config import SMOLLM2_135M, ModelConfig, RopeScaling, rope_frequencies


def test_from_gguf_matches_preset(gguf_path):
    from jax_infer.weights.gguf_loader import open_gguf, read_metadata

    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    config = ModelConfig.from_gguf(meta, {t.name for t in reader.tensors})
    assert config.replace(rms_norm_eps=1e-5) == SMOLLM2_135M


def test_from_hf_config_llama3_rope_scaling():
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    }
    c = ModelConfig.from_hf_config(hf)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.head_dim == 16 and c.num_kv_heads == 2 and c.family == "llama"


def test_llama3_frequencies_match_transformers():
    import numpy as np
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_frequencies(
        ModelConfig.from_hf_config(hf.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    )
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "field,value",
    [("num_heads", 0), ("num_layers", -1), ("hidden_size", 1.5), ("num_kv_heads", 4)],
)
def test_invalid_config_names_field(field, value):
    kwargs = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=6,
        num_kv_heads=3,
        head_dim=4,
    )
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_unknown_architecture_is_clear():
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="falcon"):
        ModelConfig.from_gguf({"general.architecture": "falcon"})
