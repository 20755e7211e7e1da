"""One generation request as the scheduler sees it: token ids and KV-cache bookkeeping.

Why it is shaped this way: there is no separate prefill mode. A request is a list of
known tokens (prompt + sampled output) and a counter `num_computed_tokens` of how many
of them already have K/V in the cache. Each step computes some of the rest; the step
whose chunk reaches the end of the known tokens samples the next one. Prompt
chunking, prefix-cache hits (start with the counter already advanced) and
recompute-after-preemption (reset the counter to 0, keep the outputs) are then all
the same mechanism.

Invariants while the request is RUNNING:
* 0 <= num_computed_tokens < num_tokens between steps (the newest token is never
  computed until the next step, so there is always something to compute);
* block_table covers at least positions [0, num_computed_tokens) and is append-only;
* len(output_token_ids) <= max_tokens.
While WAITING or PREEMPTED it holds no pages and num_computed_tokens == 0.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # never admitted yet
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; its pages were freed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish_reason string ("stop", "length", "abort", "error"), or None."""
        return self.value if self.is_finished else None


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    }
)

# The reasons an engine may pass to Scheduler.update(finished=...), and their statuses.
FINISH_REASONS = {s.value: s for s in _FINISHED}


@dataclasses.dataclass(eq=False)
class Request:
    """Scheduler state of one request; compared by identity, keyed by `request_id`."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int  # most output tokens to generate, >= 1
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = dataclasses.field(default_factory=list)  # page ids, append-only
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    error: str | None = None  # why it ended FINISHED_ERROR
    payload: Any = None  # opaque to the scheduler: sampling params, detokenizer state, ...
    # Chained page_hash of each full page of all_token_ids, as far as computed so far. A
    # function of the tokens only, so it survives preemption.
    block_hashes: list[bytes] = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt plus output so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output, as a new list."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode needs one token)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason
