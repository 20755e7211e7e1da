"""Data parallelism on the host: one `Scheduler` per data replica, behind the Scheduler's API.

Why it is shaped this way: with a mesh of `data=D` the continuous engine splits its page pool
by pages over `data`, so each data slice of devices holds a pool of its own (local page ids,
its own null page 0) and runs its own rows. The host side mirrors that exactly: D independent
schedulers, each with its own allocator over its slice, its own queues, token budget and seat
limit. A request is assigned to one replica when it arrives and stays there (its K/V lives in
that replica's pages; preemption recomputes it in the same replica). One step schedules every
replica and the engine runs all their rows in one jitted call, so D replicas compute up to D
times the rows of one per step instead of repeating the same rows D times.

Assignment is least loaded by pages: the replica with the most free pages once its queued
requests are admitted (free pages minus the pages its waiting requests need for their known
tokens), ties to the one with fewer requests, then the lower index. So a batch of equal
requests alternates between replicas, and a replica busy with long prompts gets fewer.

Pure Python like the rest of the package: no tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from jax_infer.scheduler.allocator import PrefixCacheStats
from jax_infer.scheduler.request import Request, RequestStatus
from jax_infer.scheduler.scheduler import ScheduledRequest, Scheduler, SchedulerOutput


@dataclasses.dataclass
class ReplicatedSchedulerOutput:
    """One step over every replica: `parts[d]` is replica d's SchedulerOutput; `scheduled`
    concatenates them in replica order and `replicas[i]` is the replica of `scheduled[i]`."""

    parts: list[SchedulerOutput]

    @property
    def scheduled(self) -> list[ScheduledRequest]:
        return [s for part in self.parts for s in part.scheduled]

    @property
    def replicas(self) -> list[int]:
        return [d for d, part in enumerate(self.parts) for _ in part.scheduled]

    @property
    def num_batched_tokens(self) -> int:
        return sum(p.num_batched_tokens for p in self.parts)

    @property
    def preempted(self) -> list[str]:
        return [rid for p in self.parts for rid in p.preempted]

    @property
    def page_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write page copies: none, since the engine forks no samples across
        replicas (each of n samples is its own request there); a replica's copy would be
        in its own page ids, which the pool-wide copy cannot address."""
        copies = [c for p in self.parts for c in p.page_copies]
        if copies:
            raise RuntimeError(f"page copies {copies[:4]} on a data-replicated scheduler")
        return copies

    @property
    def finished_aborted(self) -> list[str]:
        return [rid for p in self.parts for rid in p.finished_aborted]

    @property
    def finished_error(self) -> list[str]:
        return [rid for p in self.parts for rid in p.finished_error]

    @property
    def is_empty(self) -> bool:
        return all(p.is_empty for p in self.parts)


class _PrefixStats:
    """The replicas' prefix-cache counters summed (read-only view)."""

    def __init__(self, schedulers: Sequence[Scheduler]):
        self._schedulers = schedulers

    def _sum(self, name: str) -> int:
        return sum(getattr(s.allocator.stats, name) for s in self._schedulers)

    @property
    def stats(self) -> PrefixCacheStats:
        fields = ("queries", "query_tokens", "hit_tokens", "query_pages", "hit_pages")
        return PrefixCacheStats(**{f: self._sum(f) for f in fields})


class ReplicatedScheduler:
    """D schedulers, one per data replica, each over `num_pages` pages of its own slice.

    Takes the keyword arguments of `Scheduler` (applied to each replica) plus
    `num_replicas`. Offers the Scheduler methods the engine calls.
    """

    def __init__(self, *, num_replicas: int, **scheduler_kwargs):
        if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        self.replicas = [Scheduler(**scheduler_kwargs) for _ in range(num_replicas)]
        self.page_size = self.replicas[0].page_size
        self.max_model_len = self.replicas[0].max_model_len
        self._replica_of: dict[str, int] = {}
        self._requests: dict[str, Request] = {}
        # Requests ever assigned to each replica (a balance statistic).
        self.num_assigned = [0] * num_replicas
        self.allocator = _PrefixStats(self.replicas)

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    # ---- requests in and out -----------------------------------------------------------

    def _pending_pages(self, d: int) -> int:
        """Pages replica d's waiting and preempted requests need for their known tokens."""
        size = self.page_size
        return sum(
            -(-req.num_tokens // size)
            for rid, req in self._requests.items()
            if self._replica_of[rid] == d
            and req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        )

    def choose_replica(self) -> int:
        """The least loaded replica: most free pages after its queue, then fewest requests."""

        def load(d: int):
            free = self.replicas[d].allocator.num_free() - self._pending_pages(d)
            count = sum(1 for r in self._replica_of.values() if r == d)
            return (-free, count, d)

        return min(range(self.num_replicas), key=load)

    def add_request(self, request: Request) -> int:
        """Queue a fresh request on the least loaded replica; returns that replica."""
        self._forget_finished()
        d = self.choose_replica()
        self.replicas[d].add_request(request)  # raises for a bad request: nothing recorded
        self._replica_of[request.request_id] = d
        self._requests[request.request_id] = request
        self.num_assigned[d] += 1
        return d

    def replica_of(self, request_id: str) -> int | None:
        return self._replica_of.get(request_id)

    def abort(self, request_id: str) -> bool:
        d = self._replica_of.get(request_id)
        return d is not None and self.replicas[d].abort(request_id)

    def pop_finished(self) -> list[Request]:
        out = [req for s in self.replicas for req in s.pop_finished()]
        self._forget_finished()
        return out

    def get_request(self, request_id: str) -> Request | None:
        d = self._replica_of.get(request_id)
        return None if d is None else self.replicas[d].get_request(request_id)

    def _forget_finished(self) -> None:
        done = [rid for rid, req in self._requests.items() if req.is_finished]
        for rid in done:
            del self._requests[rid]
            del self._replica_of[rid]

    def preempt_all(self) -> list[str]:
        return [rid for s in self.replicas for rid in s.preempt_all()]

    # ---- scheduling --------------------------------------------------------------------

    def schedule(self, lookahead: Mapping[str, int] | None = None) -> ReplicatedSchedulerOutput:
        return ReplicatedSchedulerOutput([s.schedule(lookahead) for s in self.replicas])

    def update(
        self,
        output: ReplicatedSchedulerOutput,
        sampled: Mapping[str, Sequence[int]],
        finished: Mapping[str, str] | None = None,
        logprobs: Mapping[str, Sequence[dict | None]] | None = None,
    ) -> list[Request]:
        """Scheduler.update for each replica, with the entries of its own requests."""
        finished = dict(finished or {})
        for rid in list(sampled) + list(finished):
            if rid not in self._replica_of:
                raise ValueError(f"update names unknown request {rid!r}")
        done = []
        for d, (scheduler, part) in enumerate(zip(self.replicas, output.parts)):

            def mine(mapping, d=d):
                return {rid: v for rid, v in mapping.items() if self._replica_of[rid] == d}

            done += scheduler.update(
                part, mine(sampled), finished=mine(finished), logprobs=mine(logprobs or {})
            )
        self._forget_finished()
        return done

    # ---- introspection -----------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.replicas)

    def num_waiting(self) -> int:
        return sum(s.num_waiting() for s in self.replicas)

    def num_running(self) -> int:
        return sum(s.num_running() for s in self.replicas)

    def kv_usage(self) -> float:
        """Fraction of all replicas' allocatable pages in use."""
        used = sum(s.allocator.num_used() for s in self.replicas)
        return used / sum(s.allocator.num_pages - 1 for s in self.replicas)

    def kv_usage_per_group(self) -> list[float]:
        """kv_usage of each page group over all replicas (data replicas have one group)."""
        return [self.kv_usage()]

    def prefix_hit_rate(self) -> float:
        return self.allocator.stats.hit_rate

    def check_invariants(self) -> None:
        for s in self.replicas:
            s.check_invariants()
        for rid, d in self._replica_of.items():
            req = self._requests[rid]
            assert req.is_finished or self.replicas[d].get_request(rid) is req, (
                f"{rid}: not in its replica {d}"
            )
