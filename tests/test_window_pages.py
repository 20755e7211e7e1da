"""Sliding-window page groups: windowed layers keep only the pages their window still reaches.

Scheduler level (no model): a fake device stores token ids in one pool per page group and
every query reads its window back through its group's block table, so a page freed too early
(or reused while still needed, or a wrong prefix-cache hit) shows as a null or stale read;
the pages a windowed group holds stay within its window; nothing leaks or is freed twice.

Engine level: greedy outputs of tiny hybrid models (Qwen2 with one full and one sliding layer,
Mistral with every layer sliding) through the paged engine with page freeing, chunked prefill,
forced preemption and prefix caching, equal to HF transformers' greedy `generate`.
"""

from __future__ import annotations

import functools
import random
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch

from jax_infer import SamplingParams
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.model.cache import init_paged_cache, kv_bytes_per_page_group, page_group_windows
from jax_infer.scheduler import Request, Scheduler
from jax_infer.scheduler.page_groups import request_pages, split_page_budget, steady_pages
from jax_infer.tokenizer import Tokenizer
from jax_infer.weights import load_hf
from tests.test_scheduler_property import VOCAB, next_token
from tests.tiny_models import make_hf_model

PAGE = 4


def _cdiv(a, b):
    return -(-a // b)


class GroupDevice:
    """Token ids in place of K/V, one pool per page group. step() writes each row's tokens
    through every group's table, then reads each query's window back: a full group all
    positions up to the query, a windowed group the last W."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.pools = [
            [[None] * sched.page_size for _ in range(a.num_pages)] for a in sched.allocators
        ]

    def step(self, out, drafts=None):
        size = self.sched.page_size
        drafts = drafts or {}
        for sr in out.scheduled:
            toks = sr.token_ids + drafts.get(sr.request_id, [])[: sr.num_lookahead]
            for g, table in enumerate(sr.block_tables):
                for k, tok in enumerate(toks):
                    pos = sr.start + k
                    assert table[pos // size] != 0, f"{sr.request_id}: writes the null page"
                    self.pools[g][table[pos // size]][pos % size] = tok
        sampled = {}
        for sr in out.scheduled:
            toks = sr.token_ids + drafts.get(sr.request_id, [])[: sr.num_lookahead]
            seq = sr.request.token_ids_slice(0, sr.start) + toks
            for q in range(sr.start, sr.start + len(toks)):
                for g, (w, table) in enumerate(zip(self.sched.windows, sr.block_tables)):
                    lo = 0 if w is None else max(0, q - w + 1)
                    for p in range(lo, q + 1):
                        page = table[p // size]
                        assert page != 0, f"{sr.request_id}: group {g} reads a freed page at {p}"
                        got = self.pools[g][page][p % size]
                        assert got == seq[p], f"{sr.request_id}: group {g} stale at {p}"
            if sr.sample:
                # Verify drafts like a greedy target: accept while they equal next_token.
                new = []
                for j in range(sr.end, sr.start + len(toks) + 1):
                    tok = next_token(seq[:j])
                    new.append(tok)
                    if j == sr.start + len(toks) or seq[j] != tok:
                        break
                sampled[sr.request_id] = new
        return sampled


def drive(sched, prompts, max_tokens, *, lookahead=0, seed=0, on_step=None):
    """Run requests to the end with the fake device; returns their outputs."""
    rng = random.Random(seed)
    dev = GroupDevice(sched)
    reqs = [Request(f"r{i}", p, max_tokens=m) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished():
        want = {r.request_id: lookahead for r in reqs if not r.is_finished} if lookahead else None
        out = sched.schedule(want)
        drafts = {}
        for sr in out.scheduled:
            if sr.num_lookahead:
                seq, d = list(sr.request.all_token_ids), []
                for _ in range(sr.num_lookahead):
                    tok = next_token(seq) if rng.random() < 0.6 else rng.randrange(VOCAB)
                    d.append(tok)
                    seq.append(tok)
                drafts[sr.request_id] = d
        sched.update(out, dev.step(out, drafts))
        sched.check_invariants()
        if on_step is not None:
            on_step(sched, out)
    for alloc in sched.allocators:
        assert alloc.num_used() == 0, "pages leaked"
        alloc.check_invariants()
    return [r.output_token_ids for r in reqs]


def roomy_outputs(prompts, max_tokens):
    sched = Scheduler(
        num_pages=256, page_size=PAGE, max_num_seqs=8, max_num_batched_tokens=64,
        max_model_len=96, enable_prefix_caching=False,
    )  # fmt: skip
    return drive(sched, prompts, max_tokens)


def workload(seed, n=4, shared=0):
    rng = random.Random(seed)
    head = [rng.randrange(1, VOCAB) for _ in range(shared)]
    prompts = [
        head + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(20, 46))] for _ in range(n)
    ]
    return prompts, [rng.randrange(8, 31) for _ in range(n)]


@pytest.mark.parametrize("windows", [(None, 8), (8,), (None, 5, 12)])
@pytest.mark.parametrize(
    "chunk,num_pages,caching,lookahead",
    [
        (16, 256, False, 0),
        (4, 256, True, 0),
        (16, 30, True, 0),
        (16, 256, True, 3),
        (8, 30, True, 2),
    ],
)
def test_window_groups_read_only_held_pages(windows, chunk, num_pages, caching, lookahead):
    """Every query's window reads its own tokens through pages still held (never the null
    page, never a reused one), under chunked prefill, preemption (24 pages: a few requests),
    prefix caching of shared prefixes and speculative drafts; outputs equal a roomy run's."""
    max_len = 96
    prompts, max_tokens = workload(seed=len(windows) * 10 + chunk, shared=12)
    sched = Scheduler(
        num_pages=num_pages, page_size=PAGE, max_num_seqs=4, max_num_batched_tokens=chunk + 4,
        max_model_len=max_len, enable_prefix_caching=caching, long_prefill_chunk=chunk,
        windows=windows,
    )  # fmt: skip
    peak = [0] * len(windows)
    preempted = []

    def count(s, out):
        preempted.extend(out.preempted)
        for req in s._running:
            for g, table in enumerate(req.block_tables):
                peak[g] = max(peak[g], sum(p != 0 for p in table))

    got = drive(sched, prompts, max_tokens, lookahead=lookahead, on_step=count)
    assert got == roomy_outputs(prompts, max_tokens)
    for g, w in enumerate(windows):
        bound = request_pages(max_len, PAGE, w, chunk + 4)
        assert peak[g] <= bound, f"group {g} (window {w}) held {peak[g]} pages > {bound}"
    if windows[0] is None:
        # Counted between steps, when the last token (written in the final step) is not yet.
        longest = max(_cdiv(len(p) + m - 1, PAGE) for p, m in zip(prompts, max_tokens))
        assert longest - 1 <= peak[0] <= longest
    if num_pages == 30 and windows[0] is None:
        assert preempted, "the small pool never preempted"
    if caching:
        assert sched.allocator.stats.hit_tokens > 0, "the shared prefix never hit"


def test_decode_holds_window_pages_only():
    """A long decode holds cdiv(W, L) + 1 pages at most in its windowed group (all in the full
    group), and frees each page once: pages freed during the run + at the end = pages taken."""
    sched = Scheduler(
        num_pages=64, page_size=PAGE, max_num_seqs=1, max_num_batched_tokens=16,
        max_model_len=200, enable_prefix_caching=False, windows=(None, 8),
    )  # fmt: skip
    held = []

    def count(s, out):
        if s._running:
            held.append([sum(p != 0 for p in t) for t in s._running[0].block_tables])

    drive(sched, [list(range(1, 11)) * 6], [100], on_step=count)
    decode = held[-80:]
    assert all(h[1] <= steady_pages(200, PAGE, 8) for h in decode), decode
    assert max(h[0] for h in decode) == _cdiv(60 + 100 - 1, PAGE)
    assert sched.allocators[1].num_used() == 0 and sched.allocators[0].num_used() == 0


def test_prefix_hit_needs_the_window_pages():
    """A repeated prompt hits the cache in both groups while its window pages are cached;
    once the windowed group's cached pages are evicted, the hit is none (recomputed), even
    though the full group still has every page."""
    kw = dict(
        num_pages=(40, 40), page_size=PAGE, max_num_seqs=2, max_num_batched_tokens=64,
        max_model_len=128, windows=(None, 8),
    )  # fmt: skip
    sched = Scheduler(**kw)
    prompt = [(7 * i) % (VOCAB - 1) + 1 for i in range(41)]
    drive(sched, [prompt], [3])
    again = Request("b", prompt, max_tokens=3)
    sched.add_request(again)
    sched.update(sched.schedule(), {"b": [1]})
    assert again.num_cached_tokens == 40  # every full page but the one holding the last token
    assert sum(p != 0 for p in again.block_tables[1]) <= steady_pages(128, PAGE, 8) + 1
    sched.abort("b")
    sched.check_invariants()
    # Evict the windowed group's cached pages: allocate every free page there, give them back.
    pages = sched.allocators[1].allocate(sched.allocators[1].num_free())
    sched.allocators[1].free(pages)
    third = Request("c", prompt, max_tokens=3)
    sched.add_request(third)
    sched.update(sched.schedule(), {"c": [1]})
    assert third.num_cached_tokens == 0
    sched.check_invariants()


def test_bad_group_arguments_name_the_parameter():
    base = dict(page_size=4, max_num_seqs=1, max_num_batched_tokens=8, max_model_len=64)
    with pytest.raises(ValueError, match="one int per page group"):
        Scheduler(num_pages=(20,), windows=(None, 8), **base)
    with pytest.raises(ValueError, match=r"windows\[i\]"):
        Scheduler(num_pages=20, windows=(None, 0), **base)
    with pytest.raises(ValueError, match=r"num_pages\[1\] \(window 8\)"):
        Scheduler(num_pages=(20, 3), windows=(None, 8), **base)


def test_budget_split_and_pool_shapes(tmp_path):
    """One byte budget split over the groups: the pools' bytes stay within it, the sliding
    group's pool is smaller; a model without windows keeps one group of budget // page."""
    make_hf_model("qwen2_hybrid_window", tmp_path)
    config, _ = load_hf(str(tmp_path), progress=False)
    groups = page_group_windows(config)
    assert groups == (None, 8) and page_group_windows(config, False) == (None,)
    page_bytes = kv_bytes_per_page_group(config, groups, PAGE)
    budget = 2**20
    counts = split_page_budget(budget, page_bytes, groups, PAGE, 256, 32)
    assert sum(c * b for c, b in zip(counts, page_bytes)) <= budget
    assert counts[1] < counts[0] / 4
    pools = init_paged_cache(config, tuple(counts), PAGE, jnp.float32, groups)
    assert [p[0].shape[0] for p in pools] == counts  # layer 0 full, layer 1 sliding
    one = kv_bytes_per_page_group(config, (None,), PAGE)
    assert split_page_budget(budget, one, (None,), PAGE, 256, 32) == [budget // one[0]]


# == the engine against HF transformers ===================================================


def word_tokenizer(size: int) -> Tokenizer:
    vocab = {f"t{i}": i for i in range(size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(tok)


@functools.cache
def tiny_case(name: str):
    """A tiny HF model, loaded; prompts past the window (two sharing a 24-token head) and
    HF transformers' greedy `generate` for each."""
    path = tempfile.mkdtemp(prefix=name)
    model = make_hf_model(name, path)
    config, params = load_hf(path, progress=False)
    rng = np.random.default_rng(3)
    head = rng.integers(1, config.vocab_size, size=24).tolist()
    prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (60, 37)] + [
        head + rng.integers(1, config.vocab_size, size=n).tolist() for n in (36, 30)
    ]
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        refs.append(out[0, len(p) :].tolist())
    assert all(len(r) == MAX_NEW for r in refs)
    return config, params, prompts, refs


MAX_NEW = 12
CHUNK4 = dict(max_num_batched_tokens=8, long_prefill_chunk=4)
CHUNK16 = dict(max_num_batched_tokens=16)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,name,kwargs",
    [
        ("qwen2_hybrid_window", "chunk4_prefix", CHUNK4),
        # N-gram drafts verified in the step: rejected drafts roll back over freed pages.
        (
            "qwen2_hybrid_window",
            "chunk16_xla_ngram",
            dict(
                CHUNK16,
                attention_backend="xla",
                speculative_method="ngram",
                num_speculative_tokens=3,
            ),
        ),
        # 22 pages: the full group (20 pages for one request) runs out, requests preempt.
        ("qwen2_hybrid_window", "preempt", dict(CHUNK16, num_pages=22)),
        ("mistral_sliding", "chunk16_prefix", CHUNK16),
        # Every layer sliding: its one windowed group of 9 pages is what runs out.
        ("mistral_sliding", "preempt", dict(CHUNK16, num_pages=9, enable_prefix_caching=False)),
    ],
)
def test_engine_greedy_equals_transformers(model, name, kwargs):
    config, params, prompts, refs = tiny_case(model)
    ec = EngineConfig(page_size=PAGE, max_num_seqs=4, **kwargs)
    engine = LLMEngine(
        config, params, word_tokenizer(config.vocab_size), max_model_len=80, engine_config=ec
    )
    assert engine.page_groups == ((None, 8) if model == "qwen2_hybrid_window" else (8,))
    held = []
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=MAX_NEW, temperature=0.0)) for p in prompts
    ]
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk.token_ids
        engine.scheduler.check_invariants()
        for req in engine.scheduler._running:
            held.append(sum(p != 0 for p in req.block_tables[-1]))
    assert [final[i] for i in ids] == refs
    # The sliding group never held more than the window and a chunk reach.
    assert max(held) <= request_pages(80, PAGE, 8, kwargs["max_num_batched_tokens"])
    assert max(held) < _cdiv(60 + MAX_NEW - 1, PAGE)
    for alloc in engine.scheduler.allocators:
        assert alloc.num_used() == 0
    assert (engine.num_preemptions > 0) == (name == "preempt")
    if name.endswith("prefix"):
        assert engine.scheduler.allocator.stats.hit_tokens > 0
    if name.endswith("ngram"):
        assert engine.spec.stats.num_draft_tokens > 0


@pytest.mark.parametrize("backend", ["reference", "xla", "cpu", "pallas"])
def test_backends_read_a_window_group_with_freed_pages(backend):
    """A decode row and a prefill chunk whose sliding-group tables hold the null page where the
    window has passed (the null page full of large values: an unmasked read shows) attend
    exactly as the dense numpy reference over the whole sequence with the window."""
    from jax_infer.attention import build_metadata, paged_attend_fn

    rng = np.random.default_rng(0)
    n, kh, h, size, w = 4, 2, 16, 4, 8
    num_pages = 40
    k_pages = rng.standard_normal((num_pages, size, kh, h)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, size, kh, h)).astype(np.float32)
    k_pages[0] = v_pages[0] = 1e4
    starts, q_lens = [37, 21], [1, 9]
    perm = rng.permutation(np.arange(1, num_pages))
    full = [perm[:10].tolist(), perm[10:18].tolist()]
    tables = []
    for table, start in zip(full, starts):
        lo = max(0, start - w + 1) // size
        tables.append([0] * lo + table[lo:])
    meta, _, offsets = build_metadata(starts, q_lens, tables, size)
    t = meta.positions.shape[0]
    q = rng.standard_normal((1, t, n, h)).astype(np.float32)
    k_new = rng.standard_normal((1, t, kh, h)).astype(np.float32)
    v_new = rng.standard_normal((1, t, kh, h)).astype(np.float32)
    attend = paged_attend_fn(jax.tree.map(jnp.asarray, meta), backend)
    out, (k_after, v_after) = attend(
        jnp.asarray(q),
        jnp.asarray(k_new),
        jnp.asarray(v_new),
        (jnp.asarray(k_pages), jnp.asarray(v_pages)),
        window=w,
    )
    out = np.asarray(out).reshape(t, n, h)
    k_after, v_after = np.asarray(k_after), np.asarray(v_after)
    for table, start, ql, off in zip(full, starts, q_lens, offsets):
        keys = np.concatenate([k_after[p] for p in table])  # [S, K, H]
        vals = np.concatenate([v_after[p] for p in table])
        for i in range(ql):
            pos = start + i
            lo = max(0, pos - w + 1)
            for head in range(n):
                s = keys[lo : pos + 1, head // (n // kh)] @ q[0, off + i, head] / np.sqrt(h)
                p = np.exp(s - s.max())
                ref = (p / p.sum()) @ vals[lo : pos + 1, head // (n // kh)]
                np.testing.assert_allclose(out[off + i, head], ref, rtol=2e-4, atol=2e-4)
