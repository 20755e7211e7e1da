"""One generation request: the one record the scheduler, the engine and its outputs share.

It holds the tokens (prompt + output, one list each), the KV-cache bookkeeping the scheduler
keeps, and what the engine needs to sample and report it (sampling params, seed, the
detokenizer and the streaming cursor), and the one rule for appending sampled tokens to it
(`commit_tokens`: eos, stop tokens, stop strings and the length limit, decided once).

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
  with several page groups (sliding-window layers, see scheduler.py) each group has its own
  table in `block_tables` (`block_table` is group 0's), and a windowed group's entries for
  pages its window no longer reaches are the null page 0;
* len(output_token_ids) <= max_tokens, and room(max_model_len) > 0 (a request with no room
  left was finished by `commit_tokens` with "length").
While WAITING or PREEMPTED it holds no pages and num_computed_tokens == 0.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Sequence
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
    # Page ids per page group (group 0 first), append-only; one group unless the scheduler
    # runs sliding-window layers in their own group.
    block_tables: list[list[int]] = dataclasses.field(default_factory=lambda: [[]])
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    error: str | None = None  # why it ended FINISHED_ERROR
    first_scheduled_time: float | None = None  # time.monotonic() of its first step (engine)
    # Chained page_hash of each full page of all_token_ids, as far as computed so far. A
    # function of the tokens only, so it survives preemption.
    block_hashes: list[bytes] = dataclasses.field(default_factory=list, repr=False)
    # -- sampling and output (opaque to the scheduler, which imports no sampling code) --
    sampling_params: Any = None  # SamplingParams; None in scheduler-only tests
    seed: int = 0  # per-request sampling seed (see sampling.request_key)
    prompt: str | None = None  # the prompt text, when it came as text
    detokenizer: Any = None  # tokenizer.IncrementalDetokenizer, or None: no text, no stop strings
    eos_token_ids: frozenset = frozenset()
    # Structured outputs: the engine's matcher (structured_outputs.GrammarState), or None.
    # Opaque here: `accept(token)` -> None (go on), "stop" (the grammar is complete) or an
    # error message; commit_tokens calls it for each token it appends.
    grammar: Any = None
    logprobs: list | None = None  # per output token {token id: logprob}, when asked for
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    text: str = ""  # visible output text (a matched stop string cut off)
    num_emitted_chars: int = 0  # characters of `text` already streamed
    num_emitted_tokens: int = 0  # output tokens already streamed
    # -- parallel sampling and prompt logprobs (SamplingParams.n / prompt_logprobs) --
    group_id: str | None = None  # the id the caller gave, when this is one of n samples
    sample_index: int = 0  # which of the n samples
    skip_prefix_cache: bool = False  # compute every prompt position (prompt logprobs need it)
    # Per prompt position {token id: logprob} (position 0: None), filled as chunks compute.
    prompt_logprobs: list | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)

    @property
    def block_table(self) -> list[int]:
        """Page group 0's block table (the only one without sliding-window page groups)."""
        return self.block_tables[0]

    @block_table.setter
    def block_table(self, pages: list[int]) -> None:
        self.block_tables[0] = pages

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
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def room(self, max_model_len: int) -> int:
        """Output tokens the request may still take: what max_tokens and max_model_len leave.
        The one definition of the "length" limit (commit_tokens finishes at 0)."""
        return min(self.max_tokens - len(self.output_token_ids), max_model_len - self.num_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason


# ---- the one commit path: appending tokens under the stop rules ---------------------------

# An output token sampled by a step still on the device (async scheduling, engine.py): it
# holds the token's place, and is counted for max_tokens, until `resolve_placeholder`.
PLACEHOLDER = -1


def find_stop_string(text: str, new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last `new_chars` characters of `text`.

    Returns (index where it starts, the string) or None. Only the tail can hold a new match, so
    this costs O(new_chars + longest stop) per step, not O(len(text)).
    """
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    tail_start = max(0, len(text) - new_chars - longest + 1)
    best = None
    for s in stops:
        i = text.find(s, tail_start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def stop_holdback(stops: tuple[str, ...]) -> int:
    """Characters a stream must hold back: a stop string may be completed by the next token."""
    return max((len(s) for s in stops), default=1) - 1


def commit_tokens(
    req: Request,
    tokens: Sequence[int],
    max_model_len: int,
    logprob_entries: Sequence[dict[int, float] | None] | None = None,
) -> int:
    """Append sampled tokens to `req` in order, applying the stop rules after each; returns how
    many were taken (the rest, after a stop, are dropped).

    The one commit path: plain decoding, speculative verification (accepted drafts plus one)
    and the static engine all append through here (the paged engine through
    `Scheduler.update`), so what counts as a stop (eos, stop token ids, stop strings, a
    structured-output grammar that is complete, max_tokens, the model's length limit) is
    decided once. A stop sets the request's finished
    status.
    """
    p = req.sampling_params
    for i, token in enumerate(tokens):
        if token == PLACEHOLDER:
            # Only the length limit can be told without the token; the text, stop tokens
            # and stop strings wait for `resolve_placeholder`, which also settles this status.
            req.output_token_ids.append(token)
            if p is not None and p.logprobs is not None:
                if req.logprobs is None:
                    req.logprobs = []
                req.logprobs.append(None)
            if req.room(max_model_len) <= 0:
                req.status = RequestStatus.FINISHED_LENGTH
                return i + 1
            continue
        req.output_token_ids.append(token)
        entry = logprob_entries[i] if logprob_entries is not None else None
        if entry is not None:
            if req.logprobs is None:
                req.logprobs = []
            req.logprobs.append(entry)
        reason, stop_reason = _stop(req, p, token, max_model_len)
        if reason is not None:
            finish(req, reason, stop_reason)
            return i + 1
    return len(tokens)


def has_placeholder(req: Request) -> bool:
    """Whether the request's last output token is still on the device."""
    return bool(req.output_token_ids) and req.output_token_ids[-1] == PLACEHOLDER


def resolve_placeholder(
    req: Request,
    token: int,
    max_model_len: int,
    logprob_entry: dict[int, float] | None = None,
    page_size: int | None = None,
) -> None:
    """Put the sampled `token` in place of the request's placeholder (its last output token)
    and apply the stop rules to it, as `commit_tokens` would have in a synchronous step: the
    request ends there ("stop", or "length", which a placeholder at the limit had set
    provisionally), and a request aborted meanwhile keeps the token (it was sampled before
    the abort) and ends "abort" unless the token itself ended it. Hashes of pages computed
    over the placeholder (a preempted request re-admitted) are dropped (recomputed)."""
    assert has_placeholder(req), f"request {req.request_id!r} has no placeholder"
    req.output_token_ids.pop()
    if req.logprobs is not None and req.sampling_params.logprobs is not None:
        req.logprobs.pop()
        if not req.logprobs:
            req.logprobs = None
    if page_size is not None:
        del req.block_hashes[(req.num_tokens) // page_size :]
    status = req.status
    aborted = status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)
    if status.is_finished:
        req.status = RequestStatus.RUNNING  # decided again from the real token
    commit_tokens(req, [token], max_model_len, [logprob_entry])
    if aborted and not req.is_finished:
        finish(req, status.value)


def _stop(req: Request, p, token: int, max_model_len: int):
    """(finish reason, stop reason) after `token` was appended, or (None, None)."""
    if p is not None:
        is_eos = token in req.eos_token_ids and not p.ignore_eos
        is_stop_token = token in p.stop_token_ids
        detok = req.detokenizer
        # The eos / stop token itself is not part of the text (vLLM's default).
        if detok is not None and (not (is_eos or is_stop_token) or not p.skip_special_tokens):
            before = len(detok.text)
            detok.add(token)
        if is_eos or is_stop_token:
            return "stop", token if is_stop_token else None
        if detok is not None:
            full = detok.text
            hit = find_stop_string(full, len(full) - before, p.stop)
            if hit is not None:
                index, stop = hit
                req.text = (
                    full[: index + len(stop)] if p.include_stop_str_in_output else full[:index]
                )
                return "stop", stop
            req.text = full
    if req.grammar is not None:
        verdict = req.grammar.accept(token)
        if verdict == "stop":
            return "stop", None
        if verdict is not None:
            req.error = verdict
            return "error", None
    if req.room(max_model_len) <= 0:
        return "length", None
    return None, None


def finish(
    req: Request, reason: str | None = None, stop_reason: int | str | None = None, error=None
) -> None:
    """End a request's output. `reason` sets its status ("stop", "length", "abort", "error");
    None keeps the status the scheduler gave it (an abort, a request that can never fit). A
    character cut off mid-way comes out as U+FFFD, so the text equals decode(token_ids)."""
    if reason is not None:
        req.status = FINISH_REASONS[reason]
        req.stop_reason = stop_reason
    if error is not None:
        req.error = error
    if req.detokenizer is not None:
        req.detokenizer.flush()
        # A matched stop string keeps its cut text.
        if not isinstance(req.stop_reason, str):
            req.text = req.detokenizer.text
