"""Host-side page allocator for the paged KV cache, with a prefix cache.

Why it is shaped this way:

* The device holds K/V in a pool of P pages of L tokens each (static shapes); the
  host only decides which page ids each request may use. Page 0 is a reserved
  null page: padded block-table entries point at it, so it is never handed out.
* Pages are reference counted because prefix caching shares the same full pages
  between requests. A page is written only while its single owner fills it;
  once full and computed it may be *registered* under a hash of its contents
  and from then on it is read-only and shareable.
* A registered page whose last reference goes away is not wiped: it becomes
  *evictable*, still findable by hash, and is reclaimed least-recently-freed
  first only when the free list runs dry. So a finished (or preempted)
  request's prompt stays reusable for as long as memory allows, at no cost.
* A page's hash chains over its parent's hash and its own token ids, so a page
  matches only when the whole prefix before it matches too. sha256 makes an
  accidental collision (which would silently serve wrong K/V) impossible in
  practice, and it is stable across processes, unlike Python's ``hash``.
* Allocation is all or nothing and returns None on shortage: the scheduler,
  not the allocator, decides whom to preempt.

Every page 1..P-1 is in exactly one state at any time:

* free:      refcount 0, not registered, in ``_free`` (FIFO);
* evictable: refcount 0, registered, in ``_evictable`` (LRU order, oldest first);
* in use:    refcount >= 1, registered or not.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import struct
from collections.abc import Iterable, Sequence

NULL_PAGE = 0

# Root pages hash under a different tag than chained ones, so "no parent" can never
# be confused with any parent digest.
_ROOT_TAG = b"R"
_CHAIN_TAG = b"C"


def page_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """sha256 digest (32 bytes) of a full page's tokens chained onto its parent page's digest.

    The encoding is stable across processes and machines: a tag, the parent digest
    (absent for the first page), then every token id as a little-endian int64. The
    token field has a fixed width and the parent a fixed length, so two different
    (parent, tokens) pairs never encode to the same bytes.
    """
    if parent is None:
        head = _ROOT_TAG
    else:
        if not isinstance(parent, bytes) or len(parent) != 32:
            raise ValueError(
                f"parent must be None or a 32-byte page_hash digest, got {parent!r:.80}"
            )
        head = _CHAIN_TAG + parent
    body = struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.sha256(head + body).digest()


def page_hashes(
    token_ids: Sequence[int], page_size: int, *, prefix: Sequence[bytes] = ()
) -> list[bytes]:
    """Chained hashes of every full page of `token_ids`, reusing the already known `prefix`.

    `prefix` holds the hashes of the first len(prefix) pages (e.g. cached on the
    request), so only the new pages are hashed.
    """
    hashes = list(prefix)
    parent = hashes[-1] if hashes else None
    for p in range(len(hashes), len(token_ids) // page_size):
        parent = page_hash(parent, token_ids[p * page_size : (p + 1) * page_size])
        hashes.append(parent)
    return hashes


@dataclasses.dataclass
class PrefixCacheStats:
    """Counters for the prefix hit rate: of the tokens looked up, how many came from cache."""

    queries: int = 0  # number of lookups recorded
    query_tokens: int = 0
    hit_tokens: int = 0
    query_pages: int = 0  # full pages among the queried tokens
    hit_pages: int = 0

    def record(self, *, query_tokens: int, hit_tokens: int, page_size: int) -> None:
        self.queries += 1
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens
        self.query_pages += query_tokens // page_size
        self.hit_pages += hit_tokens // page_size

    @property
    def hit_rate(self) -> float:
        """hit_tokens / query_tokens; 0.0 before any query."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class PageAllocator:
    """Reference-counted pages 1..num_pages-1 with an LRU prefix cache of full pages."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(
                f"num_pages must be an int >= 2 (page 0 is the reserved null page), got {num_pages!r}"
            )
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        # refcount[NULL_PAGE] stays 0 forever; the null page is in no list.
        self._refcount = [0] * num_pages
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        # Evictable pages in LRU order: the first key is evicted first. Values unused.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        # The prefix cache: a bijection between registered pages and their hashes.
        self._page_of_hash: dict[bytes, int] = {}
        self._hash_of_page: dict[int, bytes] = {}

    # ---- allocation ------------------------------------------------------------------

    def num_free(self) -> int:
        """Pages allocate() can hand out now: the free list plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    def num_used(self) -> int:
        """Pages with refcount >= 1 (the null page is not counted)."""
        return self.num_pages - 1 - self.num_free()

    def num_cached(self) -> int:
        """Registered pages, in use or evictable."""
        return len(self._hash_of_page)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def page_hash_of(self, page: int) -> bytes | None:
        """The hash a page is registered under, or None for an ordinary page."""
        return self._hash_of_page.get(page)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages with refcount 1, or None (allocating nothing) if fewer than n are available.

        The free list is used first; only then are evictable cached pages reclaimed,
        least recently freed first, dropping their hashes.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n > self.num_free():
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of_hash[self._hash_of_page.pop(page)]
            self._refcount[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page, in order.

        A page reaching refcount 0 returns to the free list or, if registered, becomes
        the most recently used evictable page: freeing a request's pages in reverse
        order therefore makes its tail pages (the least shareable) get evicted first.
        """
        for page in pages:
            self._check_page(page)
            if self._refcount[page] <= 0:
                raise ValueError(f"page {page} is not allocated (refcount 0); double free?")
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if page in self._hash_of_page:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def share(self, pages: Iterable[int]) -> None:
        """Add one reference to each page: in-use pages, or evictable cached pages (revived)."""
        for page in pages:
            self._check_page(page)
            if self._refcount[page] == 0:
                if page not in self._evictable:
                    raise ValueError(
                        f"page {page} is free and holds nothing to share; allocate() it instead"
                    )
                del self._evictable[page]
            self._refcount[page] += 1

    def _check_page(self, page: int) -> None:
        if not isinstance(page, int) or not NULL_PAGE < page < self.num_pages:
            raise ValueError(
                f"page must be an int in [1, {self.num_pages - 1}] (0 is the null page), got {page!r}"
            )

    # ---- prefix cache ----------------------------------------------------------------

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages cached under the longest prefix of `hashes`; changes no refcount or stats."""
        if not self.enable_prefix_caching:
            return []
        pages = []
        for h in hashes:
            page = self._page_of_hash.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def cached_page(self, page_hash: bytes) -> int | None:
        """The page cached under one hash (in use or evictable), or None; changes nothing."""
        if not self.enable_prefix_caching:
            return None
        return self._page_of_hash.get(page_hash)

    def lookup_hashes(self, hashes: Sequence[bytes]) -> list[int]:
        """Like match(), but takes a reference to each matched page (reviving evictable ones)."""
        pages = self.match(hashes)
        self.share(pages)
        return pages

    def lookup(self, token_ids: Sequence[int], *, record_stats: bool = True) -> list[int]:
        """Longest chain of cached full pages matching a prefix of `token_ids`, each shared.

        Only full pages can match; the chain stops at the first page not cached. The
        caller owns one reference to each returned page and must free() it.
        """
        hashes = page_hashes(token_ids, self.page_size) if self.enable_prefix_caching else []
        pages = self.lookup_hashes(hashes)
        if record_stats:
            self.stats.record(
                query_tokens=len(token_ids),
                hit_tokens=len(pages) * self.page_size,
                page_size=self.page_size,
            )
        return pages

    def register(self, page: int, page_hash: bytes) -> None:
        """Publish an in-use, full, fully computed page under its content hash.

        If another page is already cached under this hash, that one is kept and this
        page stays an ordinary page (freed to the free list when released). A page's
        contents never change once full, so re-registering it under another hash is
        a caller bug.
        """
        self._check_page(page)
        if self._refcount[page] <= 0:
            raise ValueError(f"page {page} is not allocated (refcount 0); cannot register it")
        if not self.enable_prefix_caching:
            return
        old = self._hash_of_page.get(page)
        if old is not None:
            if old != page_hash:
                raise ValueError(f"page {page} is already registered under a different hash")
            return
        if page_hash in self._page_of_hash:
            return
        self._page_of_hash[page_hash] = page
        self._hash_of_page[page] = page_hash

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (their K/V is void, e.g. the pool was re-created):
        evictable pages return to the free list, pages in use stay allocated, unregistered."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._page_of_hash.clear()
        self._hash_of_page.clear()

    # ---- checks ----------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if any page is lost, in two states, or mis-counted."""
        free, evictable = list(self._free), list(self._evictable)
        assert self._refcount[NULL_PAGE] == 0, "the null page was handed out"
        assert NULL_PAGE not in free and NULL_PAGE not in self._evictable, "null page in a list"
        assert NULL_PAGE not in self._hash_of_page, "null page registered"
        free_set = set(free)
        assert len(free_set) == len(free), f"duplicate pages in the free list: {free}"
        assert not free_set & set(evictable), "page both free and evictable"
        for page in range(1, self.num_pages):
            rc = self._refcount[page]
            assert rc >= 0, f"page {page} has negative refcount {rc}"
            in_free, in_evictable = page in free_set, page in self._evictable
            registered = page in self._hash_of_page
            if rc > 0:
                assert not in_free and not in_evictable, f"in-use page {page} is also listed free"
            elif registered:
                assert in_evictable and not in_free, f"unreferenced cached page {page} is lost"
            else:
                assert in_free and not in_evictable, f"unreferenced page {page} is lost"
        assert len(self._page_of_hash) == len(self._hash_of_page), "hash maps differ in size"
        for h, page in self._page_of_hash.items():
            assert self._hash_of_page.get(page) == h, f"hash maps disagree on page {page}"
        if not self.enable_prefix_caching:
            assert not self._hash_of_page, "pages registered with prefix caching disabled"
