"""The cache of converted weights (jax_infer/weights/cache.py): a hit gives the same bits as
a fresh conversion, a changed source or option misses, a damaged entry is rebuilt, the off
switch stores nothing, and the directory stays within its bound."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jax_infer import LLM, SamplingParams
from jax_infer.weights import cache as weights_cache
from jax_infer.weights.cache import WeightsCache

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.test_multiprocess import write_tokenizer
    from tests.tiny_models import make_hf_model

    path = tmp_path_factory.mktemp("wcache") / "llama"
    # Widths that are multiples of 64: on a CPU the projections go into the f32 tile layout,
    # which the cache must give back as it is.
    make_hf_model("llama", path, vocab_size=VOCAB, intermediate_size=128)
    write_tokenizer(path, VOCAB)
    return str(path)


def make(path, cache_dir, **kw) -> LLM:
    llm = LLM(
        path, max_model_len=64, num_pages=16, progress=False, weights_cache_dir=cache_dir, **kw
    )
    weights_cache.flush()
    return llm


def greedy(llm) -> list[int]:
    out = llm.generate([[5, 17, 3, 99, 42]], SamplingParams(max_tokens=6, temperature=0.0))
    return list(out[0].token_ids)


def assert_same_params(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def entries(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(weights_cache.SUFFIX))


@pytest.mark.parametrize(
    "dtype,quantization", [("float32", None), ("float32", "int8"), ("bfloat16", None)]
)
def test_hit_equals_fresh_conversion_bitwise(tiny_dir, tmp_path, dtype, quantization):
    fresh = make(tiny_dir, str(tmp_path), dtype=dtype, quantization=quantization)
    assert not fresh.weights_cache_hit
    assert len(entries(tmp_path)) == 1  # written (bfloat16 once failed to: no buffer format)
    cached = make(tiny_dir, str(tmp_path), dtype=dtype, quantization=quantization)
    assert cached.weights_cache_hit
    assert cached.config == fresh.config
    assert_same_params(cached.params, fresh.params)
    assert cached.tokenizer.encode("t5 t6 t99") == fresh.tokenizer.encode("t5 t6 t99")
    assert greedy(cached) == greedy(fresh)


def test_changed_source_or_option_misses(tiny_dir, tmp_path):
    cache = WeightsCache(str(tmp_path))
    base = cache.key(tiny_dir, dtype="float32", quantization=None)
    assert cache.key(tiny_dir, dtype="float32", quantization=None) == base
    assert cache.key(tiny_dir, dtype="bfloat16", quantization=None) != base
    assert cache.key(tiny_dir, dtype="float32", quantization="int8") != base
    make(tiny_dir, str(tmp_path))
    assert make(tiny_dir, str(tmp_path)).weights_cache_hit
    # A rewritten weights file (new mtime) is another source.
    weights_file = os.path.join(tiny_dir, "model.safetensors")
    st = os.stat(weights_file)
    os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert cache.key(tiny_dir, dtype="float32", quantization=None) != base
        assert not make(tiny_dir, str(tmp_path)).weights_cache_hit
    finally:
        os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not make(tiny_dir, str(tmp_path), dtype="bfloat16").weights_cache_hit


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_header"])
def test_damaged_entry_is_rebuilt(tiny_dir, tmp_path, damage, caplog):
    fresh = make(tiny_dir, str(tmp_path))
    (name,) = entries(tmp_path)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_data":
        data[4096] ^= 0x40  # inside the first leaf's bytes
    else:
        data[20] ^= 0x01  # inside the JSON header
    path.write_bytes(bytes(data))
    rebuilt = make(tiny_dir, str(tmp_path))
    assert not rebuilt.weights_cache_hit
    assert "unreadable" in caplog.text
    assert_same_params(rebuilt.params, fresh.params)
    again = make(tiny_dir, str(tmp_path))  # the rebuilt entry is whole
    assert again.weights_cache_hit
    assert_same_params(again.params, fresh.params)


def test_off_switch(tiny_dir, tmp_path, monkeypatch):
    llm = make(tiny_dir, None)
    assert not llm.weights_cache_hit
    assert weights_cache.resolve_dir("off") is None
    monkeypatch.setenv(weights_cache.ENV_VAR, "off")
    assert weights_cache.resolve_dir("auto") is None
    monkeypatch.setenv(weights_cache.ENV_VAR, str(tmp_path / "env"))
    assert weights_cache.resolve_dir("auto") == str(tmp_path / "env")
    with pytest.raises(ValueError, match=r"weights_cache_dir=5 is invalid: allowed are"):
        weights_cache.resolve_dir(5)


def test_lru_bound_evicts_oldest(tmp_path):
    cache = WeightsCache(str(tmp_path), max_bytes=3 * 2**20)
    params = {"w": np.arange(2**18, dtype=np.float32)}  # 1 MiB
    for i in range(5):
        cache.store(f"k{i}", None, params, None, background=False)
        os.utime(cache.path(f"k{i}"), (i, i))  # distinct ages, oldest first
    cache.store("k5", None, params, None, background=False)
    left = entries(tmp_path)
    assert len(left) <= 3 and "k5.weights" in left and "k0.weights" not in left
    assert cache.load("k0") is None
    _, loaded, _, _ = cache.load("k5")
    np.testing.assert_array_equal(np.asarray(loaded["w"]), params["w"])
