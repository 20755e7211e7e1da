"""Greedy decoding of 32 requests at once (decode32's shape, on a tiny random model whose every
projection and LM head takes the CPU f32 tiled kernel) gives token for token what each request
gets alone: a row's result must not depend on the rows batched with it or on the padded
bucket it lands in (32 rows, then fewer as requests of different lengths finish)."""

from __future__ import annotations

import numpy as np
import pytest

from jax_infer import SamplingParams
from jax_infer.config import ModelConfig
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.model.llama import init_params
from jax_infer.tokenizer import Tokenizer

VOCAB = 512  # ids below 512 are real tokens of the SmolLM2 tokenizer used to detokenize
# Widths that are multiples of 64, so the projections and the LM head are in column tiles.
CONFIG = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=64,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def engine(gguf_path):
    ec = EngineConfig(max_num_seqs=32, page_size=16, num_pages=160, max_num_batched_tokens=512)
    return LLMEngine(
        CONFIG,
        init_params(CONFIG, seed=3),
        Tokenizer.from_gguf(gguf_path),
        max_model_len=128,
        engine_config=ec,
    )


def run(engine, prompts, params):
    ids = [engine.add_request(p, s) for p, s in zip(prompts, params)]
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk.token_ids
    return [final[i] for i in ids]


def test_32_batched_greedy_equals_single_requests(engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, size=int(n)).tolist() for n in rng.integers(2, 40, 32)]
    # Different lengths: the decode rows fall from 32 through every smaller bucket.
    params = [
        SamplingParams(temperature=0.0, max_tokens=2 + (7 * i) % 23, ignore_eos=True)
        for i in range(32)
    ]
    batched = run(engine, prompts, params)
    assert [len(t) for t in batched] == [p.max_tokens for p in params]
    for i, (p, s) in enumerate(zip(prompts, params)):
        alone = run(engine, [p], [s])[0]
        assert batched[i] == alone, f"request {i} ({len(p)} prompt tokens) differs batched"
