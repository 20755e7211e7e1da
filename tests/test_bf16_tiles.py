"""bf16 matrices in column tiles and the CPU kernel that multiplies them at few rows
(jax_infer/cpu/matmul_bf16.cc, `bf16_tiles_matmul`): against numpy with f32 accumulation,
through the `linear` seam on both sides of BF16_KERNEL_MAX_ROWS, through the params transform,
and (slow) SmolLM2's perplexity in bf16 against f32 on a licence text."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_infer.cpu import matmul as kernels
from jax_infer.cpu.layout import TiledF32Array, tile_f32, tile_f32_params, untile
from jax_infer.model.layers import linear

needs_kernel = pytest.mark.skipif(
    not kernels.available(16), reason="the bf16 kernel needs AVX2+FMA and a C++ compiler"
)


def _bf16(rng, *shape):
    return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


def _bound(x, w):
    """|error| of an f32 dot of length K over exact products: a few ulps of sum |x_k w_k|."""
    return 4 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w)) * np.sqrt(x.shape[1]) + 1e-30


@needs_kernel
@pytest.mark.parametrize(
    "rows,k,n",
    [
        (1, 576, 192),  # batch-1 decode of a k/v projection: 3 tiles
        (5, 576, 64),  # fewer rows than an AVX-512 register block
        (7, 64, 1536),  # one block + 1 row
        (13, 576, 576),  # row slices across threads
        (64, 1536, 576),  # the largest row count `linear` sends here
        (67, 40, 192),  # K not a multiple of anything
    ],
)
def test_kernel_matches_numpy(rows, k, n):
    rng = np.random.default_rng(rows * 7 + k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = _bf16(rng, k, n)
    got = np.asarray(jax.jit(kernels.bf16_tiles_matmul)(x, tile_f32(jnp.asarray(w)).values))
    # Reference: the bf16 weights exactly as f32, products and sums in float64.
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_array_less(np.abs(got - want), _bound(x, w.astype(np.float32)))


@needs_kernel
def test_each_row_is_independent_of_the_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((40, 576)).astype(np.float32))
    t = tile_f32(jnp.asarray(_bf16(rng, 576, 1536))).values
    mm = jax.jit(kernels.bf16_tiles_matmul)
    full = np.asarray(mm(x, t))
    for lo, hi in [(0, 1), (7, 8), (3, 16), (20, 33), (39, 40)]:
        np.testing.assert_array_equal(np.asarray(mm(x[lo:hi], t)), full[lo:hi])


@pytest.mark.parametrize("max_rows", [0, 64, 10**9])
@pytest.mark.parametrize("rows", [1, 3, 100])
def test_linear_on_bf16_tiles_matches_the_plain_product(rows, max_rows, monkeypatch):
    """bf16 activations against tiled bf16 weights through `linear`: the kernel up to
    `bf16_kernel_max_rows()` rows (where built), XLA's dot above; either equals numpy's
    product rounded to bf16 (one bf16 rounding: relative 2^-8, plus the sum's f32 error)."""
    monkeypatch.setattr(kernels, "BF16_KERNEL_MAX_ROWS", max_rows)
    rng = np.random.default_rng(rows)
    x = _bf16(rng, rows, 576)
    w = _bf16(rng, 576, 192)
    t = tile_f32(jnp.asarray(w))
    assert isinstance(t, TiledF32Array) and t.values.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(untile(t)), w)
    got = np.asarray(linear(jnp.asarray(x), t))  # traced here: the row limit is read now
    assert got.dtype == jnp.bfloat16
    want = x.astype(np.float64) @ w.astype(np.float64)
    bound = 2.0**-8 * np.abs(want) + _bound(x.astype(np.float32), w.astype(np.float32))
    np.testing.assert_array_less(np.abs(got.astype(np.float64) - want), bound + 1e-6)


@needs_kernel
def test_params_transform_tiles_bf16_projections():
    rng = np.random.default_rng(2)
    params = {
        "embed": jnp.asarray(_bf16(rng, 100, 64)),
        "layers_0": {
            "wq": jnp.asarray(_bf16(rng, 64, 128)),
            "w_odd": jnp.asarray(_bf16(rng, 64, 100)),
        },
    }
    tiled = tile_f32_params(params)
    assert isinstance(tiled["layers_0"]["wq"], TiledF32Array)
    assert tiled["layers_0"]["wq"].values.dtype == jnp.bfloat16
    assert not isinstance(tiled["embed"], TiledF32Array)
    assert not isinstance(tiled["layers_0"]["w_odd"], TiledF32Array)


# SmolLM2 in bf16 against f32 on English text (the GPL-3), every bf16 path for the 512-row
# windows. A 1024-token slice in 512-token windows keeps this short on the 2-core CPU.
TEXT = "/usr/share/common-licenses/GPL-3"
SLICE_TOKENS, WINDOW, STRIDE = 1024, 512, 256
BF16_BOUND = 1.005  # the bound: within 0.5% of f32
# (name, BF16_KERNEL_MAX_ROWS, BF16_DOT): XLA's bf16 dot, the VDPBF16PS kernel (the widening
# one where AVX512-BF16 is absent) and the widening kernel.
PATHS = (
    ("bfloat16 xla", 0, True),
    ("bfloat16 dot", 10**9, True),
    ("bfloat16 widening", 10**9, False),
)


@needs_kernel
@pytest.mark.slow
@pytest.mark.real_model
def test_bf16_smollm2_perplexity_stays_close(gguf_path, monkeypatch):
    from jax_infer import LLM
    from jax_infer.eval import perplexity

    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    results = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model=gguf_path, dtype=dtype, engine="static", progress=False)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)[:SLICE_TOKENS]
        assert len(ids) == SLICE_TOKENS
        run = dict(window=WINDOW, stride=STRIDE, dtype=llm.dtype)
        if dtype == "float32":
            results[dtype] = perplexity(llm.params, llm.config, ids, **run).perplexity
            continue
        assert llm.params["layers_0"]["w_up"].values.dtype == jnp.bfloat16
        for name, max_rows, dot in PATHS:
            monkeypatch.setattr(kernels, "BF16_KERNEL_MAX_ROWS", max_rows)
            monkeypatch.setattr(kernels, "BF16_DOT", dot)
            jax.clear_caches()  # retrace: the row limit is read when the step is traced
            results[name] = perplexity(llm.params, llm.config, ids, **run).perplexity
    f32 = results["float32"]
    assert 5 < f32 < 50, results
    for name, _, _ in PATHS:
        assert abs(results[name] / f32 - 1) <= BF16_BOUND - 1, results


def test_auto_kv_pages_are_f32_for_bf16_under_the_cpu_backend():
    from jax_infer.quant.kv import resolve_kv_cache_dtype

    assert resolve_kv_cache_dtype("auto", jnp.bfloat16, "cpu") == jnp.float32
    assert resolve_kv_cache_dtype("auto", jnp.bfloat16, "xla") == jnp.bfloat16
    assert resolve_kv_cache_dtype("auto", jnp.float32, "cpu") == jnp.float32
    assert resolve_kv_cache_dtype("bfloat16", jnp.bfloat16, "cpu") == jnp.bfloat16  # asked for


@needs_kernel
@pytest.mark.slow
@pytest.mark.real_model
def test_bf16_smollm2_engine_decodes_like_f32(gguf_path):
    """The continuous engine in bf16 on the CPU (bf16 kernel at decode, f32 KV pages, the C++
    attention): each greedy token is, under the f32 model, within a bf16 margin of that
    position's best logit (bf16 may pick another near-tie, never a clearly worse token)."""
    from jax_infer import LLM, SamplingParams

    prompt = "The GNU General Public License is a free, copyleft license for"
    bf16 = LLM(model=gguf_path, dtype="bfloat16", progress=False, max_model_len=256)
    assert bf16.engine.cache_dtype == jnp.float32
    out = bf16.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
    del bf16
    f32 = LLM(model=gguf_path, progress=False, max_model_len=256)
    ids = f32.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    for i, token in enumerate(out.token_ids):
        top = f32.generate([ids], params)[0].logprobs[0]  # {token id: logprob}, top 5
        assert token in top and top[token] >= max(top.values()) - 0.5, (i, token, top)
        ids = ids + [token]
