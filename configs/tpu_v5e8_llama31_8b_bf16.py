"""TPU v5e-8 (one host, 8 chips of 16 GiB): Llama-3.1-8B in bfloat16, tensor parallel.

    python scripts/serve.py --config=configs/tpu_v5e8_llama31_8b_bf16.py \
        --config.model.name=/path/to/Llama-3.1-8B-Instruct
    python scripts/serve.py --config=configs/tpu_v5e8_llama31_8b_bf16.py --dry_run

Plan (--dry_run): 1.9 GiB of weights and 8 GiB of KV cache per chip, 63 requests of 8192
tokens at once.
"""

from jax_infer.run_config import default_config


def get_config():
    config = default_config()
    # An HF checkpoint directory (config.json + safetensors); each host reads only its slices.
    config.model.name = "/models/Llama-3.1-8B-Instruct"
    config.model.config = "llama-3.1-8b"  # the architecture a dry run plans, without weights
    config.model.dtype = "bfloat16"
    config.model.max_model_len = 8192
    # 32 query / 8 KV heads, 14336 MLP channels, 128256 vocab: all split 8 ways, 1 KV head a chip.
    config.mesh.model = 8
    config.engine.kv_cache_gb = 64.0  # the whole pool; split by KV heads: 8 GiB per chip
    config.engine.max_num_seqs = 64
    config.engine.max_num_batched_tokens = 2048
    config.device.kind = "tpu-v5e"
    return config
