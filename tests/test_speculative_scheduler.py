"""Speculative decoding in the scheduler, without a model: decodes reserve page slots for
draft tokens, the fake device writes and verifies them, and only accepted drafts advance
num_computed_tokens. Outputs must equal the roomy, non-speculative run's, and no page may be
lost or shared wrongly, under preemption, prefix caching and random configurations."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_infer.scheduler import Request, Scheduler
from tests.test_scheduler_property import (
    EOS,
    MAX_MODEL_LEN,
    ROOMY,
    VOCAB,
    make_workload,
    next_token,
    run_engine,
)


def spec_step(pool, out, drafts, page_size):
    """Write each row's tokens plus its drafts, then verify the drafts against the fake model
    reading the cache back: returns {request id: accepted drafts + one corrected/bonus token}."""
    sampled = {}
    for sr in out.scheduled:
        toks = sr.token_ids + drafts.get(sr.request_id, [])[: sr.num_lookahead]
        assert len(sr.block_table) * page_size >= sr.start + len(toks), "table too short"
        for k, tok in enumerate(toks):
            pos = sr.start + k
            pool[sr.block_table[pos // page_size]][pos % page_size] = tok
    for sr in out.scheduled:
        if not sr.sample:
            continue
        n = len(sr.token_ids) + len(drafts.get(sr.request_id, [])[: sr.num_lookahead])
        seq = [pool[sr.block_table[p // page_size]][p % page_size] for p in range(sr.start + n)]
        known = sr.request.all_token_ids
        assert seq[: len(known)] == known, f"{sr.request_id}: stale cache"
        new = []
        for j in range(sr.end, sr.start + n + 1):
            tok = next_token(seq[:j])
            new.append(tok)
            if j == sr.start + n or seq[j] != tok or tok == EOS:
                break
        sampled[sr.request_id] = new
    return sampled


def run_spec_engine(prompts, max_tokens, arrivals, k, seed, **config):
    """Like run_engine, with drafts that are right with probability 1/2 per token."""
    rng = random.Random(seed)
    sched = Scheduler(**config)
    size = config["page_size"]
    pool = [[None] * size for _ in range(config["num_pages"])]
    pending = sorted(range(len(prompts)), key=arrivals.__getitem__)
    results, step, accepted_any = {}, 0, False
    while pending or sched.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            sched.add_request(Request(f"r{i}", prompts[i], max_tokens=max_tokens[i]))
        running = [sched.get_request(f"r{i}") for i in range(len(prompts))]
        want = {r.request_id: rng.randrange(k + 1) for r in running if r is not None}
        out = sched.schedule(lookahead=want)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        drafts = {}
        for sr in out.scheduled:
            assert sr.num_lookahead <= want.get(sr.request_id, 0)
            if sr.num_lookahead:
                assert len(sr.token_ids) == 1 and sr.sample
                seq, d = list(sr.request.all_token_ids), []
                for _ in range(sr.num_lookahead):
                    tok = next_token(seq) if rng.random() < 0.5 else rng.randrange(VOCAB)
                    d.append(tok)
                    seq.append(tok)
                drafts[sr.request_id] = d
        sampled = spec_step(pool, out, drafts, size)
        accepted_any |= any(len(v) > 1 for v in sampled.values())
        finished = {rid: "stop" for rid, toks in sampled.items() if EOS in toks}
        for rid in finished:
            sampled[rid] = sampled[rid][: sampled[rid].index(EOS) + 1]
        for r in sched.update(out, sampled, finished):
            results[r.request_id] = (tuple(r.output_token_ids), r.finish_reason)
        sched.check_invariants()
        step += 1
        assert step < 5000
    assert sched.allocator.num_free() == config["num_pages"] - 1, "pages leaked"
    return results, accepted_any


@pytest.mark.parametrize(
    "config",
    [
        dict(num_pages=9, max_num_batched_tokens=16, enable_prefix_caching=True),
        dict(num_pages=12, max_num_seqs=3, max_num_batched_tokens=5, enable_prefix_caching=True),
        dict(num_pages=33, page_size=1, max_num_batched_tokens=9, enable_prefix_caching=True),
        dict(num_pages=64, max_num_batched_tokens=64, enable_prefix_caching=False),
    ],
)
def test_speculative_outputs_match_the_roomy_run(config):
    prompts, max_tokens, arrivals = make_workload(seed=1, n=16, max_model_len=MAX_MODEL_LEN)
    reference, _, _ = run_engine(prompts, max_tokens, arrivals, **ROOMY)
    got, accepted_any = run_spec_engine(
        prompts, max_tokens, arrivals, k=4, seed=0, **{**ROOMY, **config}
    )
    assert got == reference
    assert accepted_any, "no draft was ever accepted: the case proves little"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    page_size=st.integers(1, 5),
    extra_pages=st.integers(0, 6),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 20),
    caching=st.booleans(),
    k=st.integers(1, 5),
)
def test_speculative_random_configs(seed, page_size, extra_pages, max_num_seqs, budget, caching, k):
    max_model_len = 20
    prompts, max_tokens, arrivals = make_workload(seed, n=8, max_model_len=max_model_len)
    reference, _, _ = run_engine(
        prompts, max_tokens, arrivals, **{**ROOMY, "max_model_len": max_model_len}
    )
    got, _ = run_spec_engine(
        prompts,
        max_tokens,
        arrivals,
        k=k,
        seed=seed,
        num_pages=-(-(max_model_len - 1) // page_size) + 1 + extra_pages,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_prefix_caching=caching,
    )
    assert got == reference


def test_ngram_lookup_prefers_long_and_recent_matches():
    from jax_infer.speculative import lookup

    seq = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    # The 3-gram [1, 2, 3] occurred at 0 (followed by 9 9 5 ...); the latest 2-gram [2, 3] at
    # 6 is shorter, so the 3-gram wins.
    assert lookup(seq, 3, max_n=3, min_n=1) == [9, 9, 5]
    # With 2-grams at most, the latest [2, 3] (at 6) is used.
    assert lookup(seq, 3, max_n=2, min_n=1) == [7, 8, 1]
    assert lookup(seq, 3, max_n=4, min_n=4) == []  # no earlier 4-gram [3, 1, 2, 3]
    assert lookup([5, 6, 5], 4, max_n=2, min_n=1) == [6, 5]  # stops at the end
    assert lookup([4], 2, max_n=3, min_n=1) == []


def brute_force_draft(seq, k, max_n, min_n):
    """What NgramProposer must propose, written out with lists: the longest n in
    [min_n, max_n] whose suffix occurred earlier (with a token after it), then up to
    min(k, 2**n) tokens, each the most common next token among the occurrences that still
    agree (ties: the latest such occurrence)."""
    size = len(seq)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = seq[size - n :]
        alive = [i + n for i in range(size - n) if seq[i : i + n] == suffix]
        if alive:
            break
    else:
        return []
    out = []
    for j in range(min(k, 2**n)):
        alive = [a for a in alive if a + j < size]
        if not alive:
            break
        counts = {}
        for a in alive:
            counts[seq[a + j]] = counts.get(seq[a + j], 0) + 1
        best = max(counts.values())
        token = [seq[a + j] for a in alive if counts[seq[a + j]] == best][-1]
        out.append(token)
        alive = [a for a in alive if seq[a + j] == token]
    return out


@settings(max_examples=300, deadline=None)
@given(
    seq=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    k=st.integers(1, 16),
    max_n=st.integers(1, 5),
    data=st.data(),
)
def test_ngram_proposer_matches_brute_force(seq, k, max_n, data):
    from jax_infer.speculative import NgramProposer
    from jax_infer.speculative.proposers import DraftRow

    min_n = data.draw(st.integers(1, max_n))
    row = DraftRow("r", list(seq), k, [], None, 0, 0)
    got = NgramProposer(max_n, min_n).propose([row])[0][0].token_ids
    assert got == brute_force_draft(list(seq), k, max_n, min_n)


def test_ngram_draft_length_grows_with_the_match():
    """One matched token earns 2 drafts, two earn 4, three 8, four the whole k; the
    continuation is the one most earlier occurrences share."""
    from jax_infer.speculative import NgramProposer
    from jax_infer.speculative.proposers import DraftRow

    text = list(range(10, 40))  # 30 distinct tokens, then their copy resumed at various points
    prop = NgramProposer(max_n=4, min_n=1)
    for n, want in [(1, 2), (2, 4), (3, 8), (4, 12)]:
        seq = text + [99] * (5 - n) + text[:n]  # the last n tokens match text[:n] only
        row = DraftRow("r", seq, 12, [], None, 0, 0)
        assert prop.propose([row])[0][0].token_ids == text[n : n + want], n
    # Token 5 was followed by 6 twice and by 7 once (the latest): the majority wins.
    seq = [5, 6, 1, 5, 6, 2, 5, 7, 3, 5]
    assert prop.propose([DraftRow("r", seq, 12, [], None, 0, 0)])[0][0].token_ids == [6, 2]
