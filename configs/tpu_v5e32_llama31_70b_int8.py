"""TPU v5e-32 pod slice (8 hosts x 4 chips of 16 GiB): Llama-3.1-70B with int8 weights.

    python scripts/serve.py --config=configs/tpu_v5e32_llama31_70b_int8.py --distributed \
        --config.model.name=/path/to/Llama-3.1-70B-Instruct       # on every host
    python scripts/serve.py --config=configs/tpu_v5e32_llama31_70b_int8.py --dry_run

70B in bf16 is 131 GiB: over 8 chips that is 16.4 GiB a chip, more than a v5e has, so the
weights are int8 (67.7 GiB, 8.5 GiB a chip). The mesh is data=4 x model=8: each group of 8
chips holds one tensor-parallel copy (the KV heads, 8, split one a chip). In the continuous
engine `data` replicates each step (sharding.py: "What `data` splits"); throughput over data
comes from one engine per data slice, which this plan sizes.
"""

from jax_infer.run_config import default_config


def get_config():
    config = default_config()
    config.model.name = "/models/Llama-3.1-70B-Instruct"
    config.model.config = "llama-3.1-70b"
    config.model.dtype = "bfloat16"  # activations and the unquantized leaves
    config.model.quantization = "int8"  # per output channel; embedding and head stay bf16
    config.model.max_model_len = 8192
    config.mesh.data = 4
    config.mesh.model = 8
    config.engine.kv_cache_gb = 32.0  # split by KV heads over model: 4 GiB per chip
    config.engine.max_num_seqs = 32
    config.engine.max_num_batched_tokens = 2048
    config.device.kind = "tpu-v5e"
    return config
