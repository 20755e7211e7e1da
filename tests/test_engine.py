"""The continuous-batching engine on the real model: identical greedy outputs to the trunk's
single-request generation under chunked prefill, preemption and prefix caching; aborts, bad
requests and a bounded set of compiled programs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jax_infer import SamplingParams
from jax_infer.engine import EngineConfig, LLMEngine, make_request
from jax_infer.generation import StaticBatchGenerator
from jax_infer.model.step import paged_forward

pytestmark = pytest.mark.real_model

MAX_LEN = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
WORDS = (
    "the river carried small boats past old stone houses while children counted the "
    "clouds and a baker sold warm bread to tired travellers near the bridge at dawn"
).split()


def varied_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 2 to ~180 tokens: short and long, several crossing page boundaries."""
    rng = np.random.default_rng(seed)
    lengths = [2, 3, 5, 9, 15, 16, 17, 31, 33, 47, 64, 70, 99, 128, 150, 180]
    prompts = []
    for i in range(n):
        words = rng.choice(WORDS, size=lengths[i % len(lengths)]).tolist()
        prompts.append(words)
    return prompts


@pytest.fixture(scope="module")
def tok_prompts(smollm2):
    return [smollm2.tokenizer.encode(" ".join(p))[:200] for p in varied_prompts(16)]


@pytest.fixture(scope="module")
def reference(smollm2, tok_prompts):
    """The trunk's generation, one request at a time over a contiguous cache, attending with
    the jnp `attend` (not the C++ kernels the engine uses on this CPU)."""
    gen = StaticBatchGenerator(
        smollm2.config,
        smollm2.params,
        smollm2.tokenizer,
        smollm2.dtype,
        MAX_LEN,
        attention_backend="xla",
    )
    assert not gen.native_attention
    outs = []
    for i, ids in enumerate(tok_prompts):
        seq = make_request(str(i), None, ids, GREEDY, smollm2.tokenizer, np.random.default_rng(0))
        for _ in gen.run([seq]):
            pass
        outs.append(seq.output_token_ids)
    return outs


def run_engine(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
    return [final[i].token_ids for i in ids]


def make_engine(smollm2, **kwargs) -> LLMEngine:
    return LLMEngine(
        smollm2.config,
        smollm2.params,
        smollm2.tokenizer,
        dtype=smollm2.dtype,
        max_model_len=MAX_LEN,
        engine_config=EngineConfig(**kwargs),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("default", {}),
        ("chunk16", {"max_num_batched_tokens": 16}),
        ("tiny_pool_preempts", {"num_pages": 40, "page_size": 8, "max_num_batched_tokens": 64}),
    ],
)
def test_greedy_identical_to_single_requests(smollm2, tok_prompts, reference, name, kwargs):
    engine = make_engine(smollm2, **kwargs)
    got = run_engine(engine, tok_prompts)
    for i, (g, r) in enumerate(zip(got, reference)):
        assert g == r, f"{name}: prompt {i} ({len(tok_prompts[i])} tokens) differs"
    if name == "tiny_pool_preempts":
        assert engine.num_preemptions > 0, "the pool was meant to force preemptions"
    free = engine.scheduler.allocator.num_free()
    assert free == engine.num_pages - 1, "pages leaked after every request ended"


@pytest.mark.slow
def test_prefix_caching_shared_prefixes(smollm2):
    prefix = smollm2.tokenizer.encode(" ".join(WORDS * 3))  # ~90 tokens: several full pages
    suffixes = ["What is the baker selling?", "Who counts the clouds?", "Where are the boats?"]
    prompts = [prefix + smollm2.tokenizer.encode(" " + s) for s in suffixes]
    cached = make_engine(smollm2, enable_prefix_caching=True)
    plain = make_engine(smollm2, enable_prefix_caching=False)
    # One at a time, so later requests can hit the pages the first one registered.
    with_cache = [run_engine(cached, [p])[0] for p in prompts]
    without = [run_engine(plain, [p])[0] for p in prompts]
    assert with_cache == without
    assert cached.scheduler.prefix_hit_rate() > 0.5


def test_bad_requests_leave_others_untouched(smollm2):
    engine = make_engine(smollm2)
    good = [smollm2.tokenizer.encode("Once upon a time"), smollm2.tokenizer.encode("1, 2, 3,")]
    alone = run_engine(make_engine(smollm2), good)
    ids = [engine.add_request(p, GREEDY) for p in good]
    engine.step()  # the good requests are running when the bad ones arrive
    bad = [
        ([], GREEDY, "empty"),
        ([5, 10**6], GREEDY, "outside the vocabulary"),
        ([5] * MAX_LEN, GREEDY, "max_model_len"),
        ([5, 6], "not params", "SamplingParams"),
        ([5, 6], SamplingParams(max_tokens=MAX_LEN), "max_model_len"),
    ]
    for prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request(prompt, params)
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request([5, 6], SamplingParams(top_k=-5))
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk.token_ids
    assert [final[i] for i in ids] == alone


def test_abort_frees_pages_and_reports(smollm2):
    engine = make_engine(smollm2)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    ids = [
        engine.add_request(smollm2.tokenizer.encode(f"Story number {i}:"), params) for i in range(3)
    ]
    for _ in range(3):
        engine.step()
    used = engine.num_pages - 1 - engine.scheduler.allocator.num_free()
    assert engine.abort(ids[1])
    assert engine.num_pages - 1 - engine.scheduler.allocator.num_free() < used
    assert not engine.abort("no-such-request")
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
    assert final[ids[1]].finish_reason == "abort"
    assert len(final[ids[1]].token_ids) < 50
    assert [len(final[i].token_ids) for i in (ids[0], ids[2])] == [50, 50]
    assert engine.scheduler.allocator.num_free() == engine.num_pages - 1


def test_compiled_programs_are_bounded(smollm2):
    """A random stream of requests arriving over time: replaying a stream of the same shape
    compiles nothing new, and the total stays within the bucket grid."""
    engine = make_engine(smollm2, max_num_seqs=8, max_num_batched_tokens=64)

    def serve(content_seed):
        shape = np.random.default_rng(7)  # lengths and arrivals: the same each time
        content = np.random.default_rng(content_seed)  # token ids: new each time
        for _ in range(24):
            n = int(shape.integers(2, 60))
            engine.add_request(
                content.integers(100, 10000, size=n).tolist(),
                SamplingParams(
                    temperature=0.0, max_tokens=int(shape.integers(1, 12)), ignore_eos=True
                ),
            )
            if shape.random() < 0.6:
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()

    before = paged_forward._cache_size()
    serve(1)
    after_first = paged_forward._cache_size()
    # Buckets: decode rows {0,1,4,8} x prefill region {0,32,64} x pages {4,8}.
    assert after_first - before <= 4 * 3 * 2
    serve(2)
    assert paged_forward._cache_size() == after_first


@pytest.mark.slow
def test_attention_backends_agree(smollm2):
    """reference, xla, cpu (the C++ decode kernel) and pallas (the ragged kernel, its GPU variant
    interpreted on CPU) give the same greedy tokens on short prompts, batched with a mix of
    decodes and a prefill chunk."""
    prompts = [smollm2.tokenizer.encode(t) for t in ("The capital of France is", "Hi")]
    params = SamplingParams(temperature=0.0, max_tokens=4)
    outs = {}
    for backend in ("reference", "xla", "cpu", "pallas"):
        engine = make_engine(smollm2, attention_backend=backend, max_num_batched_tokens=32)
        outs[backend] = run_engine(engine, prompts, params)
    assert outs["reference"] == outs["xla"] == outs["cpu"] == outs["pallas"]


@pytest.mark.parametrize("lose_pool", [False, True], ids=["step_raises", "pool_deleted"])
def test_a_failed_step_ends_its_requests_and_the_others_go_on(smollm2, lose_pool):
    """Prompts share a two-page prefix; the first step run while that prefix is cached and
    requests wait raises: exactly its requests end "error" naming the cause, the others give
    the greedy tokens of a run without the fault, and no page leaks. With pool_deleted the
    failed call also deleted the donated page pool: the engine re-creates it, preempts any
    running request the step left out, and drops the prefix cache (its pages are zeros now,
    so a waiting request reusing them would go wrong)."""
    prefix = " ".join(WORDS * 2)
    texts = [f"{prefix} {end}" for end in ("one", "two", "three", "four", "five")]
    prompts = [smollm2.tokenizer.encode(t) for t in texts]
    assert len(prompts[0]) > 2 * 16
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kwargs = dict(max_num_seqs=2)
    alone = run_engine(make_engine(smollm2, **kwargs), prompts, params)
    engine = make_engine(smollm2, **kwargs)
    failed: list[str] = []
    left_out: list[str] = []

    def fault_hook(eng, out):
        sched = eng.scheduler
        if not failed and sched.allocator.num_cached() and sched.num_waiting():
            failed.extend(s.request_id for s in out.scheduled)
            scheduled = set(failed)
            left_out.extend(
                r
                for r in eng.requests
                if r not in scheduled and sched.get_request(r) and sched.get_request(r).block_table
            )
            if lose_pool:  # as a jitted call that had the pool donated and then failed
                for leaf in jax.tree.leaves(eng.runner.pool):
                    leaf.delete()
            raise RuntimeError("injected fault")

    engine.fault_hook = fault_hook
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
        engine.scheduler.check_invariants()
        if failed and lose_pool:
            assert not engine.runner.pool_is_lost()
    assert failed and set(failed) < set(ids)
    for rid, want in zip(ids, alone):
        out = final[rid]
        if rid in failed:
            assert out.finish_reason == "error" and "RuntimeError: injected fault" in out.error
        else:
            assert out.finish_reason == "length" and out.token_ids == want, rid
    assert engine.scheduler.allocator.num_free() == engine.num_pages - 1
    assert engine.num_preemptions == (len(left_out) if lose_pool else 0)
