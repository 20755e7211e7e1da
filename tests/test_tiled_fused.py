"""Several column-tiled f32/bf16 projections of one input in one kernel call
(`tiled_matmul_many`, the variadic kernels of jax_infer/cpu/matmul_f32.cc and matmul_bf16.cc,
which `linear_many` takes for a layer's q/k/v and gate/up): each output against a float64
numpy product, the fused call bit-identical to one `tiled_matmul` per matrix at every row
count (the kernels compute each output as one multiply-add chain over k, whatever the tasks),
and a model whose projections go through it bit-identical to the same model with one call
per matrix.

Tolerance against float64: f32 products over K terms are within K * 2^-24 * sum_k |x w| of
the exact sum; we allow 1e-5 * sum_k |x[m, k] w[k, n]| (K <= 576). bf16 outputs are rounded
to bf16 (relative 2^-8), so they get 2^-8 * |exact| + 1e-5 * sum |x w|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer.cpu import matmul as cpu_matmul
from jax_infer.cpu.layout import TiledF32View, tile_f32
from jax_infer.model import layers
from jax_infer.model.layers import linear, linear_many

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _need(wdtype):
    bits = 32 if wdtype == "float32" else 16
    if not cpu_matmul.available(bits):
        pytest.skip(f"no {wdtype} tiled kernel on this CPU ({cpu_matmul.features()})")


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("xdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 13, 70])
@pytest.mark.parametrize("ns", [(576, 192, 192), (64, 128), (192, 64, 320, 64)])
def test_fused_outputs_match_float64_and_single_calls(wdtype, xdtype, rows, ns):
    _need(wdtype)
    k = 96 if len(ns) == 4 else 576
    rng = np.random.default_rng(rows * 11 + len(ns))
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32)).astype(DTYPES[xdtype])
    ws = [jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) / 8) for n in ns]
    ts = [tile_f32(w.astype(DTYPES[wdtype])) for w in ws]
    fused = jax.jit(lambda x, ts: linear_many(x, [TiledF32View(t) for t in ts]))(x, ts)
    assert len(fused) == len(ts)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    for y, t in zip(fused, ts):
        w64 = np.asarray(t.values.astype(jnp.float32), np.float64).transpose(1, 0, 2)
        w64 = w64.reshape(k, -1)
        ref = x64 @ w64
        mag = np.abs(x64) @ np.abs(w64)
        assert y.shape == ref.shape and y.dtype == x.dtype
        tol = 1e-5 * mag + (2.0**-8 * np.abs(ref) if xdtype == "bfloat16" else 0) + 1e-6
        np.testing.assert_array_less(np.abs(np.asarray(y.astype(jnp.float32)) - ref), tol)
        # Fused or alone, a matrix's tiles are computed the same way: bit-identical.
        alone = jax.jit(lambda x, t: linear(x, TiledF32View(t)))(x, t)
        np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), alone.astype(jnp.float32))


def test_fused_call_is_one_kernel_call():
    """q/k/v of one input compile to ONE custom call (what saves the per-call cost)."""
    _need("float32")
    rng = np.random.default_rng(0)
    ts = [
        tile_f32(jnp.asarray(rng.standard_normal((64, n)).astype(np.float32)))
        for n in (128, 64, 64)
    ]
    hlo = (
        jax.jit(lambda x, ts: linear_many(x, [TiledF32View(t) for t in ts]))
        .lower(jnp.ones((1, 64)), ts)
        .compile()
        .as_text()
    )
    assert hlo.count("jax_infer_f32_tiles_matmul") == 1, hlo


def test_fused_falls_back_for_mixed_or_mismatched_matrices():
    """Matrices the kernels cannot take together (f32 beside bf16, untiled) each go their own
    way with `linear`'s results; a K that does not match x is the same clear error."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32))
    w = [jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32)) for _ in range(3)]
    mixed = [TiledF32View(tile_f32(w[0])), TiledF32View(tile_f32(w[1].astype(jnp.bfloat16))), w[2]]
    for pair in ([mixed[0], mixed[1]], [mixed[0], mixed[2]], mixed):
        for y, m in zip(linear_many(x, pair), pair):
            assert y.shape == (2, 3, 64)
            np.testing.assert_array_equal(y, linear(x, m))
    other = TiledF32View(tile_f32(jnp.ones((128, 64), jnp.float32)))
    with pytest.raises(ValueError, match="expects K=128"):
        linear_many(x, (mixed[0], other))


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
def test_model_logits_equal_one_call_per_matrix(wdtype, tmp_path, monkeypatch):
    """A tiny Llama with tiled projections (D=128, q 128, k/v 64, F=192): the model's logits
    with fused q/k/v and gate/up calls equal, bitwise, those with one call per matrix."""
    _need(wdtype)
    from jax_infer.cpu.layout import tile_f32_params
    from jax_infer.weights import load_hf
    from tests.test_quant import logits_of
    from tests.tiny_models import make_hf_model

    make_hf_model(
        "llama",
        tmp_path / "hf",
        hidden_size=128,
        intermediate_size=192,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config, params = load_hf(str(tmp_path / "hf"), progress=False)
    params = jax.tree.map(lambda a: a.astype(DTYPES[wdtype]), params)
    tiled = tile_f32_params(params)
    assert any(
        isinstance(a, type(tile_f32(jnp.ones((64, 64)))))
        for a in jax.tree.leaves(tiled, is_leaf=lambda a: hasattr(a, "stored_shape"))
    )
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    fused = logits_of(tiled, config, tokens)
    monkeypatch.setattr(
        layers, "tiled_matmul_many", lambda x, ts: tuple(cpu_matmul.tiled_matmul(x, t) for t in ts)
    )
    jax.clear_caches()
    single = logits_of(tiled, config, tokens)
    np.testing.assert_array_equal(fused, single)
