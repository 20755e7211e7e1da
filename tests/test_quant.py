"""Weight quantization: formats, error bounds, the quantized products against the float
product on the dequantized weights, checkpoints, and the memory of a quantized SmolLM2.

The kernels' products quantize activations to two int8 rows (x ~= s * (hi + lo / 254)), so
they match the f32 product on the dequantized weights to ~3e-5 of max|x| * sum|w| per output;
the XLA formulation matches to f32 rounding.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_infer import LLM, SamplingParams
from jax_infer.model.cache import init_cache
from jax_infer.model.layers import embed_lookup, linear, linear_transposed
from jax_infer.model.step import forward
from jax_infer.quant import (
    Int4Array,
    Int8Array,
    QuantizedView,
    dequantize,
    pack_int4,
    parse_scheme,
    quantize,
    quantize_matrix,
    quantized_matmul,
    unpack_int4,
    weight_bytes,
)
from jax_infer.weights import WeightsError, load_hf, load_orbax, save_orbax
from tests.tiny_models import make_hf_model


def random_matrix(seed: int, k: int, n: int, outliers: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.01, 2.0, size=(1, n))
    if outliers:
        w[rng.integers(0, k, 3), rng.integers(0, n, 3)] *= 50
    if n > 1:
        w[:, 0] = 0.0  # an all-zero column must quantize to zeros, not NaN
    return w.astype(np.float32)


matrices = st.tuples(
    st.integers(0, 2**31 - 1),
    st.sampled_from([8, 16, 32, 64, 96]),  # K
    st.integers(1, 70),  # N
    st.booleans(),
)


# -- quantize -> dequantize error bounds -----------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(matrices, st.sampled_from([None, 8, 16]))
def test_int8_error_is_half_a_step(m, group):
    seed, k, n, outliers = m
    if group is not None and k % group:
        group = 8
    w = random_matrix(seed, k, n, outliers)
    q = quantize_matrix(jnp.asarray(w), 8, group)
    assert isinstance(q, Int8Array) and q.values.dtype == jnp.int8
    g = k if group is None else group
    step = np.abs(w.reshape(k // g, g, n)).max(axis=1) / 127  # [G, N]
    err = np.abs(np.asarray(dequantize(q)) - w).reshape(k // g, g, n)
    # Half a quantization step, plus f32 rounding of w / scale * scale.
    assert np.all(err <= step[:, None] * (0.5 + 1e-4) + 1e-30)
    assert np.all(np.isfinite(np.asarray(dequantize(q))))


@settings(max_examples=40, deadline=None)
@given(matrices, st.sampled_from([8, 16, 32]))
def test_int4_error_is_bounded_by_the_coded_step(m, group):
    seed, k, n, outliers = m
    if k % group:
        group = 8
    w = random_matrix(seed, k, n, outliers)
    q = quantize_matrix(jnp.asarray(w), 4, group)
    assert isinstance(q, Int4Array) and q.packed.dtype == jnp.uint8
    g = group
    wg = w.reshape(k // g, g, n)  # [G, g, N]
    d = np.asarray(q.block_scale, np.float32) * np.asarray(q.scale_step)  # coded step [G, N]
    err = np.abs(np.asarray(dequantize(q)) - w).reshape(k // g, g, n)
    # Half a coded step; plus, where coding the step or the minimum moved the 16 levels, the
    # part of [min, max] they no longer cover: up to 15 halves of a scale_step code and half
    # a min_step code.
    bound = 0.5 * d + 7.5 * np.asarray(q.scale_step) + 0.5 * np.asarray(q.min_step)
    scale = np.abs(wg).max(axis=1)  # [G, N]
    assert np.all(err <= bound[:, None] + 1e-5 * scale[:, None] + 1e-30)


def test_quantized_shapes_and_bytes():
    w = random_matrix(0, 64, 128, False)
    q8, q4 = quantize_matrix(jnp.asarray(w), 8, None), quantize_matrix(jnp.asarray(w), 4, 32)
    assert q8.values.shape == (2, 64, 64) and q8.scales.shape == (1, 128)  # [N/64, K, 64]
    assert q4.packed.shape == (2, 8, 256) and q4.block_scale.shape == (2, 128)
    assert q8.nbytes == 64 * 128 + 128 * 4
    # 4 bits per weight + an 8-bit scale code and an 8-bit minimum code per 32 weights.
    assert q4.nbytes == 64 * 128 // 2 + 2 * (2 * 128) + 2 * 128 * 4


def test_quantize_rejects_bad_groups():
    w = jnp.ones((48, 64))
    with pytest.raises(ValueError, match="group=32 does not divide the input dim K=48"):
        quantize_matrix(w, 8, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_matrix(w, 4, 12)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_matrix(w, 3, 16)


# -- int4 packing ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).map(lambda i: 8 * i),
    st.sampled_from([1, 3, 64, 100, 128]),
    st.integers(0, 2**31 - 1),
)
def test_int4_packing_round_trips(k, n, seed):
    u = np.random.default_rng(seed).integers(0, 16, size=(k, n)).astype(np.uint8)
    u[0, :] = 0  # both boundaries present
    u[-1, :] = 15
    packed = pack_int4(u)
    assert packed.dtype == np.uint8 and packed.size * 2 == u.size
    np.testing.assert_array_equal(unpack_int4(packed), u)
    np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(jnp.asarray(u)))), u)


def test_int4_nibble_placement():
    """Byte 4c + b of step i holds rows 8i + b (low nibble) and 8i + 4 + b (high nibble)."""
    k, n = 16, 3  # one tile of 3 columns (3 is not a multiple of 64)
    u = (np.arange(k * n).reshape(k, n) % 16).astype(np.uint8)
    p = pack_int4(u)
    assert p.shape == (1, 2, 12)
    for i in range(2):
        for c in range(n):
            for b in range(4):
                byte = int(p[0, i, 4 * c + b])
                assert byte & 15 == u[8 * i + b, c] and byte >> 4 == u[8 * i + 4 + b, c]


# -- products ------------------------------------------------------------------------------


CASES = [(8, None), (8, 64), (4, 32), (4, 64)]  # (bits, group)


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("k,n", [(576, 192), (128, 100)])  # 100: no kernel (N % 64 != 0)
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_quantized_matmul_equals_float_matmul_on_dequantized(bits, group, k, n, rows):
    if group is not None and k % group:
        pytest.skip("group does not divide K")
    rng = np.random.default_rng(k + n + rows)
    w = jnp.asarray(random_matrix(k + n, k, n, True))
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    q = quantize_matrix(w, bits, group)
    ref = np.asarray(x) @ np.asarray(dequantize(q))
    ours = np.asarray(jax.jit(quantized_matmul)(x, q))
    # Error bound of the kernels' activation quantization: 3e-5 * max|x| * sum_k |w[k, n]|.
    budget = 4e-5 * np.abs(np.asarray(x)).max(1, keepdims=True) * np.abs(ref).sum(0) + 1e-4
    budget = np.maximum(budget, 4e-5 * np.abs(x).max() * np.abs(dequantize(q)).sum(0))
    np.testing.assert_array_less(np.abs(ours - ref), budget)
    xla = np.asarray(jax.jit(lambda x, q: quantized_matmul(x, q, force_xla=True))(x, q))
    np.testing.assert_allclose(xla, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_seams_accept_quantized_params():
    rng = np.random.default_rng(0)
    w = jnp.asarray(random_matrix(1, 64, 96, False))
    table = jnp.asarray(rng.standard_normal((97, 64)).astype(np.float32))  # [V, D]
    x = jnp.asarray(rng.standard_normal((2, 5, 64)).astype(np.float32))
    tokens = jnp.asarray([[0, 5, 96], [3, 3, 1]], jnp.int32)
    for bits, group in CASES[:3]:
        qw = quantize_matrix(w, bits, group)
        qt = quantize_matrix(table, bits, group, transposed=True)
        assert qt.shape == (97, 64) and qt.stored_shape == (64, 97)
        deq_w, deq_t = np.asarray(dequantize(qw)), np.asarray(dequantize(qt))
        for view in (qw, QuantizedView(qw)):  # flax hands the seams the unboxed view
            np.testing.assert_allclose(linear(x, view), np.asarray(x) @ deq_w, atol=2e-3)
        np.testing.assert_allclose(
            linear_transposed(x, QuantizedView(qt)), np.asarray(x) @ deq_t.T, atol=2e-3
        )
        rows = embed_lookup(QuantizedView(qt), tokens, jnp.float32)
        np.testing.assert_allclose(rows, deq_t[np.asarray(tokens)], rtol=1e-6, atol=1e-7)


# -- schemes and the params transform -----------------------------------------------------


def test_scheme_names():
    assert parse_scheme("int8") == parse_scheme("int8").__class__(8, None, False)
    assert parse_scheme("int4").group == 32 and parse_scheme("int4").bits == 4
    s = parse_scheme("int4-g64+embed")  # int4 embeddings default to groups of 16
    assert (s.bits, s.group, s.embedding, s.embed_group) == (4, 64, True, 16)
    assert s.name == "int4-g64+embed-g16" and parse_scheme(s.name) == s
    assert parse_scheme("int8-g64+embed").embed_group == 64
    assert parse_scheme("int4+embed-g8").embed_group == 8
    for bad in ("int3", "int8-g0", "int4-g12", "int4+embed-g12", "fp8", "int8+emb", 8):
        with pytest.raises(ValueError, match="quantization="):
            parse_scheme(bad)


def test_quantize_transform_selects_matrices(tmp_path):
    make_hf_model("llama_tied_mha", tmp_path)
    _, params = load_hf(str(tmp_path), progress=False)
    plain = quantize(params, "int8")
    assert isinstance(plain["layers_0"]["wq"], Int8Array)
    assert not isinstance(plain["embed"], Int8Array)  # no +embed
    np.testing.assert_array_equal(plain["layers_0"]["attn_norm"], params["layers_0"]["attn_norm"])
    both = quantize(params, "int4-g16+embed")
    assert isinstance(both["embed"], Int4Array) and both["embed"].transposed
    with pytest.raises(ValueError, match="already quantized"):
        quantize(both, "int8")


# -- checkpoints and the LLM ---------------------------------------------------------------


def logits_of(params, config, tokens: list[int]) -> np.ndarray:
    t = len(tokens)
    logits, _ = forward(
        params,
        jnp.asarray([tokens], jnp.int32),
        jnp.zeros((1,), jnp.int32),
        jnp.full((1,), t, jnp.int32),
        init_cache(config, 1, 32),
        config=config,
        dtype=jnp.float32,
        attn_len=32,
        all_logits=True,
    )
    return np.asarray(logits)


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("scheme", ["int8+embed", "int4-g16+embed", "int8-g16"])
def test_checkpoint_restores_identical_logits(scheme, tmp_path):
    """Quantize once, save, restore without the float weights: the same arrays and logits as
    quantizing on load (tiny Llama, tied embedding; V=97 and F=112 have no kernel tiles)."""
    make_hf_model("llama_tied_mha", tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"), progress=False)
    quantized = quantize(params, scheme)
    save_orbax(str(tmp_path / "ckpt"), quantized, config)
    config2, restored, meta = load_orbax(str(tmp_path / "ckpt"), progress=False)
    assert config2 == config and meta["dtype"] == "float32"
    assert_same_params(quantized, restored)
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    np.testing.assert_array_equal(
        logits_of(restored, config, tokens), logits_of(quantized, config, tokens)
    )


def test_checkpoint_with_a_bad_description_is_clear(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"), progress=False)
    save_orbax(str(tmp_path / "ckpt"), quantize(params, "int8"), config)

    meta_file = tmp_path / "ckpt" / "jax_infer.json"
    meta = json.loads(meta_file.read_text())
    meta["quantized"]["layers_0/nope"] = meta["quantized"]["layers_0/wq"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="layers_0/nope"):
        load_orbax(str(tmp_path / "ckpt"), progress=False)


def test_float_checkpoints_carry_no_description(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"), progress=False)
    save_orbax(str(tmp_path / "ckpt"), params, config)

    meta = json.loads((tmp_path / "ckpt" / "jax_infer.json").read_text())
    assert "quantized" not in meta and meta["dtype"] == "float32"


@pytest.fixture(scope="module")
def quantized_smollm2(gguf_path):
    return {
        s: LLM(model=gguf_path, quantization=s, engine="static", max_num_seqs=2, progress=False)
        for s in ("int8", "int8+embed", "int4+embed")
    }


@pytest.mark.real_model
@pytest.mark.parametrize("scheme", ["int8", "int8+embed", "int4+embed"])
def test_quantized_smollm2_generates_sensibly(quantized_smollm2, scheme):
    out = quantized_smollm2[scheme].generate(
        ["The capital of France is", "1, 2, 3, 4,"],
        SamplingParams(max_tokens=8, temperature=0.0),
    )
    assert "Paris" in out[0].text
    assert out[1].text.strip().startswith("5")


@pytest.mark.real_model
def test_quantized_smollm2_memory(quantized_smollm2):
    """Whole-model bytes as stored (packed int4 counts half a byte), against the f32 model
    (4 bytes per parameter; the tied embedding counted once). With the embedding, which is
    also the LM head, quantized: int8 <= 0.27x, int4 <= 0.15x."""
    config = quantized_smollm2["int8+embed"].config
    f32 = 4 * config.num_params()
    assert weight_bytes(quantized_smollm2["int8+embed"].params) <= 0.27 * f32
    assert weight_bytes(quantized_smollm2["int4+embed"].params) <= 0.15 * f32


@pytest.mark.real_model
def test_quantized_smollm2_checkpoint_round_trip(quantized_smollm2, tmp_path):
    """LLM.save of a quantized model, then LLM(model=dir): the same params and logits."""
    on_load = quantized_smollm2["int4+embed"]
    on_load.save(str(tmp_path / "ckpt"))
    restored = LLM(model=str(tmp_path / "ckpt"), engine="static", progress=False)
    assert_same_params(on_load.params, restored.params)
    tokens = on_load.tokenizer.encode("The capital of France is Paris, and the capital of")
    np.testing.assert_array_equal(
        logits_of(restored.params, restored.config, tokens),
        logits_of(on_load.params, on_load.config, tokens),
    )
