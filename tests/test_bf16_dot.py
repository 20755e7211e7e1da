"""The VDPBF16PS kernel (bf16 activations x bf16 column tiles, `bf16_dot_matmul` in
jax_infer/cpu/matmul_bf16.cc) against numpy over odd shapes and row counts 1..600, through the
`linear` seam, and the AVX2-only build (JAX_INFER_CPU_MARCH=haswell), which must keep the
widening kernel and lose the AVX-512 ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_infer.cpu import build
from jax_infer.cpu import matmul as kernels
from jax_infer.cpu.layout import tile_f32
from jax_infer.model.layers import linear

needs_dot = pytest.mark.skipif(
    not kernels.bf16_dot_available(), reason="the bf16 dot kernel needs AVX512-BF16"
)


def _bf16(rng, *shape):
    return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


def _bound(x, w):
    """|error| of an f32 dot of length K over exact products: a few ulps of sum |x_k w_k|."""
    return 4 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w)) * np.sqrt(x.shape[1]) + 1e-30


def _check(rows, k, n, seed):
    rng = np.random.default_rng(seed)
    x, w = _bf16(rng, rows, k), _bf16(rng, k, n)
    got = np.asarray(
        jax.jit(kernels.bf16_dot_matmul)(jnp.asarray(x), tile_f32(jnp.asarray(w)).values)
    )
    assert got.dtype == np.float32 and got.shape == (rows, n)
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_array_less(
        np.abs(got - want), _bound(x.astype(np.float32), w.astype(np.float32))
    )


@needs_dot
@pytest.mark.parametrize(
    "rows,k,n",
    [
        (1, 576, 192),  # batch-1 decode of a k/v projection
        (1, 1, 64),  # K = 1: only the odd tail
        (2, 3, 64),  # one pair + the tail
        (5, 577, 64),  # odd K, fewer rows than a register block
        (6, 1536, 576),  # one whole block
        (7, 63, 1536),  # one block + 1 row, odd K
        (13, 576, 128),  # row slices across threads
        (131, 40, 320),
        (512, 576, 1536),  # prefill
        (600, 95, 64),  # one tile: rows split across threads
    ],
)
def test_dot_kernel_matches_numpy(rows, k, n):
    _check(rows, k, n, seed=rows * 7 + k + n)


@needs_dot
def test_dot_kernel_every_row_count():
    """Row counts 1..600 (every remainder of the 6-row block and of the thread slices) on one
    odd-K matrix; each a new shape, so this is a sweep, not every value."""
    for rows in (*range(1, 14), 17, 31, 47, 64, 97, 127, 255, 313, 511, 599, 600):
        _check(rows, 99, 128, seed=rows)


@needs_dot
def test_dot_rows_are_independent_of_the_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(_bf16(rng, 40, 577))
    t = tile_f32(jnp.asarray(_bf16(rng, 577, 192))).values
    mm = jax.jit(kernels.bf16_dot_matmul)
    full = np.asarray(mm(x, t))
    for lo, hi in [(0, 1), (7, 8), (3, 16), (20, 33), (39, 40)]:
        np.testing.assert_array_equal(np.asarray(mm(x[lo:hi], t)), full[lo:hi])


@needs_dot
@pytest.mark.parametrize("rows,k,n", [(1, 576, 192), (7, 63, 128), (131, 577, 64)])
def test_dot_kernel_bf16_output_is_the_f32_output_rounded_once(rows, k, n):
    """out_dtype=bfloat16: the kernel's own f32 sums, rounded to nearest even (numpy's
    ml_dtypes cast), bit for bit; and every row still independent of the batch."""
    rng = np.random.default_rng(rows + k)
    x, w = jnp.asarray(_bf16(rng, rows, k)), tile_f32(jnp.asarray(_bf16(rng, k, n))).values
    f32 = np.asarray(jax.jit(kernels.bf16_dot_matmul)(x, w))
    got = np.asarray(jax.jit(lambda a, b: kernels.bf16_dot_matmul(a, b, jnp.bfloat16))(x, w))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        got.view(np.uint16), f32.astype(ml_dtypes.bfloat16).view(np.uint16)
    )
    one = np.asarray(kernels.bf16_dot_matmul(x[rows - 1 :], w, jnp.bfloat16))
    np.testing.assert_array_equal(one.view(np.uint16), got[rows - 1 :].view(np.uint16))
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.bf16_dot_matmul(x, w, jnp.float16)


@needs_dot
def test_dot_kernel_rejects_f32_activations():
    t = tile_f32(jnp.zeros((8, 64), jnp.bfloat16)).values
    with pytest.raises(ValueError, match="x must be bfloat16"):
        kernels.bf16_dot_matmul(jnp.zeros((1, 8), jnp.float32), t)


@pytest.mark.parametrize("dot", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_linear_bf16_paths_agree_with_numpy(rows, dot, monkeypatch):
    """`linear` on bf16 tiles with bf16 activations, by the dot kernel (where built) or the
    widening one: numpy's product rounded once to bf16."""
    monkeypatch.setattr(kernels, "BF16_DOT", dot)
    rng = np.random.default_rng(rows)
    x, w = _bf16(rng, rows, 577), _bf16(rng, 577, 192)
    got = np.asarray(linear(jnp.asarray(x), tile_f32(jnp.asarray(w))))
    assert got.dtype == jnp.bfloat16
    want = x.astype(np.float64) @ w.astype(np.float64)
    bound = 2.0**-8 * np.abs(want) + _bound(x.astype(np.float32), w.astype(np.float32))
    np.testing.assert_array_less(np.abs(got.astype(np.float64) - want), bound + 1e-6)


AVX2_CHILD = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp, ml_dtypes, numpy as np
    from jax_infer.cpu import build, matmul as kernels
    from jax_infer.cpu.layout import tile_f32
    rng = np.random.default_rng(0)
    errs = []
    for rows, k in ((1, 576), (3, 577), (70, 64)):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        w = rng.standard_normal((k, 128)).astype(ml_dtypes.bfloat16)
        got = np.asarray(kernels.bf16_tiles_matmul(jnp.asarray(x), tile_f32(jnp.asarray(w)).values))
        want = x.astype(np.float64) @ w.astype(np.float64)
        errs.append(float(np.max(np.abs(got - want) / (np.abs(x) @ np.abs(w.astype(np.float32))))))
    print(json.dumps({"features": build.features(), "errs": errs}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not build.cpu_features().can_build, reason="needs AVX2 + FMA")
def test_avx2_only_build_keeps_the_widening_kernel(tmp_path):
    """A library built for Haswell (AVX2 + FMA, what an AVX2-only machine gets): the bf16
    widening kernel is there and correct, the AVX-512 families (f32 tiles, VNNI, bf16 dot)
    are not, so their callers take the fallbacks."""
    env = {
        **os.environ,
        build.MARCH_ENV: "haswell",
        "JAX_INFER_CACHE": str(tmp_path),
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", AVX2_CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    bits = result["features"]
    assert bits & build.BF16_TILES_MATMUL and bits & build.PAGED_ATTENTION
    assert not bits & (build.F32_TILES_MATMUL | build.BF16_DOT_MATMUL | build.INT4_MATMUL)
    assert max(result["errs"]) < 1e-5, result
