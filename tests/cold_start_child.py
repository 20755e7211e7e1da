"""A child process for test_cold_start: a tiny engine (random weights, a word-level
tokenizer) built with precompile=True over the compilation cache named on the command line,
a few greedy requests, then one JSON line: the compile counters and the tokens."""

from __future__ import annotations

import json
import sys

import numpy as np
import tokenizers

from jax_infer import SamplingParams, compile_cache, program_store
from jax_infer.config import ModelConfig
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.model.llama import init_params
from jax_infer.tokenizer import Tokenizer

TINY = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)


def word_tokenizer(size: int) -> Tokenizer:
    vocab = {f"t{i}": i for i in range(size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(tok)


def prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sizes = (3, 17, 9, 22, 1, 12)
    return [rng.integers(1, TINY.vocab_size, size=k).tolist() for k in sizes][:n]


def make_engine(cache_dir, precompile: bool) -> LLMEngine:
    ec = EngineConfig(
        max_num_seqs=3,
        max_num_batched_tokens=32,
        page_size=4,
        num_pages=64,
        precompile=precompile,
        compilation_cache_dir=cache_dir,
    )
    return LLMEngine(
        TINY,
        init_params(TINY, seed=1),
        word_tokenizer(TINY.vocab_size),
        max_model_len=32,
        engine_config=ec,
        progress=False,
    )


def run(engine: LLMEngine, max_tokens: int = 8) -> list[list[int]]:
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        for p in prompts()
    ]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


def main(cache_dir: str, precompile: bool) -> None:
    engine = make_engine(cache_dir, precompile=precompile)
    after_precompile = compile_cache.stats()
    tokens = run(engine)
    program_store.flush()  # the stored programs written (counted in stored_writes)
    print(
        json.dumps(
            {
                "precompile": after_precompile,
                "end": compile_cache.stats(),
                "shapes": (engine.precompile_stats or {}).get("shapes", 0),
                "tokens": tokens,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], precompile="--no-precompile" not in sys.argv[2:])
