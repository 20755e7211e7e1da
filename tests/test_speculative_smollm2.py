"""Speculative decoding on SmolLM2-135M: greedy outputs with prompt lookup (16 prompts) and
with the int4 self-draft (8 of them) are token for token those of plain decoding, on
input-grounded prompts (real text from /usr/share/common-licenses), batched."""

from __future__ import annotations

import pytest
from speculative_prompts import grounded_prompts

from jax_infer import SamplingParams
from jax_infer.engine import EngineConfig, LLMEngine

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MAX_LEN = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = smollm2.tokenizer
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in grounded_prompts(16)
    ]


def make(smollm2, max_num_seqs, draft_model=None, **spec):
    ec = EngineConfig(max_num_seqs=max_num_seqs, kv_cache_gb=0.25, **spec)
    return LLMEngine(
        smollm2.config,
        smollm2.params,
        smollm2.tokenizer,
        dtype=smollm2.dtype,
        max_model_len=MAX_LEN,
        engine_config=ec,
        draft_model=draft_model,
    )


def run(eng, prompts):
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    final = {}
    while eng.has_unfinished_requests():
        for chunk in eng.step():
            if chunk.finished:
                final[chunk.request_id] = chunk.token_ids
    assert eng.scheduler.allocator.num_free() == eng.num_pages - 1
    return [final[i] for i in ids]


@pytest.fixture(scope="module")
def reference(smollm2, prompts):
    return run(make(smollm2, 8), prompts)


def test_ngram_identical(smollm2, prompts, reference):
    # Batched here; one request at a time is covered on the tiny model (test_spec_engine.py),
    # which keeps this real-model file within CI's time budget.
    eng = make(smollm2, 8, speculative_method="ngram", num_speculative_tokens=8)
    assert run(eng, prompts) == reference
    stats = eng.stats()["speculative"]
    assert stats["num_verify_rows"] > 0 and stats["acceptance_rate"] > 0.2, stats


def test_self_draft_int4_identical(smollm2, prompts, reference):
    from jax_infer.quant import quantize

    # Eight of the prompts (one batch of 8 seats) keep this within CI's time budget; the
    # int4 self-draft on all 16 prompts, batched and single, runs on the tiny model
    # (test_spec_engine.py).
    draft = (smollm2.config, quantize(smollm2.canonical_params(), "int4+embed"))
    eng = make(
        smollm2, 8, draft_model=draft, speculative_method="draft_model", num_speculative_tokens=3
    )
    assert run(eng, prompts[:8]) == reference[:8]
    stats = eng.stats()["speculative"]
    assert stats["acceptance_rate"] > 0.4, stats
