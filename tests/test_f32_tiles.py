"""f32 matrices in column tiles (jax_infer/cpu/layout.py, TiledF32Array) and the CPU kernel
that multiplies them (jax_infer/cpu/matmul_f32.cc, `f32_tiles_matmul`): against a float64 numpy product, across the row
counts of its register blocks and task splits, and through the params transform LLM applies
on the CPU (`tile_f32_params`), which must leave the model's logits as they were."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer.cpu import matmul as kernels
from jax_infer.cpu.layout import (
    TiledF32Array,
    TiledF32View,
    tile_f32,
    tile_f32_params,
    untile,
    untile_f32_params,
)
from jax_infer.cpu.matmul import tiled_matmul
from jax_infer.model.layers import linear
from jax_infer.quant import quantize
from jax_infer.quant.transform import is_quantized

needs_kernel = pytest.mark.skipif(
    not kernels.available(32), reason="the f32 kernel needs AVX-512 and a C++ compiler"
)


def _product_bound(x, w):
    """|error| of an f32 dot of length K: a few ulps of sum_k |x_k w_k|."""
    return 4 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w)) * np.sqrt(x.shape[1]) + 1e-30


@needs_kernel
@pytest.mark.parametrize(
    "rows,k,n",
    [
        (1, 576, 192),  # 3 tiles: rows cannot be split, 3 tasks
        (5, 576, 64),  # one tile, fewer rows than a register block
        (6, 64, 128),
        (13, 576, 576),  # 2 row slices of 12 and 1 rows
        (13, 576, 1536),  # 2 blocks + 1 row (speculative verification of 12 drafts)
        (9, 64, 4096),
        (32, 1536, 576),  # blocks of 6, 6, 5, 5, 5, 5
        (10, 576, 1536),  # 5 + 5
        (16, 64, 4096),  # 6 + 5 + 5
        (23, 128, 640),  # 6 + 6 + 6 + 5
        (67, 40, 192),  # K not a multiple of anything; row slices across threads
        (300, 576, 1024),
    ],
)
def test_kernel_matches_numpy(rows, k, n):
    rng = np.random.default_rng(rows * 7 + k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(
        jax.jit(kernels.f32_tiles_matmul)(jnp.asarray(x), tile_f32(jnp.asarray(w)).values)
    )
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_array_less(np.abs(got - want), _product_bound(x, w))


@needs_kernel
def test_each_row_is_independent_of_the_batch():
    """One multiply-add chain per output: a row's result is bit-identical whether it is
    multiplied alone, in a register block, or in a task split across threads."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((40, 576)).astype(np.float32))
    mm = jax.jit(kernels.f32_tiles_matmul)
    for n in (192, 1536):
        t = tile_f32(jnp.asarray(rng.standard_normal((576, n)).astype(np.float32))).values
        full = np.asarray(mm(x, t))
        for lo, hi in [(0, 1), (7, 8), (3, 16), (20, 33), (39, 40), (10, 40), (4, 14), (8, 40)]:
            np.testing.assert_array_equal(np.asarray(mm(x[lo:hi], t)), full[lo:hi])


def test_tiles_round_trip_and_the_seam():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((96, 128)).astype(np.float32))
    t = tile_f32(w)
    assert isinstance(t, TiledF32Array) and t.shape == (96, 128) and t.values.shape == (2, 96, 64)
    np.testing.assert_array_equal(np.asarray(untile(t)), np.asarray(w))
    x = jnp.asarray(rng.standard_normal((3, 4, 96)).astype(np.float32))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    for view in (t, TiledF32View(t)):  # flax hands the seam the unboxed view
        np.testing.assert_allclose(np.asarray(linear(x, view)), want, rtol=1e-5, atol=1e-4)
    # The XLA formulation (other platforms, no kernel) gives the same product.
    xla = jax.jit(lambda x, t: tiled_matmul(x, t, force_xla=True))(x, t)
    np.testing.assert_allclose(np.asarray(xla), want, rtol=1e-5, atol=1e-4)


def test_tile_f32_rejects_what_it_cannot_tile():
    with pytest.raises(ValueError, match="multiple of 64"):
        tile_f32(jnp.zeros((8, 100), jnp.float32))
    with pytest.raises(ValueError, match="f32 or bf16"):
        tile_f32(jnp.zeros((8, 64), jnp.float16))


def _toy_params(rng):
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {
        "embed": f(100, 64),
        "lm_head": f(64, 128),
        "final_norm": f(64),
        "layers_0": {"wq": f(64, 64), "w_odd": f(64, 100), "bias": f(64)},
    }


@needs_kernel
def test_params_transform_tiles_projections_only():
    params = _toy_params(np.random.default_rng(2))
    tiled = tile_f32_params(params)
    assert isinstance(tiled["lm_head"], TiledF32Array)
    assert isinstance(tiled["layers_0"]["wq"], TiledF32Array)
    # The embedding table is gathered from, not multiplied; N=100 has no whole tiles.
    for leaf in (tiled["embed"], tiled["layers_0"]["w_odd"], tiled["final_norm"]):
        assert not isinstance(leaf, TiledF32Array)
    assert not is_quantized(tiled)  # same values, another layout
    back = untile_f32_params(tiled)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # Quantizing tiled params quantizes the matrices they stand for.
    q_tiled, q_plain = quantize(tiled, "int8"), quantize(params, "int8")
    jax.tree.map(np.testing.assert_array_equal, q_tiled, q_plain)


@needs_kernel
@pytest.mark.real_model
def test_smollm2_logits_unchanged_by_tiling(smollm2):
    """LLM tiles SmolLM2's f32 projections on this CPU; the logits of a prefill and of
    decode-sized batches agree with the same model in the [K, N] layout (XLA's dot)."""
    from jax_infer.model.cache import init_cache
    from jax_infer.model.llama import Llama, contiguous_attention

    assert isinstance(smollm2.params["layers_0"]["w_up"], TiledF32Array)
    plain = untile_f32_params(smollm2.params)
    model = Llama(smollm2.config, jnp.float32)
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then")

    @jax.jit
    def logits(params, tokens):
        b, t = tokens.shape
        cache = init_cache(smollm2.config, b, t, jnp.float32)
        start, valid = jnp.zeros((b,), jnp.int32), jnp.full((b,), t, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        attn = contiguous_attention(start, valid, t)
        out, _ = model.apply({"params": params}, tokens, positions, cache, attn)
        return out

    for tokens in (jnp.asarray([ids]), jnp.asarray([ids[:3]] * 5)):
        got = np.asarray(logits(smollm2.params, tokens))
        want = np.asarray(logits(plain, tokens))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * np.abs(want).max())
