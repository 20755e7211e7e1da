"""PageAllocator: reference counts, the null page, all-or-nothing allocation, the LRU prefix cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_infer.scheduler import NULL_PAGE, PageAllocator, page_hash, page_hashes


def _full(alloc: PageAllocator, tokens: list[int]) -> list[int]:
    """Allocate pages for `tokens` and register each full one, as a finished prefill would."""
    n_pages = -(-len(tokens) // alloc.page_size)
    pages = alloc.allocate(n_pages)
    assert pages is not None
    for page, h in zip(pages, page_hashes(tokens, alloc.page_size)):
        alloc.register(page, h)
    return pages


def test_allocate_and_free_roundtrip():
    alloc = PageAllocator(num_pages=5, page_size=4)
    assert alloc.num_free() == 4
    pages = alloc.allocate(3)
    assert sorted(pages) == [1, 2, 3]
    assert all(alloc.refcount(p) == 1 for p in pages)
    assert alloc.num_free() == 1 and alloc.num_used() == 3
    alloc.free(pages)
    assert alloc.num_free() == 4 and alloc.num_used() == 0
    alloc.check_invariants()


def test_null_page_is_never_handed_out():
    alloc = PageAllocator(num_pages=8, page_size=2)
    for _ in range(3):
        pages = alloc.allocate(7)
        assert NULL_PAGE not in pages and sorted(pages) == list(range(1, 8))
        alloc.free(pages)
    with pytest.raises(ValueError, match="null page"):
        alloc.free([NULL_PAGE])


def test_exhaustion_returns_none_without_partial_allocation():
    alloc = PageAllocator(num_pages=4, page_size=4)
    first = alloc.allocate(2)
    assert alloc.allocate(2) is None
    assert alloc.num_free() == 1, "a failed allocation must take nothing"
    assert alloc.allocate(1) is not None
    assert alloc.allocate(1) is None
    assert alloc.allocate(0) == []
    alloc.free(first)
    alloc.check_invariants()


def test_refcount_share_and_double_free():
    alloc = PageAllocator(num_pages=4, page_size=4)
    (page,) = alloc.allocate(1)
    alloc.share([page])
    assert alloc.refcount(page) == 2
    alloc.free([page])
    assert alloc.refcount(page) == 1 and alloc.num_free() == 2
    alloc.free([page])
    assert alloc.num_free() == 3
    with pytest.raises(ValueError, match="refcount 0"):
        alloc.free([page])
    with pytest.raises(ValueError, match="free"):
        alloc.share([page])
    alloc.check_invariants()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_pages": 1, "page_size": 4}, "num_pages must be an int >= 2"),
        ({"num_pages": 4, "page_size": 0}, "page_size must be an int >= 1, got 0"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PageAllocator(**kwargs)


def test_hash_chains_over_the_prefix():
    page = [5, 6, 7, 8]
    root = page_hash(None, page)
    assert root == page_hash(None, list(page)), "hash must be deterministic"
    after_a = page_hash(page_hash(None, [1, 2, 3, 4]), page)
    after_b = page_hash(page_hash(None, [1, 2, 3, 9]), page)
    assert len({root, after_a, after_b}) == 3, "same page tokens after different prefixes"
    assert page_hash(None, [1, 2]) != page_hash(None, [2, 1])
    with pytest.raises(ValueError, match="parent"):
        page_hash(b"short", page)


def test_page_hashes_cover_only_full_pages_and_reuse_prefix():
    tokens = list(range(10))
    hashes = page_hashes(tokens, 4)
    assert len(hashes) == 2
    assert hashes[1] == page_hash(hashes[0], tokens[4:8])
    assert page_hashes(tokens, 4, prefix=hashes[:1]) == hashes


def test_lookup_matches_full_pages_and_stops_at_first_miss():
    alloc = PageAllocator(num_pages=16, page_size=4)
    prompt = list(range(100, 110))  # 2 full pages + 2 tokens
    pages = _full(alloc, prompt)
    assert alloc.num_cached() == 2, "the partial third page is not registered"

    hit = alloc.lookup(prompt + [1, 2, 3])
    assert hit == pages[:2]
    assert [alloc.refcount(p) for p in hit] == [2, 2]
    alloc.free(hit)

    assert alloc.lookup(prompt[:7]) == pages[:1], "only whole pages match"
    alloc.free(pages[:1])
    changed_first = [0] + prompt[1:]
    assert alloc.lookup(changed_first) == [], "a later page cannot match after a miss"
    changed_second = prompt[:4] + [0] + prompt[5:]
    assert alloc.lookup(changed_second) == pages[:1]
    alloc.free(pages[:1])
    alloc.free(pages)
    alloc.check_invariants()


def test_lookup_counts_stats():
    alloc = PageAllocator(num_pages=16, page_size=4)
    alloc.free(_full(alloc, list(range(8))))
    alloc.free(alloc.lookup(list(range(10))))
    alloc.lookup([9] * 6)
    assert alloc.stats.queries == 2
    assert (alloc.stats.query_tokens, alloc.stats.hit_tokens) == (16, 8)
    assert (alloc.stats.query_pages, alloc.stats.hit_pages) == (3, 2)
    assert alloc.stats.hit_rate == pytest.approx(0.5)


def test_freed_cached_pages_stay_reusable_then_evict_lru():
    alloc = PageAllocator(num_pages=5, page_size=2)
    a = _full(alloc, [1, 2])
    b = _full(alloc, [3, 4])
    alloc.free(a)
    alloc.free(b)  # a is now the least recently used
    assert alloc.num_free() == 4 and alloc.num_cached() == 2
    assert alloc.allocate(2) is not None, "the free list is used before evicting"
    assert alloc.num_cached() == 2

    (page,) = alloc.allocate(1)
    assert [page] == a, "the least recently freed cached page is evicted first"
    assert alloc.lookup([1, 2]) == [], "an evicted page drops out of the cache"
    assert alloc.lookup([3, 4]) == b
    alloc.check_invariants()


def test_lookup_revives_an_evictable_page_and_refreshes_lru():
    alloc = PageAllocator(num_pages=3, page_size=2)
    a = _full(alloc, [1, 2])
    b = _full(alloc, [3, 4])
    alloc.free(a)
    alloc.free(b)
    assert alloc.lookup([1, 2, 9]) == a
    assert alloc.num_free() == 1, "a revived page is in use, not evictable"
    alloc.free(a)  # a becomes the most recently used
    assert alloc.allocate(1) == b
    alloc.check_invariants()


def test_register_keeps_the_first_page_for_a_hash():
    alloc = PageAllocator(num_pages=4, page_size=2)
    first, dup = alloc.allocate(2)
    h = page_hash(None, [1, 2])
    alloc.register(first, h)
    alloc.register(dup, h)
    assert alloc.page_hash_of(first) == h and alloc.page_hash_of(dup) is None
    alloc.free([dup])
    assert alloc.num_cached() == 1, "the duplicate goes back to the free list"
    with pytest.raises(ValueError, match="different hash"):
        alloc.register(first, page_hash(None, [3, 4]))
    with pytest.raises(ValueError, match="not allocated"):
        alloc.register(dup, h)
    alloc.free([first])
    alloc.check_invariants()


def test_prefix_caching_disabled():
    alloc = PageAllocator(num_pages=4, page_size=2, enable_prefix_caching=False)
    pages = alloc.allocate(1)
    alloc.register(pages[0], page_hash(None, [1, 2]))
    alloc.free(pages)
    assert alloc.lookup([1, 2, 3]) == [] and alloc.num_cached() == 0
    alloc.check_invariants()


def test_check_invariants_catches_a_lost_page():
    alloc = PageAllocator(num_pages=4, page_size=2)
    alloc._free.pop()
    with pytest.raises(AssertionError, match="lost"):
        alloc.check_invariants()


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "free", "share", "register", "lookup"]), st.integers(0, 50)
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_random_operations_keep_invariants(ops):
    """Random ops against a model of who holds what; every page returns at the end."""
    alloc = PageAllocator(num_pages=9, page_size=2)
    held: list[int] = []  # one entry per reference we own
    for op, x in ops:
        if op == "alloc":
            n = x % 4
            before = alloc.num_free()
            pages = alloc.allocate(n)
            if pages is None:
                assert before < n and alloc.num_free() == before
            else:
                assert len(pages) == n and NULL_PAGE not in pages
                assert not set(pages) & set(held), "handed out a page that is in use"
                held.extend(pages)
        elif op == "free" and held:
            alloc.free([held.pop(x % len(held))])
        elif op == "share" and held:
            page = held[x % len(held)]
            alloc.share([page])
            held.append(page)
        elif op == "register" and held:
            page = held[x % len(held)]
            if alloc.page_hash_of(page) is None:  # a full page's contents never change
                alloc.register(page, page_hash(None, [x % 3, x % 5]))
        elif op == "lookup":
            held.extend(alloc.lookup([x % 3, x % 5, 0]))
        alloc.check_invariants()
        for page in set(held):
            assert alloc.refcount(page) == held.count(page)
    alloc.free(held)
    alloc.check_invariants()
    assert alloc.num_free() == alloc.num_pages - 1
