"""Parallel sampling (n), logit_bias and prompt_logprobs, on a tiny random HF model.

n samples of one prompt share its KV pages: the prompt is computed once and its pages are
held with one reference per sample (checked on the allocator); the partly filled last page
is copied on the first divergent write. Each sample equals a single request whose seed is
`SamplingParams.sample_seed(seed, i)` = seed + i, with and without chunked prefill and under
preemption. prompt_logprobs are checked against HF transformers' log_softmax."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_infer import SamplingParams
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.scheduler import Request, Scheduler
from jax_infer.tokenizer import Tokenizer
from jax_infer.weights import load_hf
from tests.test_scheduler_property import VOCAB, FakeDevice
from tests.tiny_models import make_hf_model

PAGE = 8
MAX_LEN = 64
SAMPLED = SamplingParams(temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gguf_path):
    """(HF model, config, params, tokenizer): ids below the tiny vocab (97) are real tokens
    of the SmolLM2 tokenizer, which detokenizes."""
    path = tmp_path_factory.mktemp("tiny")
    model = make_hf_model("llama", path)
    config, params = load_hf(str(path), progress=False)
    return model, config, params, Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(0).integers(3, 97, size=21).tolist()  # 2 full pages + 5


def make_engine(tiny, **kw) -> LLMEngine:
    _, config, params, tok = tiny
    ec = EngineConfig(**({"max_num_seqs": 8, "page_size": PAGE, "num_pages": 64} | kw))
    return LLMEngine(config, params, tok, max_model_len=MAX_LEN, engine_config=ec)


def run(engine: LLMEngine, prompts, params, on_step=None) -> dict[str, object]:
    """Final output of every engine request (sample ids for n > 1), by id."""
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"r{i}")
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if on_step is not None:
            on_step(engine)
        engine.scheduler.check_invariants()
    assert engine.scheduler.allocator.num_used() == 0
    return final


def singles(tiny, prompt, params, n, **kw) -> list[list[int]]:
    """Each sample as a request of its own with the derived seed, one engine per request."""
    out = []
    for i in range(n):
        one = dataclasses.replace(params, n=1, seed=params.sample_seed(params.seed, i))
        out.append(run(make_engine(tiny, **kw), [prompt], one)["r0"].token_ids)
    return out


# -- the scheduler alone ------------------------------------------------------------------


def test_fork_shares_prompt_pages_and_copies_the_partial_page_once_per_writer():
    sched = Scheduler(
        num_pages=40, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32
    )
    prompt = list(range(10, 20))  # 2 full pages + 2 tokens
    group = [Request(f"s{i}", prompt, 5) for i in range(8)]
    sched.add_request(group[0], group[1:])
    out = sched.schedule()
    assert [len(s.followers) for s in out.scheduled] == [7]
    assert sched.allocator.num_used() == 3
    sched.update(out, {r.request_id: [100 + i] for i, r in enumerate(group)})
    sched.check_invariants()
    pages = list(group[0].block_table)
    assert sched.allocator.num_used() == 3  # the prompt's pages, held once...
    assert all(r.block_table == pages for r in group)
    assert [sched.allocator.refcount(p) for p in pages] == [8, 8, 8]  # ...by all 8 samples
    out = sched.schedule()
    # Every sample writes position 10 into the shared third page: 7 copy it, the last
    # writer keeps it; the two full pages stay shared.
    assert len(out.page_copies) == 7 and {c[0] for c in out.page_copies} == {pages[2]}
    assert [sched.allocator.refcount(p) for p in pages[:2]] == [8, 8]
    assert sched.allocator.refcount(pages[2]) == 1
    assert sched.allocator.num_used() == 3 + 7
    sched.update(out, {r.request_id: [7] for r in group})
    sched.check_invariants()


def test_group_needs_seats_and_a_leader_leaving_early_releases_its_followers():
    kw = dict(num_pages=40, page_size=4, max_num_batched_tokens=64, max_model_len=32)
    with pytest.raises(ValueError, match="n=3 samples need 3 seats but max_num_seqs=2"):
        Scheduler(max_num_seqs=2, **kw).add_request(
            Request("a", [1, 2], 3), [Request("b", [1, 2], 3), Request("c", [1, 2], 3)]
        )
    sched = Scheduler(max_num_seqs=4, **kw)
    sched.add_request(Request("x", [5, 6, 7], 3))
    group = [Request(f"g{i}", [1, 2, 3], 3) for i in range(4)]
    sched.add_request(group[0], group[1:])
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["x"]  # the group waits for 4 seats
    sched.update(out, {"x": [9]})
    sched.abort("x")
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["g0"]
    sched.abort("g0")  # before the fork: the followers go on as requests of their own
    sched.check_invariants()
    sched.update(out, {})
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["g1", "g2", "g3"]
    assert not any(s.followers for s in out.scheduled)
    sched.check_invariants()


# -- the engine ----------------------------------------------------------------------------


def test_n8_holds_the_prompt_pages_once_and_each_sample_equals_its_single_request(tiny, prompt):
    params = dataclasses.replace(SAMPLED, n=8)
    engine = make_engine(tiny)
    held = []

    def on_step(eng):
        if not held:  # after the prompt's step: 8 samples, forked, on the prompt's 3 pages
            reqs = [eng.requests[f"r0#{i}"] for i in range(8)]
            pages = reqs[0].block_table
            held.append([eng.scheduler.allocator.refcount(p) for p in pages])
            held.append(eng.scheduler.allocator.num_used())
            assert all(r.block_table == pages for r in reqs)

    final = run(engine, [prompt], params, on_step)
    assert held == [[8, 8, 8], 3]
    samples = [final[f"r0#{i}"] for i in range(8)]
    assert [s.index for s in samples] == list(range(8))
    assert {s.group_id for s in samples} == {"r0"}
    tokens = [s.token_ids for s in samples]
    assert len({tuple(t) for t in tokens}) > 1  # the seeds differ, so do the samples
    assert tokens == singles(tiny, prompt, params, 8)


@pytest.mark.parametrize(
    "kw",
    [
        {"long_prefill_chunk": 8, "max_num_partial_prefills": None},  # chunked prefill
        {"num_pages": 12},  # 11 pages for 4 samples of up to 27 tokens: preemption
    ],
    ids=["chunked", "preempted"],
)
def test_n_samples_equal_single_requests_chunked_and_preempted(tiny, prompt, kw):
    params = dataclasses.replace(SAMPLED, n=4, max_tokens=20, seed=5)
    engine = make_engine(tiny, max_num_seqs=4, **kw)
    final = run(engine, [prompt], params)
    if "num_pages" in kw:
        assert engine.num_preemptions > 0
    got = [final[f"r0#{i}"].token_ids for i in range(4)]
    assert got == singles(tiny, prompt, params, 4, max_num_seqs=4, **kw)


def test_abort_of_a_group_aborts_every_sample(tiny, prompt):
    engine = make_engine(tiny)
    engine.add_request(prompt, dataclasses.replace(SAMPLED, n=3), request_id="g")
    engine.step()
    assert engine.abort("g")
    outs = engine.step()
    assert sorted(o.request_id for o in outs if o.finish_reason == "abort") == [
        "g#0",
        "g#1",
        "g#2",
    ]
    assert not engine.has_unfinished_requests() and not engine.groups
    assert engine.scheduler.allocator.num_used() == 0


# -- logit_bias ----------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens_greedy_and_sampled(tiny, prompt):
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    base = run(make_engine(tiny), [prompt], greedy)["r0"].token_ids
    forced = dataclasses.replace(greedy, logit_bias={42: 100})
    assert run(make_engine(tiny), [prompt], forced)["r0"].token_ids == [42] * 5
    banned = dataclasses.replace(greedy, logit_bias={t: -100 for t in set(base)})
    got = run(make_engine(tiny), [prompt], banned)["r0"].token_ids
    assert not set(got) & set(base)
    sampled = dataclasses.replace(SAMPLED, logit_bias={7: 100.0, 8: -3.5})
    assert run(make_engine(tiny), [prompt], sampled)["r0"].token_ids == [7] * 6


def test_logit_bias_and_n_are_validated(tiny):
    for bad, what in [
        ({-1: 1.0}, "entry -1"),
        ({3: 100.5}, "entry 3: 100.5"),
        ({3: float("nan")}, "entry 3"),
        ({"3": 1.0}, "entry '3'"),
        (5, "=5 is invalid"),
    ]:
        with pytest.raises(ValueError, match=rf"SamplingParams\.logit_bias.*{what}"):
            SamplingParams(logit_bias=bad)
    assert SamplingParams(logit_bias={5: 1, 2: -2.0}).logit_bias == ((2, -2.0), (5, 1.0))
    with pytest.raises(ValueError, match=r"SamplingParams\.n=0 is invalid"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match=r"SamplingParams\.prompt_logprobs=21"):
        SamplingParams(prompt_logprobs=21)
    engine = make_engine(tiny, max_num_seqs=4)
    with pytest.raises(ValueError, match=r"logit_bias token ids \[97\] are outside"):
        engine.add_request([1, 2], SamplingParams(logit_bias={97: 1.0}))
    with pytest.raises(ValueError, match="n=5 samples need 5 seats but max_num_seqs=4"):
        engine.add_request([1, 2], SamplingParams(n=5))
    assert not engine.has_unfinished_requests()


# -- prompt_logprobs -----------------------------------------------------------------------


def hf_prompt_logprobs(model, prompt, k):
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    out = [None]
    for p in range(1, len(prompt)):
        row = logp[p - 1]
        top = np.argsort(-row, kind="stable")[:k]
        out.append({int(t): float(row[t]) for t in top} | {prompt[p]: float(row[prompt[p]])})
    return out


@pytest.mark.parametrize("chunk", [None, 8], ids=["one_chunk", "chunked"])
def test_prompt_logprobs_match_transformers(tiny, prompt, chunk):
    model = tiny[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3, n=2)
    kw = {} if chunk is None else {"long_prefill_chunk": chunk, "max_num_partial_prefills": None}
    engine = make_engine(tiny, **kw)
    # A cached prefix would skip prefill: the second request must still compute its prompt.
    final = run(engine, [prompt, prompt], params)
    want = hf_prompt_logprobs(model, prompt, 3)
    for rid in ("r0#0", "r0#1", "r1#0", "r1#1"):
        got = final[rid].prompt_logprobs
        assert got[0] is None and len(got) == len(prompt)
        for g, w in zip(got[1:], want[1:]):
            assert g.keys() == w.keys()
            np.testing.assert_allclose([g[t] for t in w], list(w.values()), atol=2e-4)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_generate_n_outputs_equal_single_requests(smollm2):
    """LLM.generate with n: one output per prompt, `outputs` the n samples, each equal to the
    request with seed seed + i; `text` is sample 0's."""
    params = SamplingParams(n=4, seed=9, temperature=0.9, max_tokens=6)
    prompts = ["Once upon a time", "The best way to learn"]
    outs = smollm2.generate(prompts, params)
    assert len(outs) == 2
    for prompt, out in zip(prompts, outs):
        assert [o.index for o in out.outputs] == [0, 1, 2, 3]
        assert out.text == out.outputs[0].text
        single = smollm2.generate(
            [prompt] * 4,
            [dataclasses.replace(params, n=1, seed=9 + i) for i in range(4)],
        )
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in single]


# -- forks under random load (the scheduler alone, a fake device) ---------------------------


class CopyingDevice(FakeDevice):
    """The property test's fake pool of token ids, making the step's page copies first."""

    def step(self, out):
        for src, dst in out.page_copies:
            self.pool[dst] = list(self.pool[src])
        return super().step(out)


def run_groups(prompts, ns, max_tokens, **config):
    """Prompt i sampled ns[i] times; sample j's token is a function of j and of the sequence
    read back from the (fake) cache, so a shared page written wrongly changes the outputs."""
    sched = Scheduler(**config)
    device = CopyingDevice(config["num_pages"], config["page_size"])
    for i, (prompt, n) in enumerate(zip(prompts, ns)):
        group = [Request(f"g{i}#{j}", prompt, max_tokens[i]) for j in range(n)]
        sched.add_request(group[0], group[1:])
    results, preemptions, copies = {}, 0, 0
    while sched.has_unfinished():
        out = sched.schedule()
        preemptions += len(out.preempted)
        copies += len(out.page_copies)
        seqs = device.step(out)
        sampled = {}
        for sr in out.scheduled:
            if sr.sample:
                for req in (sr.request, *sr.followers):
                    j = int(req.request_id.split("#")[1])
                    sampled[req.request_id] = [hash((j, *seqs[sr.request_id])) % VOCAB]
        for r in sched.update(out, sampled):
            results[r.request_id] = tuple(r.output_token_ids)
        sched.check_invariants()
    assert sched.allocator.num_free() == config["num_pages"] - 1
    return results, preemptions, copies


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([9, 12, 20]), st.booleans())
def test_forked_groups_under_preemption_equal_a_roomy_run(seed, num_pages, prefix_caching):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    ns = [rng.randrange(1, 5) for _ in prompts]
    max_tokens = [rng.randrange(1, 32 - len(p)) for p in prompts]
    kw = dict(page_size=4, max_num_batched_tokens=16, max_model_len=32)
    want, _, _ = run_groups(prompts, ns, max_tokens, num_pages=200, max_num_seqs=16, **kw)
    got, _, _ = run_groups(
        prompts,
        ns,
        max_tokens,
        num_pages=num_pages,
        max_num_seqs=4,
        enable_prefix_caching=prefix_caching,
        **kw,
    )
    assert got == want
