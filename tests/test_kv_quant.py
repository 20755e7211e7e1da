"""int8 KV cache: the quantizer's error bound, the page pool's write/read round trip, paged
steps against the contiguous model with the same rounding, capacity, errors, and SmolLM2
perplexity and generation with it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer import SamplingParams
from jax_infer.attention import build_metadata
from jax_infer.attention.paged import write_pages, xla_attention
from jax_infer.config import TINY_LLAMA_TEST
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.eval import perplexity
from jax_infer.model.cache import init_cache, init_paged_cache, kv_bytes_per_token
from jax_infer.model.llama import init_params
from jax_infer.model.step import forward, paged_forward
from jax_infer.quant.kv import QuantizedPages, dequantize_kv, fake_quantize_kv, quantize_kv


def test_quantize_kv_error_is_half_a_step_per_element():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3, 64)).astype(np.float32) * rng.uniform(0.01, 30, (7, 3, 1))
    x[0, 0] = 0.0  # an all-zero vector keeps scale 1 and decodes to zeros
    values, scales = quantize_kv(jnp.asarray(x))
    assert values.dtype == jnp.int8 and scales.shape == (7, 3)
    assert int(jnp.max(jnp.abs(values))) == 127
    err = np.abs(np.asarray(dequantize_kv(values, scales)) - x)
    step = np.asarray(scales)[..., None]
    assert np.all(err <= step / 2 + 1e-6 * np.abs(x))
    np.testing.assert_array_equal(np.asarray(dequantize_kv(values, scales))[0, 0], 0.0)
    # Each (token, head) vector uses its own range: the scale is its absmax / 127.
    np.testing.assert_allclose(np.asarray(scales)[1:], np.abs(x).max(-1)[1:] / 127, rtol=1e-6)


def test_pool_stores_exactly_the_quantized_vectors():
    shape = (6, 4, 2, 16)  # P, L, K, H
    pool = QuantizedPages(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:-1], jnp.float32))
    new = jax.random.normal(jax.random.key(1), (5, 2, 16)) * 4
    slots = jnp.array([5, 6, 7, 8, 21])  # page 1 offsets 1-3, page 2 offset 0, page 5 offset 1
    pool = write_pages(pool, new, slots)
    values, scales = quantize_kv(new)
    page, offset = slots // 4, slots % 4
    np.testing.assert_array_equal(pool.values[page, offset], values)
    np.testing.assert_array_equal(pool.scales[page, offset], scales)
    untouched = np.ones((6, 4), bool)
    untouched[np.asarray(page), np.asarray(offset)] = False
    assert not np.any(np.asarray(pool.values)[untouched])


def _tiny():
    config = TINY_LLAMA_TEST
    return config, init_params(config, seed=3)


def test_paged_steps_equal_contiguous_model_with_the_same_rounding():
    """Prefill a prompt into an int8 pool, then decode: every step's logits equal the
    contiguous forward over the whole sequence with keys and values rounded the same way."""
    config, params = _tiny()
    page_size, num_pages = 4, 16
    cache = init_paged_cache(config, num_pages, page_size, jnp.int8)
    assert isinstance(cache[0][0], QuantizedPages)
    tokens = np.random.default_rng(2).integers(1, config.vocab_size, 23).tolist()
    table = list(range(3, 3 + 8))  # non-contiguous with the null page: pages 3..10
    prompt = 13

    def reference(seq):
        ref_cache = init_cache(config, 1, 32)
        logits, _ = forward(
            params,
            jnp.asarray([seq + [0] * (32 - len(seq))]),
            jnp.zeros((1,), jnp.int32),
            jnp.asarray([len(seq)]),
            ref_cache,
            config=config,
            dtype=jnp.float32,
            attn_len=32,
            int8_kv=True,
        )
        return np.asarray(logits[0])

    def step(start, chunk):
        nonlocal cache
        meta, _, offsets = build_metadata([start], [len(chunk)], [table], page_size)
        flat = np.zeros(meta.positions.shape[0], np.int32)
        flat[offsets[0] : offsets[0] + len(chunk)] = chunk
        logits, cache = paged_forward(
            params,
            jnp.asarray(flat),
            jax.tree.map(jnp.asarray, meta),
            cache,
            config=config,
            dtype=jnp.float32,
            backend="xla",
        )
        return np.asarray(logits[0])

    np.testing.assert_allclose(step(0, tokens[:prompt]), reference(tokens[:prompt]), atol=2e-5)
    for n in range(prompt, len(tokens)):
        np.testing.assert_allclose(
            step(n, tokens[n : n + 1]), reference(tokens[: n + 1]), atol=2e-5
        )


def test_backends_agree_on_int8_pool():
    """The xla backend (decode rows + a prefill chunk) equals attention over the pool
    dequantized up front, computed densely with numpy."""
    rng = np.random.default_rng(4)
    page_size, kh, n, h = 4, 2, 4, 16
    k = rng.standard_normal((12, page_size, kh, h)).astype(np.float32)
    v = rng.standard_normal((12, page_size, kh, h)).astype(np.float32)
    kq, vq = (
        QuantizedPages(*quantize_kv(jnp.asarray(k))),
        QuantizedPages(*quantize_kv(jnp.asarray(v))),
    )
    kd, vd = np.asarray(dequantize_kv(*kq)), np.asarray(dequantize_kv(*vq))
    starts, q_lens, tables = [9, 0], [1, 7], [[1, 2, 3], [4, 5]]
    meta, order, offsets = build_metadata(starts, q_lens, tables, page_size)
    q = rng.standard_normal((meta.positions.shape[0], n, h)).astype(np.float32)
    out = np.asarray(xla_attention(jnp.asarray(q), kq, vq, jax.tree.map(jnp.asarray, meta)))
    for i, (start, ql, table) in enumerate(zip(starts, q_lens, tables)):
        keys = kd[table].reshape(-1, kh, h)
        vals = vd[table].reshape(-1, kh, h)
        for j in range(ql):
            t, pos = offsets[i] + j, start + j
            for head in range(n):
                s = keys[: pos + 1, head // (n // kh)] @ q[t, head] / math.sqrt(h)
                p = np.exp(s - s.max())
                want = (p / p.sum()) @ vals[: pos + 1, head // (n // kh)]
                np.testing.assert_allclose(out[t, head], want, atol=1e-5)


def test_int8_pool_fits_more_tokens_in_the_same_budget():
    config = TINY_LLAMA_TEST  # head_dim 16: int8 is 16 + 4 bytes per head, f32 64
    assert kv_bytes_per_token(config, jnp.float32) == 2 * 2 * 2 * 64
    assert kv_bytes_per_token(config, jnp.int8) == 2 * 2 * 2 * 20


def test_bad_kv_cache_dtype_is_named():
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        perplexity({}, TINY_LLAMA_TEST, [1, 2, 3], window=8, stride=4, kv_cache_dtype="int4")


def test_fake_quantize_matches_pool_round_trip():
    x = jax.random.normal(jax.random.key(5), (3, 2, 16))
    pool = init_paged_cache(TINY_LLAMA_TEST, 4, 4, jnp.int8)[0][0]
    pool = write_pages(pool, x, jnp.array([4, 5, 6]))
    np.testing.assert_array_equal(
        np.asarray(dequantize_kv(pool.values[1, :3], pool.scales[1, :3])),
        np.asarray(fake_quantize_kv(x)),
    )


def _engine(llm, **kwargs) -> LLMEngine:
    return LLMEngine(
        llm.config,
        llm.params,
        llm.tokenizer,
        dtype=llm.dtype,
        max_model_len=512,
        engine_config=EngineConfig(**kwargs),
    )


def _greedy(engine, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk.token_ids
    return [final[i] for i in ids]


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_int8_kv_engine(smollm2):
    """SmolLM2 through the engine with an int8 pool: the pool holds 256/68 = 3.8x the pages of
    f32 at the same kv_cache_gb, and greedy continuations follow f32's (int8 rounding may flip
    a near-tie late in a continuation, so the check is on the common prefix)."""
    int8 = _engine(smollm2, kv_cache_dtype="int8", kv_cache_gb=0.05)
    f32 = _engine(smollm2, kv_cache_gb=0.05)
    budget = int(0.05 * 2**30)
    assert (
        kv_bytes_per_token(smollm2.config, jnp.int8) * 256
        == kv_bytes_per_token(smollm2.config, jnp.float32) * 68
    )
    assert f32.num_pages == budget // (kv_bytes_per_token(smollm2.config) * 16)
    assert int8.num_pages == budget // (kv_bytes_per_token(smollm2.config, jnp.int8) * 16)
    assert int8.num_pages >= 3.7 * f32.num_pages
    prompts = [
        "The capital of France is",
        "List three primary colours:",
        "def fibonacci(n):",
        "Water boils at",
        "Once upon a time, in a small village by the sea,",
    ]
    f32 = _engine(smollm2, kv_cache_gb=0.05, max_num_partial_prefills=None)
    ours, want = _greedy(int8, prompts, 24), _greedy(f32, prompts, 24)
    common = [
        next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(y))
        for x, y in zip(ours, want)
    ]
    assert sum(common) >= 0.75 * sum(len(y) for y in want), (common, ours, want)
    with pytest.raises(ValueError, match="attention_backend"):
        _engine(smollm2, kv_cache_dtype="int8", attention_backend="pallas")


def test_perplexity_with_int8_kv_is_close_and_differs():
    """The evaluator's int8-KV mode rounds keys and values (so the number changes) and stays
    within a fraction of a percent on a tiny random model."""
    config, params = _tiny()
    ids = np.random.default_rng(6).integers(0, config.vocab_size, 90).tolist()
    base = perplexity(params, config, ids, window=64, stride=32)
    int8 = perplexity(params, config, ids, window=64, stride=32, kv_cache_dtype="int8")
    assert int8.nll_sum != base.nll_sum
    assert int8.perplexity == pytest.approx(base.perplexity, rel=5e-3)
