"""Scheduler and allocator under random load, against a fake device and a fake model.

The fake device stores token ids where the real one stores K/V: each step writes
the scheduled tokens into pool[page][slot] through the block table and reads every
request's sequence back the same way. The fake model samples a deterministic
function of that read-back sequence. So any wrong block table, page freed too
early, shared page overwritten or stale prefix-cache hit changes the outputs, and
outputs under preemption or prefix caching must equal a roomy, cache-free run.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from jax_infer.scheduler import Request, RequestStatus, Scheduler, SchedulerOutput

VOCAB = 11
EOS = 0


def next_token(seq: list[int]) -> int:
    """The fake model: a deterministic function of the whole sequence (int hashing is unsalted)."""
    return hash(tuple(seq)) % VOCAB


class FakeDevice:
    """A page pool of token ids standing in for the K/V pool: P pages of L slots."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.pool: list[list[int | None]] = [[None] * page_size for _ in range(num_pages)]

    def step(self, out: SchedulerOutput) -> dict[str, list[int]]:
        """Write every chunk, then read back each request's sequence [0, end) via its block table."""
        size = self.page_size
        for sr in out.scheduled:
            assert len(sr.block_table) * size >= sr.end, "block table too short for the chunk"
            for k, tok in enumerate(sr.token_ids):
                pos = sr.start + k
                self.pool[sr.block_table[pos // size]][pos % size] = tok
        seqs = {}
        for sr in out.scheduled:
            seq = [self.pool[sr.block_table[p // size]][p % size] for p in range(sr.end)]
            assert seq == sr.request.all_token_ids[: sr.end], (
                f"{sr.request_id}: the cache holds {seq}, expected {sr.request.all_token_ids[: sr.end]}"
            )
            seqs[sr.request_id] = seq
        return seqs


def check_step_shape(sched: Scheduler, out: SchedulerOutput) -> None:
    """Per-step policy: budget, seats, decodes first, sample flag, snapshots."""
    assert out.num_batched_tokens == sum(len(sr.token_ids) for sr in out.scheduled)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    assert len({sr.request_id for sr in out.scheduled}) == len(out.scheduled)
    for k, sr in enumerate(out.scheduled):
        is_decode = len(sr.token_ids) == 1 and not sr.is_new
        assert is_decode == (k < out.num_decodes), "decodes must come first"
        assert sr.sample == (sr.end == sr.request.num_tokens)
        assert sr.token_ids == sr.request.all_token_ids[sr.start : sr.end]
        assert 0 not in sr.block_table
        if sched.long_prefill_chunk is not None:
            assert len(sr.token_ids) <= sched.long_prefill_chunk


def run_engine(
    prompts: list[list[int]],
    max_tokens: list[int],
    arrivals: list[int],
    **config,
) -> tuple[dict[str, tuple[tuple[int, ...], str]], Scheduler, int]:
    """The engine loop: request i arrives at step arrivals[i]; EOS stops a request.

    Returns {request id: (output tokens, finish reason)}, the scheduler, and the number
    of preemptions.
    """
    sched = Scheduler(**config)
    device = FakeDevice(config["num_pages"], config["page_size"])
    pending = sorted(range(len(prompts)), key=arrivals.__getitem__)
    results: dict[str, tuple[tuple[int, ...], str]] = {}
    step = preemptions = 0
    while pending or sched.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            sched.add_request(Request(f"r{i}", prompts[i], max_tokens=max_tokens[i]))
        out = sched.schedule()
        check_step_shape(sched, out)
        preemptions += len(out.preempted)
        seqs = device.step(out)
        sampled, finished = {}, {}
        for sr in out.scheduled:
            if sr.sample:
                tok = next_token(seqs[sr.request_id])
                sampled[sr.request_id] = [tok]
                if tok == EOS:
                    finished[sr.request_id] = "stop"
        for r in sched.update(out, sampled, finished):
            results[r.request_id] = (tuple(r.output_token_ids), r.finish_reason)
        sched.check_invariants()
        assert not sched.pop_finished(), "nothing may fail or abort here"
        step += 1
        assert step < 5000, "the engine loop does not terminate"
    assert sched.allocator.num_free() == config["num_pages"] - 1
    return results, sched, preemptions


def make_workload(seed: int, n: int, max_model_len: int) -> tuple[list, list, list]:
    """Prompts sharing a few system prefixes (some identical), mixed lengths and arrivals."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 13))] for _ in range(3)]
    prompts, max_tokens, arrivals = [], [], []
    for _ in range(n):
        if prompts and rng.random() < 0.2:
            prompt = list(rng.choice(prompts))
        else:
            suffix = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))]
            prompt = (rng.choice(systems) if rng.random() < 0.8 else []) + suffix
        prompt = prompt[: max_model_len - 1]
        prompts.append(prompt)
        max_tokens.append(rng.randrange(1, max_model_len - len(prompt) + 1))
        arrivals.append(rng.randrange(0, 12))
    return prompts, max_tokens, arrivals


MAX_MODEL_LEN = 32
ROOMY = dict(
    num_pages=512,
    page_size=4,
    max_num_seqs=64,
    max_num_batched_tokens=4096,
    max_model_len=MAX_MODEL_LEN,
    enable_prefix_caching=False,
)


@pytest.mark.parametrize(
    "config, expect_preemption, expect_hits",
    [
        # Smallest legal pool: 31 positions need 8 pages of 4, plus the null page.
        (dict(num_pages=9, max_num_batched_tokens=16, enable_prefix_caching=False), True, False),
        (dict(num_pages=9, max_num_batched_tokens=16, enable_prefix_caching=True), True, True),
        (
            dict(
                num_pages=64,
                max_num_batched_tokens=7,
                long_prefill_chunk=3,
                enable_prefix_caching=True,
            ),
            False,
            True,
        ),
        (
            dict(
                num_pages=12, max_num_seqs=3, max_num_batched_tokens=5, enable_prefix_caching=True
            ),
            True,
            True,
        ),
        (
            dict(num_pages=33, page_size=1, max_num_batched_tokens=9, enable_prefix_caching=True),
            True,
            True,
        ),
        (
            dict(num_pages=8, page_size=5, max_num_batched_tokens=11, enable_prefix_caching=True),
            True,
            True,
        ),
    ],
)
def test_outputs_match_a_roomy_cache_free_run(config, expect_preemption, expect_hits):
    prompts, max_tokens, arrivals = make_workload(seed=1, n=16, max_model_len=MAX_MODEL_LEN)
    reference, _, _ = run_engine(prompts, max_tokens, arrivals, **ROOMY)
    got, sched, preemptions = run_engine(prompts, max_tokens, arrivals, **{**ROOMY, **config})
    assert got == reference
    assert len(got) == len(prompts)
    assert any(reason == "stop" for _, reason in got.values())
    assert any(reason == "length" for _, reason in got.values())
    # The cases must exercise what they are here for, or the equality proves little.
    assert (preemptions > 0) == expect_preemption
    assert (sched.prefix_hit_rate() > 0) == expect_hits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    page_size=st.integers(1, 5),
    extra_pages=st.integers(0, 6),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 20),
    caching=st.booleans(),
    chunk=st.none() | st.integers(1, 6),
)
def test_random_configs_match_the_roomy_run(
    seed, page_size, extra_pages, max_num_seqs, budget, caching, chunk
):
    max_model_len = 20
    prompts, max_tokens, arrivals = make_workload(seed, n=8, max_model_len=max_model_len)
    roomy = {**ROOMY, "max_model_len": max_model_len}
    reference, _, _ = run_engine(prompts, max_tokens, arrivals, **roomy)
    got, _, _ = run_engine(
        prompts,
        max_tokens,
        arrivals,
        num_pages=-(-(max_model_len - 1) // page_size) + 1 + extra_pages,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_prefix_caching=caching,
        long_prefill_chunk=chunk,
    )
    assert got == reference


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps (with random tokens, stops, errors), and aborts."""

    @initialize(
        page_size=st.integers(1, 4),
        extra_pages=st.integers(0, 5),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(1, 12),
        caching=st.booleans(),
        chunk=st.none() | st.integers(1, 5),
    )
    def setup(self, page_size, extra_pages, max_num_seqs, budget, caching, chunk):
        self.max_model_len = 16
        num_pages = -(-(self.max_model_len - 1) // page_size) + 1 + extra_pages
        self.sched = Scheduler(
            num_pages=num_pages,
            page_size=page_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=self.max_model_len,
            enable_prefix_caching=caching,
            long_prefill_chunk=chunk,
        )
        self.device = FakeDevice(num_pages, page_size)
        self.ids: list[str] = []
        self.finished: dict[str, Request] = {}

    @rule(
        prompt=st.lists(st.integers(1, 3), min_size=1, max_size=12),
        max_tokens=st.integers(1, 6),
    )
    def add(self, prompt, max_tokens):
        max_tokens = min(max_tokens, self.max_model_len - len(prompt))
        rid = f"r{len(self.ids)}"
        self.ids.append(rid)
        self.sched.add_request(Request(rid, prompt, max_tokens=max_tokens))

    @rule(seed=st.integers(0, 2**32 - 1))
    def step(self, seed):
        self._step(random.Random(seed))

    def _step(self, rng: random.Random) -> None:
        out = self.sched.schedule()
        check_step_shape(self.sched, out)
        self.device.step(out)
        sampled, finished = {}, {}
        for sr in out.scheduled:
            if sr.sample:
                # Several tokens at once, as speculative decoding will report.
                sampled[sr.request_id] = [rng.randrange(4) for _ in range(rng.choice((1, 1, 2)))]
                roll = rng.random()
                if roll < 0.1:
                    finished[sr.request_id] = "stop"
                elif roll < 0.13:
                    finished[sr.request_id] = "error"
        for r in self.sched.update(out, sampled, finished):
            assert r.is_finished and not r.block_table
            self.finished[r.request_id] = r

    @rule(k=st.integers(0, 1000))
    def abort(self, k):
        rid = self.ids[k % len(self.ids)] if self.ids else "unknown"
        live = self.sched.get_request(rid) is not None
        assert self.sched.abort(rid) == live
        for r in self.sched.pop_finished():
            assert r.status is RequestStatus.FINISHED_ABORTED
            self.finished[r.request_id] = r

    @invariant()
    def pages_are_owned_exactly(self):
        if hasattr(self, "sched"):
            self.sched.check_invariants()

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        rng = random.Random(0)
        for _ in range(2000):
            if not self.sched.has_unfinished():
                break
            self._step(rng)
            self.sched.check_invariants()
        assert not self.sched.has_unfinished(), "requests left hanging"
        assert not self.sched.pop_finished(), "nothing can fail without outside page holders"
        assert set(self.finished) == set(self.ids)
        alloc = self.sched.allocator
        assert alloc.num_free() == alloc.num_pages - 1, "pages leaked"
        assert all(alloc.refcount(p) == 0 for p in range(alloc.num_pages))


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
