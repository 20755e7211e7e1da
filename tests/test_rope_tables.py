"""The rotary cos/sin tables (`model.llama.rope_tables`), computed once per forward for every
layer: their values against float64 numpy, the rope they give against HF's rotate-half
formula in numpy, and the compiled forward holding one cos per table set whatever the number
of layers (XLA had fused them into every layer's rope fusion, recomputing them per head and
layer).

Tolerance: the angles are f32 products p * inv_freq (relative 2^-24 each, so an absolute
error up to |angle| * 2^-24, ~2e-4 at position 4000) plus the f32 cos/sin (a few ulp); we
allow 1e-6 + 2^-22 * |angle| on the tables, and 1e-5 relative on the rotated values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer.config import rope_frequencies
from jax_infer.model.cache import init_cache
from jax_infer.model.llama import apply_rope, rope_tables
from jax_infer.model.step import forward
from jax_infer.weights import load_hf
from tests.tiny_models import make_hf_model


def _angles64(positions, inv_freq):
    return np.asarray(positions, np.float64)[..., None] * np.asarray(inv_freq, np.float64)


@pytest.mark.parametrize("positions", [[[0, 1, 2, 3]], [[4000, 17, 255, 9], [1, 2, 3, 4]]])
def test_tables_and_rope_match_float64(positions):
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
    pos = jnp.asarray(positions, jnp.int32)
    cos, sin = jax.jit(rope_tables)(pos, jnp.asarray(inv_freq))
    assert cos.shape == sin.shape == (*pos.shape, 1, 32)
    a64 = np.asarray(np.asarray(positions, np.float32)[..., None] * inv_freq, np.float64)
    tol = 1e-6 + 2.0**-22 * np.abs(_angles64(positions, inv_freq))
    np.testing.assert_array_less(np.abs(np.asarray(cos)[:, :, 0] - np.cos(a64)), tol)
    np.testing.assert_array_less(np.abs(np.asarray(sin)[:, :, 0] - np.sin(a64)), tol)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((*pos.shape, 3, 64)).astype(np.float32)
    c, s = np.cos(a64)[:, :, None, :], np.sin(a64)[:, :, None, :]
    x1, x2 = x[..., :32].astype(np.float64), x[..., 32:].astype(np.float64)
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    with_tables = apply_rope(jnp.asarray(x), pos, jnp.asarray(inv_freq), (cos, sin))
    alone = apply_rope(jnp.asarray(x), pos, jnp.asarray(inv_freq))
    np.testing.assert_allclose(np.asarray(with_tables), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(with_tables), np.asarray(alone))


def test_empty_positions():
    cos, sin = rope_tables(jnp.zeros((1, 0), jnp.int32), jnp.ones((4,), jnp.float32))
    assert cos.shape == sin.shape == (1, 0, 1, 4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forward_computes_the_tables_once_not_per_layer(family, tmp_path):
    """The compiled forward of a 2-layer and a 4-layer model hold the same number of cos
    ops (one per table set: Gemma 3's local layers have their own): none is per layer."""
    counts = []
    for layers in (2, 4):
        overrides = dict(num_hidden_layers=layers)
        if family == "gemma3":
            overrides["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2)
        make_hf_model(family, tmp_path / f"hf{layers}", **overrides)
        config, params = load_hf(str(tmp_path / f"hf{layers}"), progress=False)
        assert config.num_layers == layers
        tokens = jnp.asarray([[3, 14, 15, 92, 65, 35]], jnp.int32)

        def run(params, tokens, config=config):
            return forward(
                params,
                tokens,
                jnp.zeros((1,), jnp.int32),
                jnp.full((1,), 6, jnp.int32),
                init_cache(config, 1, 8),
                config=config,
                dtype=jnp.float32,
                attn_len=8,
                all_logits=True,
            )[0]

        hlo = jax.jit(run).lower(params, tokens).compile().as_text()
        counts.append(hlo.count(" cosine("))
    sets = 2 if family == "gemma3" else 1
    assert counts[0] == counts[1], counts
    assert 1 <= counts[0] <= 2 * sets, counts  # a conditional's two branches each hold one
    assert len(rope_frequencies(config)) == config.head_dim // 2
