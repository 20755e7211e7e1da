"""Logits of tiny random Llama / Mistral / Qwen2 / Gemma 2 / Gemma 3 models against HF
transformers (torch, CPU, f32).

Each model is built by transformers, saved with `save_pretrained` (safetensors) and loaded by
our HF loader, so the loader's name map and transposes are checked along with the math.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_infer.model.cache import init_cache
from jax_infer.model.step import forward
from jax_infer.weights import load_hf
from tests.tiny_models import CASES, make_hf_model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
    model = make_hf_model(name, tmp_path)
    config, params = load_hf(str(tmp_path), progress=False)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, size=(2, 24)).tolist()
    ref = hf_logits(model, tokens)
    cache = init_cache(config, 2, 32)
    ours, _ = forward(
        params,
        jnp.asarray(tokens, jnp.int32),
        jnp.zeros(2, jnp.int32),
        jnp.full(2, 24, jnp.int32),
        cache,
        config=config,
        dtype=jnp.float32,
        attn_len=32,
        all_logits=True,
    )
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= 1e-4, f"{name}: max abs logit error {err}"


@pytest.mark.parametrize(
    "name",
    ["llama", "mistral_sliding", "qwen2_bias", "qwen2_hybrid_window", "gemma2_softcap", "gemma3"],
)
def test_incremental_decode_matches_full_forward(name, tmp_path):
    """Prefill a prefix then feed tokens one at a time through the cache: same logits as HF's
    full forward, including rows of different lengths in one batch and the sliding window."""
    model = make_hf_model(name, tmp_path)
    config, params = load_hf(str(tmp_path), progress=False)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, config.vocab_size, size=20).tolist() for _ in range(2)]
    prefix = [5, 11]  # per-row prefill lengths
    cache = init_cache(config, 2, 64)
    tokens = np.zeros((2, 16), np.int32)
    for i, n in enumerate(prefix):
        tokens[i, :n] = seqs[i][:n]
    logits, cache = forward(
        params,
        jnp.asarray(tokens),
        jnp.zeros(2, jnp.int32),
        jnp.asarray(prefix, jnp.int32),
        cache,
        config=config,
        dtype=jnp.float32,
        attn_len=16,
    )
    got = [[np.asarray(logits[i])] for i in range(2)]
    pos = list(prefix)
    for _ in range(8):
        step = np.array([[seqs[i][pos[i]]] for i in range(2)], np.int32)
        logits, cache = forward(
            params,
            jnp.asarray(step),
            jnp.asarray(pos, jnp.int32),
            jnp.ones(2, jnp.int32),
            cache,
            config=config,
            dtype=jnp.float32,
            attn_len=64,
        )
        for i in range(2):
            got[i].append(np.asarray(logits[i]))
            pos[i] += 1
    for i in range(2):
        ref = hf_logits(model, [seqs[i]])[0]
        want = ref[prefix[i] - 1 : prefix[i] + 8]
        err = np.abs(np.stack(got[i]) - want).max()
        assert err <= 1e-4, f"{name} row {i}: max abs error {err}"


def test_sharded_safetensors_and_bf16(tmp_path):
    """A sharded checkpoint (index + several files) stored in bf16 loads to the same params."""
    model = make_hf_model("llama", tmp_path / "one")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, p32 = load_hf(str(tmp_path / "one"), progress=False)
    config, p16 = load_hf(str(tmp_path / "sharded"), dtype="bfloat16", progress=False)
    assert p16["layers_1"]["wq"].dtype == jnp.bfloat16
    for path in ("embed", "final_norm", "lm_head"):
        want = np.asarray(p32[path].astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(np.asarray(p16[path].astype(jnp.float32)), want)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(1, 12))
    outs = []
    for params, dtype in ((p32, jnp.float32), (p16, jnp.bfloat16)):
        logits, _ = forward(
            params,
            jnp.asarray(tokens, jnp.int32),
            jnp.zeros(1, jnp.int32),
            jnp.full(1, 12, jnp.int32),
            init_cache(config, 1, 16, dtype),
            config=config,
            dtype=dtype,
            attn_len=16,
            all_logits=True,
        )
        outs.append(np.asarray(logits))
    # bf16 compute keeps ~3 significant digits; logits of this tiny model are O(0.1-1).
    assert np.abs(outs[0] - outs[1]).max() < 0.05
