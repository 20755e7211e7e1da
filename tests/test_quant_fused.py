"""Several quantized projections of one input in one kernel call (`linear_many`, the
variadic int8/int4 kernels of jax_infer/cpu/matmul_quant.cc): each output against a float64
numpy product on the dequantized weights, the fused call bit-identical to one call per
matrix, and a model whose q/k/v and gate/up go through it against the same model on the
dequantized float weights.

Tolerance: the kernels quantize each activation row to two int8 rows (x ~= s * (hi + lo /
254), error <= max|x| / 64516 per element), so an output is within ~2e-5 * max|x| *
sum_k |v[k, n]| of the exact product, v being the weights the kernel multiplies them by
(see `budget`); we allow 4e-5 (as tests/test_quant.py does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer.cpu import matmul as cpu_matmul
from jax_infer.model.layers import linear, linear_many
from jax_infer.quant import QuantizedView, dequantize, quantize, quantize_matrix
from jax_infer.quant.arrays import as_quantized
from jax_infer.weights import load_hf
from tests.test_quant import logits_of, random_matrix
from tests.tiny_models import make_hf_model

SCHEMES = [(8, None), (8, 32), (4, 32), (4, 16)]  # (bits, group)


def budget(x, q, w):
    """Per-output error allowed: 4e-5 * max|x[m]| * sum_k |v[k, n]| (see the docstring),
    where v is what the kernel multiplies by the quantized activations: w for int8, and for
    int4 the levels times their scale, u * d = w - (the group's minimum), whose sum can be
    twice w's (the minimums are multiplied by exact f32 sums of x)."""
    if q.bits == 4:
        m = np.asarray(q.block_min, np.float64) * np.asarray(q.min_step, np.float64)
        w = w - np.repeat(m, q.group_size, axis=0)
    return 4e-5 * np.abs(x).max(1, keepdims=True) * np.abs(w).sum(0)[None] + 1e-6


@pytest.mark.parametrize("bits,group", SCHEMES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("ns", [(576, 192, 192), (64, 128), (192, 64, 320, 64)])
def test_fused_outputs_match_float64(bits, group, rows, ns):
    if not cpu_matmul.available(bits):
        pytest.skip(f"no int{bits} kernel here")
    k = 96 if len(ns) == 4 else 576  # odd K (3 x 32) for the four-matrix case
    rng = np.random.default_rng(rows * 7 + bits + len(ns))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :5] *= 40  # outliers: the activation scale is set by them
    qs = [quantize_matrix(random_matrix(i + k, k, n, True), bits, group) for i, n in enumerate(ns)]
    # QuantizedView is what flax hands the seams; it is not a pytree, so it is made inside.
    fused = jax.jit(lambda x, qs: linear_many(x, [QuantizedView(q) for q in qs]))(
        jnp.asarray(x), qs
    )
    assert len(fused) == len(qs)
    for y, q in zip(fused, qs):
        w = np.asarray(dequantize(q), np.float64)
        ref = x.astype(np.float64) @ w
        assert y.shape == ref.shape and y.dtype == jnp.float32
        np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), budget(x, q, w))
        # Fused or alone, a matrix's tiles are computed the same way: bit-identical.
        alone = jax.jit(lambda x, q: linear(x, QuantizedView(q)))(jnp.asarray(x), q)
        np.testing.assert_array_equal(y, alone)


def test_fused_falls_back_for_mixed_or_untiled_matrices():
    """Matrices the kernels cannot take together (mixed formats, N % 64 != 0, float) each go
    their own way, with the same results as `linear`."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32))
    ws = [
        QuantizedView(quantize_matrix(random_matrix(1, 64, 64, False), 8, None)),
        QuantizedView(quantize_matrix(random_matrix(2, 64, 64, False), 4, 32)),
        QuantizedView(quantize_matrix(random_matrix(3, 64, 100, False), 8, None)),
        jnp.asarray(random_matrix(4, 64, 48, False)),
    ]
    for pair in ([ws[0], ws[1]], [ws[0], ws[2]], [ws[0], ws[3]], ws):
        for y, w in zip(linear_many(x, pair), pair):
            assert y.shape == (2, 3, w.shape[1])
            np.testing.assert_array_equal(y, linear(x, w))


def test_fused_rejects_mismatched_inputs():
    q = QuantizedView(quantize_matrix(random_matrix(1, 64, 64, False), 8, None))
    r = QuantizedView(quantize_matrix(random_matrix(1, 128, 64, False), 8, None))
    with pytest.raises(ValueError, match="expects K=128"):
        linear_many(jnp.ones((1, 64)), (q, r))


@pytest.mark.parametrize("scheme", ["int8", "int4-g16+embed"])
def test_model_on_fused_kernels_matches_dequantized_float_model(scheme, tmp_path):
    """A tiny Llama whose projections all fit the kernels' tiles (D=128, q 128, k/v 64,
    F=192): logits of the quantized params (fused q/k/v and gate/up calls) against the float
    model on the dequantized weights (plain XLA dots)."""
    make_hf_model(
        "llama",
        tmp_path / "hf",
        hidden_size=128,
        intermediate_size=192,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config, params = load_hf(str(tmp_path / "hf"), progress=False)
    quantized = quantize(params, scheme)
    float_of = jax.tree.map(
        lambda a: dequantize(as_quantized(a)) if as_quantized(a) is not None else a,
        quantized,
        is_leaf=lambda a: as_quantized(a) is not None,
    )
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    ours, ref = logits_of(quantized, config, tokens), logits_of(float_of, config, tokens)
    # 2e-3 of the logit range: the activation quantization's error, summed over 2 layers.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    assert not np.array_equal(ours, ref)  # the kernels ran (XLA would match to rounding)
