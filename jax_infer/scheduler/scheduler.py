"""Continuous-batching scheduler: which tokens of which requests the next model step computes.

Why it is shaped this way:

* Pure Python on the host, no tensors: the engine turns a SchedulerOutput into padded
  device arrays (an ``i32[B, pages_per_seq]`` block table, token ids, positions) and
  reports back through update(). Keeping the policy here makes it testable without
  a model, and keeps device shapes static.
* One mechanism, no prefill mode: each request computes a chunk of
  ``all_token_ids[num_computed_tokens:num_tokens]`` per step. A long prompt is split
  over several steps (chunked prefill), a prefix-cache hit starts with
  num_computed_tokens already advanced, and a preempted request restarts from 0 with
  its outputs kept as part of the tokens to recompute.
* Policy follows vLLM: first come, first served under a per-step token budget and a
  seat limit. Running requests go first (a decode costs one token), then waiting
  requests are admitted in arrival order while budget, seats and pages last. The
  head of the queue is never skipped, so a big request cannot starve.
* Pages run out only while growing a running request; then the most recently
  admitted running request is preempted (all pages freed, recomputed later), which
  keeps the oldest requests progressing. Nothing is admitted in a step that had to
  preempt: the pool is known to be tight.
* Strict alternation: every non-empty schedule() must be followed by its update()
  before the next schedule(), so the host state never runs ahead of the device.
* Page groups (vLLM's hybrid KV-cache manager): layers with a sliding window W may keep
  their pages apart from the full-attention layers (`windows`, one entry per group, each
  group its own allocator, page pool and block table per request). A windowed group returns
  a page to its allocator once every position on it is older than
  ``num_computed_tokens - W + 1``, the oldest key any later query can read (queries only
  move forward: a rejected speculative draft rolls back no further than the computed
  tokens), and its block-table entry becomes the null page, which the masks never read.
  So a long request holds about W / L pages per windowed group instead of all of them.
  Allocation, preemption and admission take every group together (all or nothing). A
  prefix-cache hit of k pages needs, in a windowed group, only the pages its window reaches
  from position k * L; the longest k for which every group has them cached is used (a
  window page evicted means a shorter hit, recomputed, never a wrong one).
* Parallel sampling (n samples of one prompt) forks rather than recomputes: the first
  sample (the leader) is queued and computes the prompt; the others (its followers) hold
  no pages and wait beside it, with seats reserved. The step that reaches the end of the
  prompt samples every one of them from the leader's last logits (ScheduledRequest.
  followers), and update() forks: each follower shares the leader's prompt pages (one
  more reference each) and starts decoding. A page shared this way may be the partially
  filled last prompt page; the first write to a shared page copies it to a private one
  (copy on write: SchedulerOutput.page_copies, executed by the engine before the step).
  After the fork, samples are ordinary requests: preemption frees their references and
  recomputes, as for any request. A leader that ends before its fork releases its
  followers to the queue as ordinary requests.

A request's life: WAITING -> RUNNING <-> PREEMPTED -> FINISHED_*. A finished
request is forgotten by the scheduler: it owns no pages and is in no queue.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

from jax_infer.scheduler.allocator import NULL_PAGE, PageAllocator, page_hashes
from jax_infer.scheduler.page_groups import request_pages
from jax_infer.scheduler.request import FINISH_REASONS, Request, RequestStatus, commit_tokens


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass
class ScheduledRequest:
    """One request's share of a step: compute `token_ids` at positions start, start+1, ..."""

    request: Request
    start: int  # num_computed_tokens before this step: position of token_ids[0]
    token_ids: list[int]  # len >= 1; all_token_ids[start : start + len]
    block_table: list[int]  # snapshot of the request's pages; covers [0, start + len(token_ids))
    sample: bool  # the chunk reaches the end of the known tokens: sample one after it
    is_new: bool  # (re)admitted this step: the engine sets up its per-request state
    # Speculative decoding: pages also cover the next `num_lookahead` positions, so the engine
    # may append up to that many draft tokens to this decode and verify them in the same step.
    # update() then takes 1 + (accepted drafts) tokens and advances num_computed_tokens past
    # the accepted drafts only: rejected drafts' K/V is overwritten by later steps.
    num_lookahead: int = 0
    # Snapshots of every page group's table (block_tables[0] == block_table); a windowed
    # group's pages its window no longer reaches are the null page.
    block_tables: list[list[int]] = dataclasses.field(default_factory=list)
    # Parallel sampling: followers to sample from this row's logits and fork in update().
    followers: list[Request] = dataclasses.field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end(self) -> int:
        """One past the last position computed; the K/V of [0, end) is valid after the step."""
        return self.start + len(self.token_ids)


@dataclasses.dataclass
class SchedulerOutput:
    """What to compute in one step.

    ``scheduled[:num_decodes]`` are decodes (one token, request already running),
    the rest are prompt or recompute chunks, so the engine can batch them separately.
    """

    scheduled: list[ScheduledRequest]
    num_decodes: int
    num_batched_tokens: int  # sum of len(token_ids), <= max_num_batched_tokens
    preempted: list[str]  # request ids preempted in this step (their device state is void)
    finished_aborted: list[str]  # ids ended by abort() since the previous schedule()
    finished_error: list[str]  # ids failed in this step (see Request.error)
    # (source page, destination page) copies to make before the step (copy on write).
    page_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS continuous batching over a paged KV cache, with chunked prefill and prefix reuse."""

    def __init__(
        self,
        *,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        long_prefill_chunk: int | None = None,
        max_num_partial_prefills: int | None = None,
        windows: Sequence[int | None] | None = None,
    ):
        """windows: one entry per page group, None for a full-attention group or the sliding
        window (>= 1) of its layers; None for one full-attention group (no page freeing).
        num_pages: an int (every group gets that many) or one int per group."""
        windows = (None,) if windows is None else tuple(windows)
        if not windows:
            raise ValueError("windows must name at least one page group, got ()")
        for w in windows:
            if w is not None:
                _check_int("windows[i]", w, 1)
        group_pages = (num_pages,) * len(windows) if isinstance(num_pages, int) else num_pages
        if not isinstance(group_pages, (tuple, list)) or len(group_pages) != len(windows):
            raise ValueError(
                f"num_pages must be an int or one int per page group ({len(windows)}), "
                f"got {num_pages!r}"
            )
        for n in group_pages:
            _check_int("num_pages", n, 2)
        _check_int("page_size", page_size, 1)
        _check_int("max_num_seqs", max_num_seqs, 1)
        _check_int("max_num_batched_tokens", max_num_batched_tokens, 1)
        # Room for at least one prompt token and one generated token.
        _check_int("max_model_len", max_model_len, 2)
        if long_prefill_chunk is not None:
            _check_int("long_prefill_chunk", long_prefill_chunk, 1)
        if max_num_partial_prefills is not None:
            _check_int("max_num_partial_prefills", max_num_partial_prefills, 1)
        # The newest token of a finishing request is never fed back, so a request of
        # max_model_len tokens writes K/V for at most max_model_len - 1 of them.
        chunk = min(max_num_batched_tokens, long_prefill_chunk or max_num_batched_tokens)
        for g, (w, n) in enumerate(zip(windows, group_pages)):
            need = request_pages(max_model_len, page_size, w, chunk)
            if need > n - 1:
                what = "num_pages" if len(windows) == 1 else f"num_pages[{g}] (window {w})"
                raise ValueError(
                    f"one request of max_model_len={max_model_len} tokens needs {need} pages of "
                    f"page_size={page_size}, but {what}={n} leaves {n - 1} (page 0 is the "
                    f"null page); use {what} >= {need + 1} or a smaller max_model_len"
                )
        self.windows = windows
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.long_prefill_chunk = long_prefill_chunk
        # At most this many multi-token chunks per step (vLLM's max_num_partial_prefills):
        # fewer distinct step shapes for engines that compile per shape. None: no limit.
        self.max_num_partial_prefills = max_num_partial_prefills
        self.enable_prefix_caching = enable_prefix_caching
        self.allocators = [PageAllocator(n, page_size, enable_prefix_caching) for n in group_pages]
        # Group 0's allocator; the prefix-cache stats are recorded here (one lookup per admission).
        self.allocator = self.allocators[0]
        self._requests: dict[str, Request] = {}  # every unfinished request
        # Waiting and preempted requests, served from the left. They hold no pages.
        self._waiting: collections.deque[Request] = collections.deque()
        # Running requests in admission order: the last one is preempted first.
        self._running: list[Request] = []
        self._pending: SchedulerOutput | None = None  # scheduled, update() not yet called
        self._aborted_ids: list[str] = []  # for the next SchedulerOutput.finished_aborted
        self._finished_outside_update: list[Request] = []  # drained by pop_finished()
        # Parallel sampling: followers waiting for their leader's prompt, by leader id.
        self._followers: dict[str, list[Request]] = {}
        self._leader_of: dict[str, str] = {}
        self._copies: list[tuple[int, int]] = []  # page copies of the step being scheduled

    # ---- requests in and out -----------------------------------------------------------

    def add_request(self, request: Request, followers: Sequence[Request] = ()) -> None:
        """Queue a fresh request (WAITING, nothing computed, no output, no pages).

        Service order is the order of add_request() calls; arrival_time is for metrics.
        `followers`: more samples of the same prompt, forked from `request` once its prompt
        is computed (see the module docstring); they need seats beside it.
        """
        group = [request, *followers]
        ids = [r.request_id for r in group]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids {ids} repeat")
        if len(group) > self.max_num_seqs:
            raise ValueError(
                f"request {request.request_id!r}: n={len(group)} samples need {len(group)} "
                f"seats but max_num_seqs={self.max_num_seqs}"
            )
        if followers and len(self.allocators) > 1:
            raise ValueError(
                f"request {request.request_id!r}: forked samples (followers) need one page "
                f"group; this scheduler has {len(self.allocators)} (windows {self.windows}): "
                "add the samples as separate requests"
            )
        for f in followers:
            if f.prompt_token_ids != request.prompt_token_ids:
                raise ValueError(f"follower {f.request_id!r} has another prompt than its leader")
        for r in group:
            self._check_fresh(r)
        for r in group:
            self._requests[r.request_id] = r
        self._waiting.append(request)
        if followers:
            self._followers[request.request_id] = list(followers)
            for f in followers:
                self._leader_of[f.request_id] = request.request_id

    def _check_fresh(self, request: Request) -> None:
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already queued or running")
        n = len(request.prompt_token_ids)
        if n == 0:
            raise ValueError(f"request {rid!r}: prompt_token_ids is empty; need >= 1 token")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise ValueError(
                f"request {rid!r}: max_tokens must be an int >= 1, got {request.max_tokens!r}"
            )
        if n + request.max_tokens > self.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt of {n} tokens + max_tokens={request.max_tokens} = "
                f"{n + request.max_tokens} exceeds max_model_len={self.max_model_len}"
            )
        # Within max_model_len it also fits the pool: the constructor checked that a
        # request of max_model_len tokens does.
        if (
            request.status is not RequestStatus.WAITING
            or request.num_computed_tokens
            or any(request.block_tables)
            or request.output_token_ids
        ):
            raise ValueError(
                f"request {rid!r} must be fresh (WAITING, no output, nothing computed, no pages), "
                f"got status={request.status.name}, num_computed_tokens={request.num_computed_tokens}"
            )

    def abort(self, request_id: str) -> bool:
        """Finish a waiting, running or preempted request now and free its pages.

        Returns False for an unknown or already finished id. If the request is in the
        output awaiting update(), update() skips it.
        """
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        self._aborted_ids.append(request_id)
        self._finished_outside_update.append(req)
        return True

    def end(self, request_id: str) -> bool:
        """Free a request that a stop rule ended outside update() (async scheduling: its
        token came back after the next step was scheduled); its status is already the
        finished one. False if the scheduler holds no such request. update() skips it."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._finish(req, req.status)
        return True

    def pop_finished(self) -> list[Request]:
        """Requests finished outside update() (abort(), errors found by schedule()), once each."""
        out, self._finished_outside_update = self._finished_outside_update, []
        return out

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request by id, or None."""
        return self._requests.get(request_id)

    def _finish(self, req: Request, status: RequestStatus, error: str | None = None) -> None:
        # The status may already say finished (set by outputs.commit_tokens): where the
        # request sits is told by its pages-or-queue state, not by its status.
        leader = self._leader_of.pop(req.request_id, None)
        if leader is not None:  # a follower not yet forked: it is in no queue
            self._followers[leader].remove(req)
            if not self._followers[leader]:
                del self._followers[leader]
        elif any(r is req for r in self._running):
            self._running.remove(req)
        else:
            self._waiting.remove(req)
        self._release_followers(req)
        self._free_pages(req)
        req.status = status
        if error is not None:
            req.error = error
        del self._requests[req.request_id]

    def _free_pages(self, req: Request) -> None:
        # Reverse order: the tail pages, least likely to be shared, become the
        # least recently used and are evicted first. Null entries (window pages freed
        # already) are skipped.
        for alloc, table in zip(self.allocators, req.block_tables):
            alloc.free(p for p in reversed(table) if p != NULL_PAGE)
        req.block_tables = [[] for _ in self.allocators]

    def _release_window_pages(self, req: Request) -> None:
        """Free, in each windowed group, the pages no query from num_computed_tokens on can
        read (every position < num_computed_tokens - W + 1); their entries become null."""
        for g, w in enumerate(self.windows):
            if w is None:
                continue
            table = req.block_tables[g]
            j = min(max(0, req.num_computed_tokens - w + 1) // self.page_size, len(table)) - 1
            # Freed entries form a prefix of the table: walk back to the last one freed.
            freed = []
            while j >= 0 and table[j] != NULL_PAGE:
                freed.append(table[j])
                table[j] = NULL_PAGE
                j -= 1
            self.allocators[g].free(freed)

    def _release_followers(self, req: Request) -> None:
        """A leader ending before its fork: its followers queue as ordinary requests, next."""
        followers = self._followers.pop(req.request_id, [])
        for f in reversed(followers):
            del self._leader_of[f.request_id]
            self._waiting.appendleft(f)

    def _seats_used(self) -> int:
        """Running requests plus the seats reserved for the followers of running leaders."""
        running = {r.request_id for r in self._running}
        return len(self._running) + sum(
            len(f) for rid, f in self._followers.items() if rid in running
        )

    def _preempt(self, req: Request) -> None:
        """Free all of a running request's pages and put it at the front of the queue."""
        # A copy into one of its pages is void (and the page may be reused in this step).
        mine = set(req.block_table)
        self._copies = [c for c in self._copies if c[1] not in mine]
        self._running.remove(req)
        self._free_pages(req)
        req.num_computed_tokens = 0  # its outputs stay: they are recomputed with the prompt
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self._waiting.appendleft(req)

    def preempt_all(self) -> list[str]:
        """Preempt every running request (newest first, so the oldest stays at the head of
        the queue) and drop the prefix cache; returns their ids. For when the device's page
        pool was lost (a failed step that had it donated): every page's K/V is void, so each
        request recomputes from its tokens. Call between update() and the next schedule()."""
        if self._pending is not None:
            raise RuntimeError("preempt_all() called between schedule() and its update()")
        ids = []
        while self._running:
            victim = self._running[-1]
            self._preempt(victim)
            ids.append(victim.request_id)
        for alloc in self.allocators:
            alloc.reset_prefix_cache()
        return ids

    # ---- scheduling --------------------------------------------------------------------

    def _chunk(self, req: Request, budget: int) -> int:
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        if self.long_prefill_chunk is not None:
            n = min(n, self.long_prefill_chunk)
        assert n >= 1, f"request {req.request_id!r} has nothing to compute"
        return n

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make the pages that positions [num_computed_tokens, num_tokens) write private (copy
        on write of pages shared by forked samples: only a single-group scheduler forks) and
        append pages so every group's block table covers `num_tokens` positions; False if
        some group has too few left."""
        first = req.num_computed_tokens // self.page_size
        for j in range(first, min(len(req.block_table), _cdiv(num_tokens, self.page_size))):
            page = req.block_table[j]
            if self.allocator.refcount(page) > 1:  # shared by forked samples
                new = self.allocator.allocate(1)
                if new is None:
                    return False
                self._copies.append((page, new[0]))
                req.block_table[j] = new[0]
                self.allocator.free([page])
        need = _cdiv(num_tokens, self.page_size) - len(req.block_table)
        if need <= 0:
            return True
        got = []
        for alloc in self.allocators:
            pages = alloc.allocate(need)
            if pages is None:
                for a, p in zip(self.allocators, got):
                    a.free(p)
                return False
            got.append(pages)
        for table, pages in zip(req.block_tables, got):
            table.extend(pages)
        return True

    def _extend_hashes(self, req: Request, num_pages: int) -> None:
        """Make req.block_hashes cover its first `num_pages` full pages (tokens must be known)."""
        if len(req.block_hashes) < num_pages:
            tokens = req.token_ids_slice(0, num_pages * self.page_size)
            req.block_hashes = page_hashes(tokens, self.page_size, prefix=req.block_hashes)

    def _scheduled(self, req: Request, n: int, is_new: bool) -> ScheduledRequest:
        start = req.num_computed_tokens
        tables = [list(t) for t in req.block_tables]  # one copy each; block_table is group 0's
        return ScheduledRequest(
            request=req,
            start=start,
            token_ids=req.token_ids_slice(start, start + n),
            block_table=tables[0],
            sample=start + n == req.num_tokens,
            is_new=is_new,
            block_tables=tables,
        )

    def _admit(self, req: Request, budget: int) -> ScheduledRequest | None:
        """Give the head of the queue its cached prefix and pages for a first chunk, or None."""
        followers = self._followers.get(req.request_id, ())
        if followers and self._seats_used() + 1 + len(followers) > self.max_num_seqs:
            return None  # its samples need seats beside it
        hit = 0
        if self.enable_prefix_caching and not req.skip_prefix_cache:
            # Only pages strictly before the last known token may come from cache: that
            # token must be computed so that the step samples the next one, and a page
            # is never written while shared.
            num_full = (req.num_tokens - 1) // self.page_size
            self._extend_hashes(req, num_full)
            hit = self._cache_hit(req.block_hashes[:num_full])
        start = hit * self.page_size
        n = min(req.num_tokens - start, budget)
        if self.long_prefill_chunk is not None:
            n = min(n, self.long_prefill_chunk)
        tables = []
        for g, alloc in enumerate(self.allocators):
            lo = self._window_start(g, start)
            cached = [alloc.cached_page(h) for h in req.block_hashes[lo:hit]]
            alloc.share(cached)
            new = alloc.allocate(_cdiv(start + n, self.page_size) - hit)
            if new is None:
                alloc.free(reversed(cached))
                for a, t in zip(self.allocators, tables):
                    a.free(p for p in reversed(t) if p != NULL_PAGE)
                return None
            tables.append([NULL_PAGE] * lo + cached + new)
        if self.enable_prefix_caching:
            self.allocator.stats.record(
                query_tokens=req.num_tokens, hit_tokens=start, page_size=self.page_size
            )
        if req.status is RequestStatus.WAITING:
            req.num_cached_tokens = start
        req.block_tables = tables
        req.num_computed_tokens = start
        req.status = RequestStatus.RUNNING
        self._running.append(req)
        return self._scheduled(req, n, is_new=True)

    def _window_start(self, g: int, position: int) -> int:
        """The first page group g's queries from `position` on can read (0 for full attention)."""
        w = self.windows[g]
        return 0 if w is None else max(0, position - w + 1) // self.page_size

    def _cache_hit(self, hashes: Sequence[bytes]) -> int:
        """The most leading pages (<= len(hashes)) every group can serve from its prefix
        cache: a full group all of them, a windowed group those its window reaches from the
        end of the hit."""
        k = len(hashes)
        for alloc, w in zip(self.allocators, self.windows):
            if w is None:
                k = min(k, len(alloc.match(hashes[:k])))
        while k > 0 and not all(
            all(
                alloc.cached_page(h) is not None
                for h in hashes[self._window_start(g, k * self.page_size) : k]
            )
            for g, alloc in enumerate(self.allocators)
            if self.windows[g] is not None
        ):
            k -= 1
        return k

    def _with_followers(self, sr: ScheduledRequest) -> ScheduledRequest:
        if sr.sample:
            sr.followers = list(self._followers.get(sr.request_id, ()))
        return sr

    def _prefill_slots_full(self, chunks: list[ScheduledRequest]) -> bool:
        limit = self.max_num_partial_prefills
        return limit is not None and sum(len(c.token_ids) > 1 for c in chunks) >= limit

    def _lookahead(self, req: Request, wanted: int, budget: int) -> int:
        """Draft slots a decode of `req` may reserve: at most `wanted`, what the token budget
        leaves after the decode itself, and what max_tokens leaves after the bonus token (which
        also keeps every written position below max_model_len); 0 when pages are short."""
        room = req.room(self.max_model_len) - 1
        k = max(0, min(wanted, budget - 1, room))
        if k and not self._grow(req, req.num_tokens + k):
            k = 0  # never preempt for a draft: the decode proceeds without one
        return k

    def schedule(self, lookahead: Mapping[str, int] | None = None) -> SchedulerOutput:
        """Pick this step's chunks. Call update() with the result before the next schedule().

        `lookahead` (speculative decoding) maps request ids to how many draft tokens the
        engine would like to verify after that request's decode; decodes get up to that many
        extra page slots (ScheduledRequest.num_lookahead), charged to the token budget.
        """
        if self._pending is not None:
            raise RuntimeError("schedule() called again before update() of the previous output")
        budget = self.max_num_batched_tokens
        self._copies = []
        decodes: list[ScheduledRequest] = []
        chunks: list[ScheduledRequest] = []
        preempted: list[str] = []
        errors: list[str] = []

        # 1. Running requests, oldest first. Victims come from the end of the list, so
        # they are never requests already scheduled in this step.
        i = 0
        while i < len(self._running) and budget > 0:
            req = self._running[i]
            n = self._chunk(req, budget)
            if n > 1 and self._prefill_slots_full(chunks):
                i += 1
                continue  # mid-prompt; it gets its next chunk in a later step
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self._running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue  # it preempted itself; it was the last running request
            sr = self._with_followers(self._scheduled(req, n, is_new=False))
            if n == 1 and lookahead and lookahead.get(req.request_id):
                sr.num_lookahead = self._lookahead(req, lookahead[req.request_id], budget)
                sr.block_tables = [list(t) for t in req.block_tables]
                sr.block_table = sr.block_tables[0]
            (decodes if n == 1 else chunks).append(sr)
            budget -= n + sr.num_lookahead
            i += 1

        # 2. Waiting requests in order, unless this step showed the pool is tight.
        if not preempted or not self._running:
            while (
                self._waiting
                and budget > 0
                and self._seats_used() < self.max_num_seqs
                and not self._prefill_slots_full(chunks)
            ):
                req = self._waiting[0]
                sr = self._admit(req, budget)
                if sr is not None:
                    self._waiting.popleft()
                    chunks.append(self._with_followers(sr))
                    budget -= len(sr.token_ids)
                elif self._running:
                    break  # FCFS: wait for running requests to release pages
                else:
                    # Nothing holds pages the scheduler could free: it will never fit.
                    self._finish(
                        req,
                        RequestStatus.FINISHED_ERROR,
                        f"request {req.request_id!r} needs pages for "
                        f"{req.num_tokens} tokens but only {self.allocator.num_free()} of "
                        f"{self.allocator.num_pages - 1} pages (group 0) can be allocated with "
                        "nothing running",
                    )
                    errors.append(req.request_id)
                    self._finished_outside_update.append(req)

        scheduled = decodes + chunks
        out = SchedulerOutput(
            scheduled=scheduled,
            num_decodes=len(decodes),
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted=preempted,
            finished_aborted=self._aborted_ids,
            finished_error=errors,
            page_copies=self._copies,
        )
        self._aborted_ids = []
        self._copies = []
        if scheduled:
            self._pending = out
        return out

    # ---- results -----------------------------------------------------------------------

    def update(
        self,
        output: SchedulerOutput,
        sampled: Mapping[str, Sequence[int]],
        finished: Mapping[str, str] | None = None,
        logprobs: Mapping[str, Sequence[dict | None]] | None = None,
    ) -> list[Request]:
        """Advance the requests of `output` after the model step; returns those that finished.

        `sampled` maps each request whose ScheduledRequest.sample was set to its new
        token(s) (may be omitted for a request also in `finished`), appended through
        `commit_tokens` (with `logprobs[rid]`, one entry per token, where given): a stop
        rule ends the request there and drops the tokens after it, reaching max_tokens or
        max_model_len finishes it with "length". `finished` maps request ids to "stop",
        "length", "abort" or "error" as decided by the engine outside the tokens (e.g. a
        failure). Requests aborted since schedule() are skipped. A leader's followers
        (ScheduledRequest.followers) take their first token(s) in `sampled` too, and are
        forked from the leader here; one left out of `sampled` is queued on its own.
        """
        finished = dict(finished or {})
        logprobs = logprobs or {}
        if output.scheduled and output is not self._pending:
            raise ValueError("update() takes the output of the latest schedule(), once")
        by_id = {sr.request_id: sr for sr in output.scheduled}
        forks = {f.request_id for sr in output.scheduled for f in sr.followers}
        # Validate everything before changing anything.
        for rid, reason in finished.items():
            if reason not in FINISH_REASONS:
                raise ValueError(
                    f"finished[{rid!r}] = {reason!r}; allowed: {sorted(FINISH_REASONS)}"
                )
            if rid not in self._requests and rid not in by_id:
                raise ValueError(f"finished names unknown request {rid!r}")
        for rid in sampled:
            if rid in forks:
                continue
            if rid not in by_id or not by_id[rid].sample:
                raise ValueError(
                    f"sampled has tokens for {rid!r}, which was not scheduled to sample this step"
                )
            most = 1 + by_id[rid].num_lookahead
            if by_id[rid].num_lookahead and len(sampled[rid]) > most:
                raise ValueError(
                    f"sampled[{rid!r}] has {len(sampled[rid])} tokens; a decode with "
                    f"num_lookahead={most - 1} takes at most {most}"
                )
        for rid, sr in by_id.items():
            live = sr.request.status is RequestStatus.RUNNING
            if sr.sample and live and rid not in finished and not sampled.get(rid):
                raise ValueError(f"request {rid!r} was scheduled to sample but got no token")
        self._pending = None

        done: list[Request] = []
        for sr in output.scheduled:
            req = sr.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted after schedule(); its pages are already free
            assert req.num_computed_tokens == sr.start, "request advanced outside update()"
            if finished.get(sr.request_id) == "error":
                # The step failed for this request: its K/V is not trusted, so nothing of it
                # is counted as computed or published to the prefix cache.
                self._finish_with(req, finished.pop(sr.request_id))
                done.append(req)
                continue
            new = 0
            if sr.sample and sampled.get(sr.request_id):
                new = commit_tokens(
                    req, sampled[sr.request_id], self.max_model_len, logprobs.get(sr.request_id)
                )
            end = sr.end
            if sr.num_lookahead:
                # Verified drafts: the accepted ones (all new tokens but the last) were
                # computed; the rest of the step's K/V is overwritten by later steps.
                end = min(sr.start + max(1, new), req.num_tokens - 1)
            req.num_computed_tokens = end
            self._register_full_pages(req, sr.start, end)
            if sr.followers and new:
                done += self._fork(req, sr, sampled, logprobs)
            if sr.num_lookahead:
                # Pages reserved for rejected drafts that the known tokens no longer reach.
                keep = _cdiv(req.num_tokens, self.page_size)
                for alloc, table in zip(self.allocators, req.block_tables):
                    if len(table) > keep:
                        alloc.free(reversed(table[keep:]))
                        del table[keep:]
            self._release_window_pages(req)
            reason = finished.pop(sr.request_id, None)
            if req.is_finished:  # a stop rule or the length limit, in commit_tokens
                self._finish(req, req.status)
                done.append(req)
            elif reason is not None:
                self._finish_with(req, reason)
                done.append(req)
        for rid, reason in finished.items():  # unscheduled requests the engine ends
            req = self._requests.get(rid)
            if req is not None:
                self._finish_with(req, reason)
                done.append(req)
        return done

    def _fork(self, leader: Request, sr: ScheduledRequest, sampled, logprobs) -> list[Request]:
        """Start the leader's waiting followers on its prompt pages, each with its sampled
        token(s); returns those that finished at once. Followers without tokens (or
        aborted since schedule()) are queued on their own or skipped."""
        prompt_len = sr.end
        pages = leader.block_table[: _cdiv(prompt_len, self.page_size)]
        hashes = leader.block_hashes[: prompt_len // self.page_size]
        done = []
        for f in list(self._followers.get(leader.request_id, ())):
            tokens = sampled.get(f.request_id)
            if f not in sr.followers or not tokens:
                continue
            self._followers[leader.request_id].remove(f)
            del self._leader_of[f.request_id]
            self.allocator.share(pages)
            f.block_table = list(pages)
            f.block_hashes = list(hashes)
            f.num_computed_tokens = prompt_len
            f.num_cached_tokens = leader.num_cached_tokens
            f.status = RequestStatus.RUNNING
            self._running.append(f)
            commit_tokens(f, tokens, self.max_model_len, logprobs.get(f.request_id))
            if f.is_finished:
                self._finish(f, f.status)
                done.append(f)
        if not self._followers.get(leader.request_id, True):
            del self._followers[leader.request_id]
        self._release_followers(leader)  # those the engine gave no token: on their own
        return done

    def _finish_with(self, req: Request, reason: str) -> None:
        status = FINISH_REASONS[reason]
        error = None
        if status is RequestStatus.FINISHED_ERROR and req.error is None:
            error = "the engine reported an error for this request"
        self._finish(req, status, error)

    def _register_full_pages(self, req: Request, start: int, end: int) -> None:
        """Publish the pages that became full when positions [start, end) were computed."""
        if not self.enable_prefix_caching:
            return
        first, last = start // self.page_size, end // self.page_size
        if last > first:
            self._extend_hashes(req, last)
            for alloc, table in zip(self.allocators, req.block_tables):
                for j in range(first, last):
                    alloc.register(table[j], req.block_hashes[j])

    # ---- introspection -----------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def num_waiting(self) -> int:
        """Requests waiting for admission, preempted ones included."""
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def kv_usage(self) -> float:
        """Fraction of allocatable pages referenced by requests (evictable cache counts as
        free); with several page groups, that of the fullest group (the one admission and
        preemption run into first)."""
        return max(self.kv_usage_per_group())

    def kv_usage_per_group(self) -> list[float]:
        """kv_usage of each page group, in group order."""
        return [a.num_used() / (a.num_pages - 1) for a in self.allocators]

    def prefix_hit_rate(self) -> float:
        """Of the tokens known at admissions, the fraction served by the prefix cache."""
        return self.allocator.stats.hit_rate

    def check_invariants(self) -> None:
        """Raise AssertionError unless every page is owned exactly as the requests say.

        Assumes the scheduler's requests are the allocator's only users.
        """
        size = self.page_size
        for alloc in self.allocators:
            alloc.check_invariants()
        running_ids = [r.request_id for r in self._running]
        waiting_ids = [r.request_id for r in self._waiting]
        assert len(set(running_ids)) == len(running_ids), "a request is running twice"
        assert len(set(waiting_ids)) == len(waiting_ids), "a request is waiting twice"
        assert not set(running_ids) & set(waiting_ids), "a request is running and waiting"
        assert set(running_ids) | set(waiting_ids) | set(self._leader_of) == set(self._requests), (
            "request lost"
        )
        assert len(self._running) <= self.max_num_seqs, "more running than max_num_seqs"
        refs = [collections.Counter() for _ in self.allocators]
        for req in self._running:
            rid, nc = req.request_id, req.num_computed_tokens
            assert req.status is RequestStatus.RUNNING, f"{rid}: status {req.status}"
            assert 0 <= nc < req.num_tokens, f"{rid}: num_computed_tokens={nc}"
            assert len(req.block_tables) == len(self.allocators), f"{rid}: groups lost"
            hashes = req.block_hashes
            assert hashes == page_hashes(req.token_ids_slice(0, len(hashes) * size), size), (
                f"{rid}: stale block_hashes"
            )
            for g, (alloc, table) in enumerate(zip(self.allocators, req.block_tables)):
                assert len(table) == len(req.block_table), f"{rid}: group tables differ"
                assert _cdiv(nc, size) <= len(table) <= _cdiv(req.num_tokens, size), (
                    f"{rid}: {len(table)} pages for {nc} computed of {req.num_tokens} tokens"
                )
                # A windowed group holds exactly the pages its window reaches from nc on.
                lo = self._window_start(g, nc)
                assert all(p == NULL_PAGE for p in table[:lo]), f"{rid}: group {g} kept {table}"
                held = table[lo:]
                assert NULL_PAGE not in held, f"{rid}: null page in block table"
                assert len(set(held)) == len(held), f"{rid}: page twice in block table"
                refs[g].update(held)
                # Pages still being written are not in the prefix cache, and private except a
                # partly computed page shared by forked samples (copied before its next write).
                for j, page in enumerate(table[nc // size :], start=nc // size):
                    shared_ok = j == nc // size and nc % size
                    assert alloc.refcount(page) == 1 or shared_ok, (
                        f"{rid}: page {page} written while shared"
                    )
                    assert alloc.page_hash_of(page) is None, (
                        f"{rid}: page {page} written while cached"
                    )
                for j, page in enumerate(table[: nc // size]):
                    h = alloc.page_hash_of(page) if page != NULL_PAGE else None
                    assert h is None or (j < len(hashes) and hashes[j] == h), (
                        f"{rid}: page {page} cached under another prefix"
                    )
        for req in self._running + list(self._waiting):
            assert len(req.output_token_ids) <= req.max_tokens, f"{req.request_id}: too long"
            assert req.num_tokens <= self.max_model_len, f"{req.request_id}: past max_model_len"
        for leader, followers in self._followers.items():
            assert leader in self._requests and followers, f"{leader}: stale followers"
            for f in followers:
                assert self._leader_of[f.request_id] == leader, f"{f.request_id}: leader"
                assert f.status is RequestStatus.WAITING and not f.block_table, f.request_id
        assert len(self._leader_of) == sum(len(f) for f in self._followers.values())
        assert self._seats_used() <= self.max_num_seqs, "followers' seats overbooked"
        for req in self._waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), req.status
            assert not any(req.block_tables) and req.num_computed_tokens == 0, (
                f"{req.request_id}: waiting request holds pages or computed tokens"
            )
        for g, alloc in enumerate(self.allocators):
            for page in range(1, alloc.num_pages):
                assert alloc.refcount(page) == refs[g][page], (
                    f"group {g} page {page}: refcount {alloc.refcount(page)} but "
                    f"{refs[g][page]} block tables"
                )
