"""jax_infer/plan.py: the dry run's arithmetic against arrays actually created.

Weights: `plan_weights` against the bytes of `init_params` (+ `quantize`) leaf by leaf, and,
on 8 simulated CPU devices, against the bytes each device holds once `shard_params` places
them (`addressable_shards`). KV cache: against `model.cache.kv_bytes_per_token`, the pools
`init_paged_cache` / `init_sharded_paged_cache` create, and the page count LLMEngine picks.
The device checks run in a subprocess (`python -m tests.test_plan worker DIR`), for the
reason tests/test_sharding.py gives.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jax_infer import plan, sharding
from jax_infer.config import LLAMA31_8B, LLAMA31_70B, TINY_LLAMA_TEST, ModelConfig
from jax_infer.model.cache import init_paged_cache, kv_bytes_per_token
from jax_infer.model.llama import init_params
from jax_infer.quant import quantize

ROOT = Path(__file__).resolve().parent.parent
NUM_DEVICES = 8

# Tiny configs whose dims exercise every rule: N=8 and K=4 heads split at model <= 4 (not 8),
# F=192 (3 tiles of 64) splits 2 ways but not 4 in int8 (tiles) and does as floats, wk's 64
# columns are one tile, a vocabulary of 256 splits 8 ways, a tied one is stored transposed.
TINY = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=192,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=8,
    max_position_embeddings=128,
)
CONFIGS = {
    "tiny": TINY,
    "tied_bias": TINY.replace(tie_word_embeddings=True, attention_bias=True, num_kv_heads=2),
    "preset": TINY_LLAMA_TEST,
}
SCHEMES = [None, "int8", "int8-g32", "int8+embed", "int4", "int4+embed"]
MESHES = [(1, 2), (1, 4), (1, 8), (2, 4), (4, 2)]
WORKER_CONFIGS = ["tiny", "tied_bias"]
WORKER_SCHEMES = [None, "int8", "int8-g32", "int4+embed"]


def leaf_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_param_shapes_are_init_params_shapes():
    for name, config in CONFIGS.items():
        shapes = jax.eval_shape(lambda c=config: init_params(c))
        flat = {
            sharding.path_str(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
        }
        assert flat == plan.param_shapes(config), name


@functools.cache
def random_params(name: str, dtype: str):
    return init_params(CONFIGS[name], dtype=jnp.dtype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_are_array_bytes(dtype):
    # bf16 changes the float leaves only: two schemes cover it.
    schemes = SCHEMES if dtype == "float32" else [None, "int8+embed"]
    for name, config in CONFIGS.items():
        for scheme in schemes:
            params = random_params(name, dtype)
            if scheme is not None:
                params = quantize(params, scheme)
            got = plan.plan_weights(config, dtype, scheme)
            assert got.total_bytes == leaf_bytes(params), (name, dtype, scheme)
            assert got.per_device_bytes == got.total_bytes  # one device holds everything
            if scheme is None:
                assert got.total_bytes == config.num_params() * jnp.dtype(dtype).itemsize


def test_kv_bytes_per_token_is_the_cache_module():
    for config in (*CONFIGS.values(), LLAMA31_70B):
        for name in ("float32", "bfloat16", "int8"):
            assert plan.kv_bytes_per_token(config, name) == kv_bytes_per_token(
                config, jnp.dtype(name)
            ), name


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "int8"])
def test_kv_pool_bytes_are_the_pool(cache_dtype):
    kv = plan.plan_kv(
        TINY, cache_dtype, page_size=8, kv_cache_gb=1.0, num_pages=11, max_model_len=40
    )
    pool = init_paged_cache(TINY, 11, 8, jnp.dtype(cache_dtype))
    assert kv.total_bytes == leaf_bytes(pool)
    assert kv.tokens == 80
    assert kv.full_requests == 2  # 40 tokens take 5 pages of 8; 10 usable pages


def test_pool_pages_are_the_engines(gguf_path):
    from jax_infer.engine import EngineConfig, LLMEngine
    from jax_infer.tokenizer import Tokenizer

    config = TINY.replace(vocab_size=512)
    tok = Tokenizer.from_gguf(gguf_path)
    for kv_cache_dtype, gb in (("auto", 0.001), ("int8", 0.0013)):
        ec = EngineConfig(kv_cache_gb=gb, page_size=8, kv_cache_dtype=kv_cache_dtype)
        engine = LLMEngine(config, init_params(config), tok, max_model_len=64, engine_config=ec)
        name = plan.kv_cache_dtype_name(kv_cache_dtype, "float32")
        per_token = plan.kv_bytes_per_token(config, name)
        assert plan.pool_pages(per_token, 8, gb) == engine.num_pages
        assert plan.pool_pages(per_token, 8, gb, num_pages=7) == 7


def test_llama31_70b_bf16_over_8_by_hand():
    # Every matrix of 70B splits 8 ways (64 q heads, 8 kv heads, 28672 channels, a 128256
    # vocabulary); the 161 norm vectors of 8192 stay whole on each device.
    norms = (2 * LLAMA31_70B.num_layers + 1) * LLAMA31_70B.hidden_size
    split = LLAMA31_70B.num_params() - norms
    w = plan.plan_weights(LLAMA31_70B, "bfloat16", None, {"data": 1, "model": 8})
    assert w.per_device_bytes == (split // 8 + norms) * 2
    assert w.replicated_bytes == norms * 2
    # data replicates: the same bytes per device at data=4.
    w4 = plan.plan_weights(LLAMA31_70B, "bfloat16", None, {"data": 4, "model": 8})
    assert w4.per_device_bytes == w.per_device_bytes
    # int8 per channel: 1 byte a weight and an f32 scale per output column, for the linears.
    q = plan.plan_weights(LLAMA31_8B, "bfloat16", "int8")
    c = LLAMA31_8B
    d, f, n, k = c.hidden_size, c.intermediate_size, c.num_heads * 128, c.num_kv_heads * 128
    linear = d * (n + 2 * k) + n * d + 3 * d * f
    cols = (n + 2 * k) + d + 2 * f + d
    embeds = 2 * c.vocab_size * d * 2
    assert q.total_bytes == c.num_layers * (linear + 4 * cols + 2 * d * 2) + embeds + d * 2


def test_fit_and_problems():
    dev = plan.DeviceSpec(kind="tpu-v5e")
    ok = plan.make_plan(LLAMA31_8B, dtype="bfloat16", mesh_model=8, kv_cache_gb=64, device=dev)
    assert ok.fits and ok.per_device_bytes <= ok.budget_bytes
    assert ok.kv.per_device_bytes == 8 * 2**30
    too_big = plan.make_plan(LLAMA31_70B, dtype="bfloat16", mesh_model=8, kv_cache_gb=8, device=dev)
    assert not too_big.fits
    assert "exceeds" in too_big.problems[0] and "memory_gib=16" in too_big.problems[0]
    int8_kv = plan.make_plan(LLAMA31_8B, kv_cache_dtype="int8", mesh_model=8, device=dev)
    assert any("Pallas" in p for p in int8_kv.problems)
    tiny_pool = plan.make_plan(TINY, num_pages=3, page_size=8, max_model_len=64)
    assert any("less than one request" in p for p in tiny_pool.problems)
    with pytest.raises(ValueError, match="device.kind='tpu-v9'"):
        plan.DeviceSpec(kind="tpu-v9")
    with pytest.raises(ValueError, match="memory_utilization=1.5"):
        plan.DeviceSpec(memory_utilization=1.5)


def test_llama31_presets_are_metas_configs(tmp_path):
    # Meta's published parameter counts, and the numbers of their config.json.
    assert LLAMA31_8B.num_params() == 8_030_261_248
    assert LLAMA31_70B.num_params() == 70_553_706_496
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "vocab_size": 128256,
    }
    assert ModelConfig.from_hf_config(hf) == LLAMA31_8B


# == on 8 simulated devices ===============================================================


def worker(out_dir: str) -> None:
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    assert jax.device_count() == NUM_DEVICES
    from jax_infer.model.cache import init_sharded_paged_cache

    report = {"weights": [], "kv": []}

    def held(tree, mesh) -> list[int]:
        """Bytes each device of the mesh holds of every array in tree."""
        per = {d: 0 for d in mesh.devices.flat}
        for leaf in jax.tree.leaves(tree):
            for shard in leaf.addressable_shards:
                per[shard.device] += shard.data.nbytes
        return sorted(per.values())

    for name in WORKER_CONFIGS:
        config = CONFIGS[name]
        for scheme in WORKER_SCHEMES:
            params = random_params(name, "float32")
            if scheme is not None:
                params = quantize(params, scheme)
            for data, model in MESHES:
                mesh = sharding.make_mesh(data, model)
                placed = sharding.shard_params(params, config, mesh)
                got = plan.plan_weights(config, "float32", scheme, dict(mesh.shape))
                report["weights"].append(
                    [name, scheme, data, model, held(placed, mesh), got.per_device_bytes]
                )
    for cache_dtype in ("float32", "int8"):
        for data, model in MESHES:
            mesh = sharding.make_mesh(data, model)
            pool = init_sharded_paged_cache(TINY, 9, 8, mesh, dtype=jnp.dtype(cache_dtype))
            kv = plan.plan_kv(TINY, cache_dtype, 8, 1.0, 9, 32, dict(mesh.shape))
            report["kv"].append([cache_dtype, data, model, held(pool, mesh), kv.per_device_bytes])
    Path(out_dir, "worker.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_per_device_bytes_on_8_devices(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_plan", "worker", str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((tmp_path / "worker.json").read_text())
    assert len(report["weights"]) == len(WORKER_CONFIGS) * len(WORKER_SCHEMES) * len(MESHES)
    for name, scheme, data, model, held, planned in report["weights"]:
        # Every device holds the same bytes (splits are even), and the plan says how many.
        assert held == [planned] * (data * model), (name, scheme, data, model, held, planned)
        if scheme is None:  # float weights split on every mesh here (the vocabulary at least)
            assert planned < plan.plan_weights(CONFIGS[name], "float32", None).total_bytes
    for cache_dtype, data, model, held, planned in report["kv"]:
        assert held == [planned] * (data * model), (cache_dtype, data, model, held, planned)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2])
