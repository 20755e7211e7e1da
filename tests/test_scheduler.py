"""Scheduler policy, one behaviour per test: budget, order, chunking, preemption, prefix reuse."""

from __future__ import annotations

import ast
import pathlib

import pytest

import jax_infer.scheduler as scheduler_pkg
from jax_infer.scheduler import Request, RequestStatus, Scheduler, SchedulerOutput


def make(**overrides) -> Scheduler:
    kwargs = dict(
        num_pages=64,
        page_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        max_model_len=64,
    )
    kwargs.update(overrides)
    return Scheduler(**kwargs)


def req(rid: str, n: int = 6, max_tokens: int = 4, first: int = 100) -> Request:
    return Request(rid, list(range(first, first + n)), max_tokens=max_tokens)


def step(
    sched: Scheduler, token: int = 7, finished: dict[str, str] | None = None
) -> tuple[SchedulerOutput, list[Request]]:
    """One engine step that samples `token` for every request that samples."""
    out = sched.schedule()
    sampled = {sr.request_id: [token] for sr in out.scheduled if sr.sample}
    done = sched.update(out, sampled, finished)
    sched.check_invariants()
    return out, done


def chunks(out: SchedulerOutput) -> dict[str, tuple[int, int]]:
    return {sr.request_id: (sr.start, len(sr.token_ids)) for sr in out.scheduled}


# ---- construction and admission ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_pages": 1}, "num_pages must be an int >= 2, got 1"),
        ({"page_size": 0}, "page_size must be an int >= 1, got 0"),
        ({"max_num_seqs": 0}, "max_num_seqs must be an int >= 1, got 0"),
        ({"max_num_batched_tokens": -3}, "max_num_batched_tokens must be an int >= 1, got -3"),
        ({"max_model_len": 1}, "max_model_len must be an int >= 2, got 1"),
        ({"long_prefill_chunk": 0}, "long_prefill_chunk must be an int >= 1, got 0"),
        ({"max_num_seqs": 2.5}, "max_num_seqs must be an int >= 1, got 2.5"),
        (
            {"num_pages": 16, "max_model_len": 64},
            r"max_model_len=64 .* needs 16 pages .* num_pages=16",
        ),
    ],
)
def test_constructor_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(**overrides)


def test_pool_exactly_big_enough_for_max_model_len():
    # 64 tokens write K/V for 63 positions: 16 pages of 4, plus the null page.
    make(num_pages=17, max_model_len=64)


def test_add_request_rejects_with_the_values():
    sched = make(max_model_len=20)
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        sched.add_request(Request("a", [], max_tokens=4))
    with pytest.raises(
        ValueError, match=r"prompt of 21 tokens \+ max_tokens=1 = 22 exceeds max_model_len=20"
    ):
        sched.add_request(req("b", n=21, max_tokens=1))
    with pytest.raises(
        ValueError, match=r"prompt of 10 tokens \+ max_tokens=11 = 21 exceeds max_model_len=20"
    ):
        sched.add_request(req("c", n=10, max_tokens=11))
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got 0"):
        sched.add_request(req("d", max_tokens=0))
    sched.add_request(req("e"))
    with pytest.raises(ValueError, match="'e' is already queued"):
        sched.add_request(req("e"))
    assert sched.num_waiting() == 1
    sched.check_invariants()


def test_add_request_rejects_a_used_request():
    sched = make()
    r = req("a")
    r.output_token_ids.append(3)
    with pytest.raises(ValueError, match="must be fresh"):
        sched.add_request(r)


def test_scheduler_imports_no_array_library():
    root = pathlib.Path(scheduler_pkg.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"jax", "jaxlib", "numpy"}, f"{path.name}: {name}"


# ---- one step --------------------------------------------------------------------------


def test_token_budget_is_respected_every_step():
    sched = make(max_num_batched_tokens=10)
    for i in range(5):
        sched.add_request(req(f"r{i}", n=7, max_tokens=3))
    while sched.has_unfinished():
        out, _ = step(sched)
        assert out.num_batched_tokens == sum(len(sr.token_ids) for sr in out.scheduled)
        assert 0 < out.num_batched_tokens <= 10


def test_chunked_prefill_splits_a_long_prompt_and_samples_at_the_end():
    sched = make(max_num_batched_tokens=4)
    r = req("a", n=10, max_tokens=2)
    sched.add_request(r)
    seen = []
    for _ in range(3):
        out, _ = step(sched)
        (sr,) = out.scheduled
        assert sr.token_ids == r.prompt_token_ids[sr.start : sr.end]
        assert len(sr.block_table) * 4 >= sr.end
        seen.append((sr.start, len(sr.token_ids), sr.sample))
    assert seen == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert r.output_token_ids == [7] and r.num_computed_tokens == 10
    out, done = step(sched)
    assert chunks(out) == {"a": (10, 1)} and out.scheduled[0].token_ids == [7]
    assert out.scheduled[0].sample and done == [r]


def test_long_prefill_chunk_caps_each_chunk():
    sched = make(max_num_batched_tokens=32, long_prefill_chunk=3)
    sched.add_request(req("a", n=7))
    sched.add_request(req("b", n=2))
    out, _ = step(sched)
    assert chunks(out) == {"a": (0, 3), "b": (0, 2)}


def test_decodes_come_first_then_chunks():
    sched = make(max_num_batched_tokens=8)
    sched.add_request(req("a", n=3))
    sched.add_request(req("b", n=10))
    out, _ = step(sched)
    assert chunks(out) == {"a": (0, 3), "b": (0, 5)}
    sched.add_request(req("c", n=4))
    out, _ = step(sched)
    got = [(sr.request_id, sr.start, len(sr.token_ids), sr.is_new) for sr in out.scheduled]
    assert got == [("a", 3, 1, False), ("b", 5, 5, False), ("c", 0, 2, True)]
    assert out.num_decodes == 1


def test_first_come_first_served_without_skipping():
    # 8 usable pages of 4 tokens.
    sched = make(num_pages=9, max_model_len=32, max_num_batched_tokens=64)
    sched.add_request(req("big", n=26, max_tokens=4))  # 7 pages
    sched.add_request(req("huge", n=20, max_tokens=4))  # 5 pages: does not fit beside big
    sched.add_request(req("tiny", n=2, max_tokens=1))  # would fit, but must not jump ahead
    out, _ = step(sched)
    assert list(chunks(out)) == ["big"]
    assert [r.request_id for r in sched._waiting] == ["huge", "tiny"]


def test_max_num_seqs_limits_running_requests():
    sched = make(max_num_seqs=2)
    for i in range(3):
        sched.add_request(req(f"r{i}", n=2))
    out, _ = step(sched)
    assert list(chunks(out)) == ["r0", "r1"] and sched.num_running() == 2
    assert sched.num_waiting() == 1


# ---- finishing -------------------------------------------------------------------------


def test_length_and_stop_finish_and_free_pages():
    sched = make()
    a, b = req("a", max_tokens=2), req("b", max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.kv_usage() > 0
    _, done = step(sched, finished={"b": "stop"})
    assert done == [a, b]
    assert a.status is RequestStatus.FINISHED_LENGTH and a.finish_reason == "length"
    assert b.status is RequestStatus.FINISHED_STOPPED and b.output_token_ids == [7, 7]
    assert a.output_token_ids == [7, 7] and not a.block_table
    assert not sched.has_unfinished() and sched.kv_usage() == 0.0
    assert sched.allocator.num_free() == sched.allocator.num_pages - 1


def test_sampled_tokens_past_max_tokens_are_dropped():
    sched = make()
    r = req("a", max_tokens=2)
    sched.add_request(r)
    out = sched.schedule()
    (done,) = sched.update(out, {"a": [1, 2, 3]})
    assert done is r and r.output_token_ids == [1, 2]


def test_update_validates_before_changing_anything():
    sched = make()
    sched.add_request(req("a"))
    sched.add_request(req("b", n=60))
    sched.update(sched.schedule(), {"a": [1]})  # b needs a second chunk
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="before update"):
        sched.schedule()
    with pytest.raises(ValueError, match="'a' was scheduled to sample but got no token"):
        sched.update(out, {})
    with pytest.raises(ValueError, match="not scheduled to sample"):
        sched.update(out, {"a": [1], "b": [2]})
    with pytest.raises(ValueError, match=r"finished\['a'\] = 'done'; allowed"):
        sched.update(out, {"a": [1]}, {"a": "done"})
    with pytest.raises(ValueError, match="unknown request 'zz'"):
        sched.update(out, {"a": [1]}, {"zz": "stop"})
    sched.check_invariants()
    sched.update(out, {"a": [1]})
    with pytest.raises(ValueError, match="latest schedule"):
        sched.update(out, {"a": [1]})
    sched.check_invariants()


def test_engine_error_finishes_with_a_message():
    sched = make()
    r = req("a")
    sched.add_request(r)
    out = sched.schedule()
    (done,) = sched.update(out, {}, {"a": "error"})
    assert done.status is RequestStatus.FINISHED_ERROR and "engine" in done.error


def test_a_failed_step_publishes_nothing_to_the_prefix_cache():
    """A request failed in a step ("error") advances nothing: the pages it was computing hold
    no trusted K/V, so a later request with the same prompt finds no cached prefix."""
    sched = make()
    sched.add_request(req("a", n=10))
    out = sched.schedule()
    (done,) = sched.update(out, {}, {"a": "error"})
    assert done.num_computed_tokens == 0 and sched.allocator.num_cached() == 0
    sched.check_invariants()
    sched.add_request(req("b", n=10))
    out, _ = step(sched)
    assert chunks(out) == {"b": (0, 10)}


def test_preempt_all_requeues_everything_and_drops_the_prefix_cache():
    sched = make(max_num_batched_tokens=64)
    reqs = [req(f"r{i}", n=9, first=10 * i) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    sched.add_request(req("w", n=5, first=90))
    step(sched)
    step(sched)
    assert sched.num_running() == 4 and sched.allocator.num_cached() > 0
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="between schedule"):
        sched.preempt_all()
    sched.update(out, {sr.request_id: [1] for sr in out.scheduled if sr.sample})
    assert sched.preempt_all() == ["w", "r2", "r1", "r0"]
    sched.check_invariants()
    assert sched.num_running() == 0 and sched.num_waiting() == 4
    assert sched.allocator.num_used() == 0 and sched.allocator.num_cached() == 0
    assert sched.allocator.num_free() == sched.allocator.num_pages - 1
    assert all(r.status is RequestStatus.PREEMPTED and r.num_preemptions == 1 for r in reqs)
    out, _ = step(sched)  # everything recomputes from position 0, oldest first
    assert [(sr.request_id, sr.start) for sr in out.scheduled][:3] == [
        ("r0", 0),
        ("r1", 0),
        ("r2", 0),
    ]
    while sched.has_unfinished():
        step(sched)
    assert sched.allocator.num_used() == 0


# ---- abort -------------------------------------------------------------------------------


def test_abort_frees_pages_in_every_state():
    sched = make(num_pages=9, max_model_len=32, max_num_seqs=1)
    running, waiting = req("run", n=9), req("wait")
    sched.add_request(running)
    sched.add_request(waiting)
    step(sched)
    assert sched.allocator.num_used() == 3
    assert sched.abort("run") and running.status is RequestStatus.FINISHED_ABORTED
    assert sched.allocator.num_used() == 0 and not running.block_table
    assert sched.abort("wait") and not sched.abort("wait") and not sched.abort("nope")
    out = sched.schedule()
    assert out.scheduled == [] and out.finished_aborted == ["run", "wait"]
    assert sched.pop_finished() == [running, waiting] and sched.pop_finished() == []
    assert sched.schedule().finished_aborted == []
    sched.check_invariants()


def test_abort_between_schedule_and_update():
    sched = make()
    a, b = req("a"), req("b")
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert sched.abort("a")
    done = sched.update(out, {"a": [1], "b": [2]})
    assert done == [] and a.output_token_ids == [] and b.output_token_ids == [2]
    out, _ = step(sched)
    assert list(chunks(out)) == ["b"]


# ---- preemption ----------------------------------------------------------------------------


def test_preemption_picks_the_most_recently_admitted_and_recomputes_it():
    # 6 usable pages of 4 tokens; three requests of 7 prompt tokens take 2 pages each.
    sched = make(num_pages=7, max_model_len=24, max_num_batched_tokens=64)
    reqs = [req(f"r{i}", n=7, max_tokens=8, first=10 * i) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    step(sched, token=1)  # prompts computed, pool full
    out, _ = step(sched, token=2)  # each decode writes position 7 into its 2nd page: fits
    assert out.preempted == []
    last = reqs[2]
    before = last.all_token_ids
    out, _ = step(sched, token=3)  # position 8 needs a 3rd page each: r2 must give way
    assert out.preempted == ["r2"]
    assert list(chunks(out)) == ["r0", "r1"]
    assert last.status is RequestStatus.PREEMPTED and last.num_preemptions == 1
    assert last.num_computed_tokens == 0 and not last.block_table
    assert last.all_token_ids == before, "outputs are kept for recomputation"
    assert sched._waiting[0] is last
    while last.status is not RequestStatus.RUNNING:
        out, _ = step(sched, token=4)
    sr = next(s for s in out.scheduled if s.request is last)
    assert sr.is_new and sr.start == 0 and sr.token_ids == before and sr.sample


def test_a_running_request_preempts_itself_when_it_is_the_most_recent():
    # 4 usable pages of 4 tokens.
    sched = make(num_pages=5, max_model_len=16, max_num_batched_tokens=64)
    a, b = req("a", n=4, max_tokens=8), req("b", n=8, max_tokens=4, first=50)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: 1 page, b: 2 pages; 1 page left
    out, _ = step(sched)  # a takes the last page for position 4; b needs one for position 8
    assert out.preempted == ["b"] and list(chunks(out)) == ["a"]
    assert b.status is RequestStatus.PREEMPTED and a.num_preemptions == 0


def test_nothing_is_admitted_in_a_step_that_preempted():
    # 6 usable pages of 4 tokens; c's prompt arrives in chunks of 4 and fills the pool.
    sched = make(num_pages=7, max_model_len=24, enable_prefix_caching=False, long_prefill_chunk=4)
    a, c = req("a", n=4, max_tokens=10), req("c", n=16, max_tokens=2, first=50)
    sched.add_request(a)
    sched.add_request(c)
    for _ in range(4):
        step(sched)
    assert sched.allocator.num_free() == 0 and c.num_computed_tokens == 16
    out, _ = step(sched)  # c needs a 7th page for position 16 and preempts itself
    assert out.preempted == ["c"]
    assert list(chunks(out)) == ["a"], "c would fit a 4-token chunk now, but the pool is tight"
    out, _ = step(sched)
    assert chunks(out) == {"a": (8, 1), "c": (0, 4)}


def test_request_that_can_never_fit_errors_instead_of_hanging():
    sched = make(num_pages=9, max_model_len=32)
    held = sched.allocator.allocate(6)  # pages lost to something outside the scheduler
    r = req("a", n=12)
    sched.add_request(r)
    out = sched.schedule()
    assert out.scheduled == [] and out.finished_error == ["a"]
    assert r.status is RequestStatus.FINISHED_ERROR and "needs pages for 12 tokens" in r.error
    assert sched.pop_finished() == [r] and not sched.has_unfinished()
    sched.allocator.free(held)
    sched.check_invariants()


# ---- prefix caching --------------------------------------------------------------------------


def cached_pages(sched: Scheduler, r: Request) -> list[int]:
    """The pages cached for the first two pages of `r`."""
    return sched.allocator.match(r.block_hashes[:2])


def test_prefix_hit_skips_cached_pages_and_leaves_a_token_to_compute():
    sched = make()
    first = req("a", n=10, max_tokens=1)
    sched.add_request(first)
    _, done = step(sched)
    assert done == [first]
    assert sched.allocator.num_cached() == 2, "two full pages of the prompt are cached"

    second = req("b", n=10, max_tokens=1)
    sched.add_request(second)
    out, _ = step(sched)
    assert chunks(out) == {"b": (8, 2)} and second.num_cached_tokens == 8
    assert out.scheduled[0].block_table[:2] == cached_pages(sched, first)

    aligned = req("c", n=8, max_tokens=1)  # every page cached: the last is recomputed
    sched.add_request(aligned)
    out, _ = step(sched)
    assert chunks(out) == {"c": (4, 4)} and aligned.num_cached_tokens == 4
    assert sched.prefix_hit_rate() == pytest.approx((0 + 8 + 4) / (10 + 10 + 8))


def test_a_finished_request_loses_its_tail_pages_first():
    # 3 usable pages of 4 tokens.
    sched = make(num_pages=4, max_model_len=13)
    sched.add_request(req("a", n=12, max_tokens=1))
    step(sched)
    assert sched.allocator.num_cached() == 3
    sched.add_request(req("b", n=3, max_tokens=1, first=50))  # evicts one cached page
    step(sched)
    sched.add_request(req("c", n=12, max_tokens=1))
    out, _ = step(sched)
    assert chunks(out) == {"c": (8, 4)}, "the first two pages of the prompt survive"


def test_prefix_pages_are_shared_between_running_requests():
    sched = make(max_num_batched_tokens=64)
    sched.add_request(req("a", n=9, max_tokens=8))
    step(sched)
    sched.add_request(req("b", n=9, max_tokens=8))
    out, _ = step(sched)
    b = sched.get_request("b")
    a = sched.get_request("a")
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert all(sched.allocator.refcount(p) == 2 for p in a.block_table[:2])
    assert chunks(out)["b"] == (8, 1)


def test_preempted_request_reuses_its_own_cached_pages():
    # 6 usable pages of 4 tokens.
    sched = make(num_pages=7, max_model_len=24, max_num_batched_tokens=64)
    a, b = req("a", n=4, max_tokens=2), req("b", n=18, max_tokens=2, first=50)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: 1 page, b: 5 pages (4 full and cached, 1 partial)
    out, done = step(sched)  # a needs a page for position 4: b goes, a finishes
    assert out.preempted == ["b"] and done == [a]
    out, _ = step(sched)
    (sr,) = out.scheduled
    assert sr.request is b and sr.is_new
    assert sr.start == 16, "its full pages stay cached: only the partial page is recomputed"
    assert sr.token_ids == b.all_token_ids[16:19] and sr.sample
    assert b.num_cached_tokens == 0, "num_cached_tokens reports the first admission"


def test_prefix_caching_disabled_recomputes_everything():
    sched = make(enable_prefix_caching=False)
    sched.add_request(req("a", n=10, max_tokens=1))
    step(sched)
    sched.add_request(req("b", n=10, max_tokens=1))
    out, _ = step(sched)
    assert chunks(out) == {"b": (0, 10)} and sched.prefix_hit_rate() == 0.0
