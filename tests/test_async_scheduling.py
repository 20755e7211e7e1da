"""Async scheduling (EngineConfig.async_scheduling) changes when the host works, never what
comes out: every mix here runs with it on and off and must give the same tokens, finish
reasons, text and logprobs; and the async runs must really have overlapped steps."""

from __future__ import annotations

import pytest

from jax_infer import SamplingParams
from jax_infer.engine import EngineConfig, LLMEngine

VOCAB = 128
MAX_LEN = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from jax_infer import LLM
    from tests.test_multiprocess import write_tokenizer
    from tests.tiny_models import make_hf_model

    path = tmp_path_factory.mktemp("async") / "llama"
    make_hf_model("llama", path, vocab_size=VOCAB)
    write_tokenizer(path, VOCAB)
    return LLM(str(path), max_model_len=MAX_LEN, progress=False)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, VOCAB, int(rng.integers(3, 40)))] for _ in range(n)]


def make_engine(llm, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_pages", 64)  # a small pool: these engines are many
    return LLMEngine(
        llm.config,
        llm.params,
        llm.tokenizer,
        dtype=llm.dtype,
        max_model_len=MAX_LEN,
        engine_config=EngineConfig(**kwargs),
    )


def run(engine: LLMEngine, prompts, params, abort_at=None) -> list[tuple]:
    """(token ids, finish reason, text, logprobs) per prompt; abort_at: (index, number of
    streamed tokens after which that request is aborted)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    samples = {rid: engine.sample_ids(rid) for rid in ids}  # n > 1: each sample's id
    final, seen = {}, {}
    while engine.has_unfinished_requests():
        for c in engine.step():
            seen[c.request_id] = len(c.token_ids)
            if c.finished:
                final[c.request_id] = c
        if abort_at is not None and seen.get(ids[abort_at[0]], 0) >= abort_at[1]:
            engine.abort(ids[abort_at[0]])
    assert engine.scheduler.kv_usage() == 0.0  # every page back
    out = []
    for rid in ids:
        outs = [final[sid] for sid in samples[rid]]
        out.append([(s.token_ids, s.finish_reason, s.text, s.logprobs) for s in outs])
    return out


def both(llm, prompts, params, **kwargs):
    on = make_engine(llm, async_scheduling=True, **kwargs)
    got = run(on, prompts, params)
    want = run(make_engine(llm, async_scheduling=False, **kwargs), prompts, params)
    return got, want, on.stats()


GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
SEEDED = SamplingParams(max_tokens=17, temperature=0.9, top_p=0.9, seed=7, logprobs=3)
STOPS = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[5, 7, 11, 13, 17, 19])


@pytest.mark.parametrize(
    "name,n,params,kwargs",
    [
        ("batch1", 1, GREEDY, {}),
        ("batch6", 6, GREEDY, {}),
        ("seeded_logprobs", 6, SEEDED, {}),
        ("stop_tokens", 6, STOPS, {}),
        ("chunked_prefill", 5, GREEDY, {"max_num_batched_tokens": 16}),
        ("preemption", 6, GREEDY, {"num_pages": 17, "page_size": 8, "max_num_batched_tokens": 32}),
        ("preemption_seeded", 6, SEEDED, {"num_pages": 17, "page_size": 8}),
        (
            "max_tokens_mix",
            6,
            [SamplingParams(max_tokens=m, temperature=0) for m in (1, 2, 3, 9, 30, 5)],
            {},
        ),
        ("stop_strings", 4, SamplingParams(max_tokens=24, temperature=0, stop=["t5", "t9 t"]), {}),
        (
            "min_tokens_bias",
            4,
            SamplingParams(
                max_tokens=12, min_tokens=6, temperature=0, stop_token_ids=[3], logit_bias={3: 4.0}
            ),
            {},
        ),
        ("seats2", 6, SEEDED, {"max_num_seqs": 2}),
    ],
)
def test_async_matches_sync(tiny, name, n, params, kwargs):
    got, want, stats = both(tiny, prompts(n, seed=len(name)), params, **kwargs)
    assert got == want
    assert stats["num_async_steps"] > 0
    if name.startswith("preemption"):
        assert stats["num_preemptions"] > 0


def test_parallel_sampling_and_penalties_match(tiny):
    # n > 1 forks from its leader's row and penalties count output tokens: those steps run
    # synchronously; steps after the fork overlap again.
    ps = [
        SamplingParams(n=3, max_tokens=10, temperature=0.8, seed=1),
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3),
        GREEDY,
    ]
    got, want, stats = both(tiny, prompts(3, seed=11), ps)
    assert got == want
    assert stats["num_async_steps"] > 0


def test_abort_mid_run_keeps_a_prefix(tiny):
    ps = prompts(4, seed=3)
    full = run(make_engine(tiny, async_scheduling=False), ps, GREEDY)
    for asyn in (True, False):
        got = run(make_engine(tiny, async_scheduling=asyn), ps, GREEDY, abort_at=(1, 5))
        tokens, reason, _, _ = got[1][0]
        assert reason == "abort" and 5 <= len(tokens) < 20
        assert tokens == full[1][0][0][: len(tokens)]
        assert [g for i, g in enumerate(got) if i != 1] == [f for i, f in enumerate(full) if i != 1]


def test_failed_step_with_a_step_in_flight(tiny):
    ps = prompts(3, seed=5)
    engine = make_engine(tiny, async_scheduling=True)
    want = run(make_engine(tiny, async_scheduling=False), ps, GREEDY)
    calls = []

    def fault_hook(eng, out):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("injected")

    engine.fault_hook = fault_hook
    got = run(engine, ps, GREEDY)
    failed = [i for i, g in enumerate(got) if g[0][1] == "error"]
    assert failed  # the requests of the sixth step
    for i, g in enumerate(got):
        if i not in failed:
            assert g == want[i]
        else:
            assert g[0][0] == want[i][0][0][: len(g[0][0])]


def test_speculative_and_structured_run_synchronously(tiny):
    engine = make_engine(
        tiny, async_scheduling=True, speculative_method="ngram", num_speculative_tokens=2
    )
    assert not engine.async_scheduling
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")


@pytest.mark.slow
def test_smollm2_async_matches_sync(smollm2):
    from jax_infer.sampling import StructuredOutputsParams

    engine = smollm2.engine
    prompts_ = [
        "The capital of France is",
        "def fibonacci(n):",
        "List three colors:",
        "Once upon a time",
    ]
    params = [
        SamplingParams(max_tokens=24, temperature=0.0),
        SamplingParams(max_tokens=16, temperature=0.7, seed=3, stop=["\n\n"]),
        SamplingParams(max_tokens=20, temperature=0.0, logprobs=2),
        SamplingParams(
            max_tokens=12,
            temperature=0.0,
            structured_outputs=StructuredOutputsParams(regex="[a-z ]+"),
        ),
    ]
    results = {}
    for asyn in (True, False):
        engine.async_scheduling = asyn
        before = engine.num_async_steps
        outs = smollm2.generate(prompts_, params)
        results[asyn] = [(o.token_ids, o.finish_reason, o.text, o.logprobs) for o in outs]
        if asyn:
            assert engine.num_async_steps > before
    engine.async_scheduling = True
    assert results[True] == results[False]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    from jax_infer import LLM
    from tests.test_multiprocess import write_tokenizer
    from tests.tiny_models import make_hf_model

    path = tmp_path_factory.mktemp("async") / "gemma3"
    make_hf_model("gemma3", path, vocab_size=VOCAB)
    write_tokenizer(path, VOCAB)
    return LLM(str(path), max_model_len=MAX_LEN, progress=False)


@pytest.mark.parametrize("kwargs", [{}, {"num_pages": 17, "page_size": 8}])
def test_window_page_groups_async_matches_sync(tiny_gemma3, kwargs):
    """A model with sliding-window page groups (one metadata per group) overlaps its steps
    too, with the same outputs; the small pool forces preemptions and window page freeing."""
    got, want, stats = both(tiny_gemma3, prompts(6, seed=3), GREEDY, **kwargs)
    assert got == want
    assert stats["num_async_steps"] > 0
