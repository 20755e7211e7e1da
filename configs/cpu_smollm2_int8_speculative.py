"""CPU: SmolLM2-135M with int8 weights, decoding faster with an int4 self-draft.

    python scripts/generate.py --config=configs/cpu_smollm2_int8_speculative.py
    python scripts/benchmark.py --config=configs/cpu_smollm2_int8_speculative.py

The draft is the same model quantized to int4 (from the float weights): it proposes
`num_speculative_tokens` tokens, the int8 target verifies them in one step, so greedy output
is the int8 model's own (speculative/). Speculative decoding runs on one device.
"""

from jax_infer.run_config import default_config


def get_config():
    config = default_config()
    config.model.name = "smollm2-135m"
    config.model.max_model_len = 2048
    # int8 per output channel, embedding and tied LM head included: ~0.27x of the f32 bytes.
    config.model.quantization = "int8+embed"
    config.speculative.method = "draft_model"
    config.speculative.quantization = "int4+embed"  # no speculative.model: a self-draft
    config.speculative.num_speculative_tokens = 4  # measured best at k=4..5 (speculative/config.py)
    config.engine.kv_cache_gb = 0.25  # the self-draft shares the target's pool
    config.engine.max_num_seqs = 8
    config.sampling.temperature = 0.0
    config.sampling.max_tokens = 64
    config.device.kind = "cpu"
    config.device.memory_gib = 4.0
    return config
