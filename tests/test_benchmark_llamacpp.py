"""scripts/llamacpp_runner.py (used by scripts/benchmark_llamacpp.py): the file-type to
precision match, requantized copies, the missing-package message, and llama.cpp against our
LLM on the same Q8_0 file. llama-cpp-python is not a dependency: the tests that run it skip
only when it is not installed."""

from __future__ import annotations

import os
import sys

import llamacpp_runner as lr
import numpy as np
import pytest


def test_missing_llama_cpp_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(SystemExit, match=r"pip install llama-cpp-python"):
        lr.import_llama_cpp()


def test_requantize_target_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"requantize='Q3_K'.*allowed are"):
        lr.requantized("model.gguf", "Q3_K", str(tmp_path))


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from jax_infer.weights import default_gguf_path

    src = default_gguf_path()
    out = lr.requantized(src, "Q8_0", str(tmp_path_factory.mktemp("gguf")))
    return src, out


@pytest.mark.real_model
def test_file_types_match_our_precisions(q8_file):
    src, q8 = q8_file
    assert lr.ours_for(src) == ("Q4_1", "int4+embed")
    assert lr.ours_for(q8) == ("Q8_0", "int8+embed")
    mtime = os.path.getmtime(q8)
    assert lr.requantized(src, "Q8_0", os.path.dirname(q8)) == q8  # cached, not rebuilt
    assert os.path.getmtime(q8) == mtime


@pytest.mark.real_model
@pytest.mark.slow
def test_llama_cpp_and_ours_continue_the_same_file_alike(q8_file):
    """Greedy tokens of llama.cpp (Q8_0 weights, Q8 activations) and ours (the file
    dequantized to f32) on the same prompt ids: the first four agree."""
    from jax_infer import LLM, SamplingParams

    _, q8 = q8_file
    ours = LLM(model=q8, max_num_seqs=1, max_model_len=96, kv_cache_gb=0.05, progress=False)
    with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as f:
        prompt = ours.tokenizer.encode(f.read())[:48]
    theirs = lr.LlamaCpp(q8, n_ctx=96, n_threads=2)
    ttft, rate, their_tokens = theirs.run(prompt, 4)
    assert ttft > 0 and rate > 0 and len(their_tokens) == 4
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    our_tokens = list(ours.generate([prompt], greedy)[0].token_ids)
    assert their_tokens == our_tokens
    # The same prompt again: reset() clears llama.cpp's cache, so the tokens repeat.
    assert theirs.run(prompt, 4)[2] == their_tokens
    assert np.all(np.asarray(their_tokens) < theirs.n_vocab)
