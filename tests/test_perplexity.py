"""Sliding-window perplexity: the window arithmetic, the numbers against HF transformers on a
tiny Llama, and (slow) quantized SmolLM2 against f32 on real English text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_infer import LLM
from jax_infer.eval import perplexity, sliding_windows
from jax_infer.weights import load_hf
from tests.tiny_models import make_hf_model


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 300), st.integers(2, 64), st.data())
def test_windows_score_every_token_once_with_context(n, window, data):
    stride = data.draw(st.integers(1, window))
    windows = list(sliding_windows(n, window, stride))
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    if stride < window:  # each target once, in order; token 0 has no context
        assert scored == list(range(1, n))
    else:  # as in HF's recipe, a window's first token has no context in it and is skipped
        assert scored == [t for t in range(1, n) if t % window]
    for i, w in enumerate(windows):
        assert 0 <= w.begin < w.score_from <= w.end <= n and w.end - w.begin <= window
        if i > 0:  # every scored token sees at least window - stride earlier tokens
            assert w.score_from - w.begin >= min(window - stride, w.score_from)
    assert windows[-1].end == n


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="window=1"):
        list(sliding_windows(10, 1, 1))
    with pytest.raises(ValueError, match="stride=9"):
        list(sliding_windows(10, 8, 9))
    with pytest.raises(ValueError, match="num_tokens=1"):
        list(sliding_windows(1, 8, 4))


def hf_sliding_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """HF's perplexity recipe (labels -100 on context tokens; the loss shifts labels), as a
    sum of NLLs and a count rather than a mean of means."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("window,stride", [(64, 64), (64, 24), (200, 200), (32, 1)])
def test_perplexity_matches_transformers(window, stride, tmp_path):
    model = make_hf_model("llama", tmp_path)
    config, params = load_hf(str(tmp_path), progress=False)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 150).tolist()
    ours = perplexity(params, config, ids, window=window, stride=stride)
    ref_nll, ref_count = hf_sliding_nll(model, ids, window, stride)
    assert ours.scored_tokens == ref_count
    assert ours.nll_sum == pytest.approx(ref_nll, rel=2e-5)
    assert ours.perplexity == pytest.approx(math.exp(ref_nll / ref_count), rel=2e-5)
    assert ours.tokens_per_s > 0 or ours.windows == 1


def test_one_window_is_plain_next_token_nll(tmp_path):
    """With the whole text in one window the result is sum_t -log p(x_t | x_<t), computed here
    directly from HF's logits with numpy."""
    model = make_hf_model("mistral_sliding", tmp_path)  # sliding-window attention too
    config, params = load_hf(str(tmp_path), progress=False)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 40).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    ref = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))
    ours = perplexity(params, config, ids, window=64, stride=64)
    assert ours.windows == 1 and ours.nll_sum == pytest.approx(ref, rel=2e-5)


def test_window_longer_than_the_model_is_refused(tmp_path):
    make_hf_model("llama", tmp_path)
    config, params = load_hf(str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        perplexity(params, config, list(range(10)), window=512, stride=256)


# Quantized SmolLM2 against f32 on English text (the GPL-3): a 3072-token slice in 512-token
# windows keeps this near two and a half minutes on the 2-core CPU. The full measurement
# (scripts/perplexity.py on 24,693 tokens of five license texts, 1024-token windows, stride
# 512) gives f32 14.232, int8+embed 14.290 (+0.40%); short slices are noisier, and on this
# one per-column int8 sits near +0.5%, so the 0.5% bound is checked on int8-g64 (per group
# of 64 input rows) and per-column int8 gets 1%.
TEXT = "/usr/share/common-licenses/GPL-3"
SLICE_TOKENS, WINDOW, STRIDE = 3072, 512, 256
BOUNDS = {"int8-g64+embed": 1.005, "int8+embed": 1.01, "int4+embed": 1.05}
KV_BOUND = 1.005  # int8 KV cache (per token and head) on f32 weights


@pytest.mark.slow
@pytest.mark.real_model
def test_quantized_smollm2_perplexity_stays_close(gguf_path):
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    results = {}
    for scheme in (None, *BOUNDS):
        llm = LLM(model=gguf_path, quantization=scheme, engine="static", progress=False)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)[:SLICE_TOKENS]
        assert len(ids) == SLICE_TOKENS
        r = perplexity(llm.params, llm.config, ids, window=WINDOW, stride=STRIDE)
        results[scheme] = r.perplexity
        if scheme is None:  # the same f32 model scored through the int8 KV cache's rounding
            r = perplexity(
                llm.params, llm.config, ids, window=WINDOW, stride=STRIDE, kv_cache_dtype="int8"
            )
            results["int8 KV"] = r.perplexity
    f32 = results[None]
    assert 5 < f32 < 50, results  # an English text under a working model
    for scheme, bound in BOUNDS.items():
        assert results[scheme] <= f32 * bound, (scheme, results)
    assert results["int8 KV"] <= f32 * KV_BOUND, results
