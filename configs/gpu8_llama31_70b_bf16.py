"""8 GPUs of 80 GiB (H100): Llama-3.1-70B in bfloat16, tensor parallel over all 8.

    python scripts/serve.py --config=configs/gpu8_llama31_70b_bf16.py \
        --config.model.name=/path/to/Llama-3.1-70B-Instruct
    python scripts/serve.py --config=configs/gpu8_llama31_70b_bf16.py --dry_run

Plan (--dry_run): 16.4 GiB of weights and 40 GiB of KV cache per GPU, 63 requests of 16384
tokens at once.
"""

from jax_infer.run_config import default_config


def get_config():
    config = default_config()
    config.model.name = "/models/Llama-3.1-70B-Instruct"
    config.model.config = "llama-3.1-70b"
    config.model.dtype = "bfloat16"
    config.model.max_model_len = 16384
    config.mesh.model = 8  # 64 query / 8 KV heads: one KV head a GPU
    config.engine.kv_cache_gb = 320.0  # the whole pool: 40 GiB per GPU
    config.engine.max_num_seqs = 128
    config.engine.max_num_batched_tokens = 4096
    config.device.kind = "h100"
    return config
