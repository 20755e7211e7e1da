"""Host side of paged-KV continuous batching: page allocator, requests, scheduler.

Pure Python by design (no jax or numpy import): the policy is testable without a model
and never triggers device work. The engine turns a SchedulerOutput into device arrays.
"""

from jax_infer.scheduler.allocator import (
    NULL_PAGE,
    PageAllocator,
    PrefixCacheStats,
    page_hash,
    page_hashes,
)
from jax_infer.scheduler.request import FINISH_REASONS, Request, RequestStatus
from jax_infer.scheduler.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = [
    "FINISH_REASONS",
    "NULL_PAGE",
    "PageAllocator",
    "PrefixCacheStats",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "page_hash",
    "page_hashes",
]
