"""An asyncio front over one `LLMEngine`, stepped by one engine thread.

Only the engine thread touches the engine (it even builds it, so /health can answer 503 while
the model loads). Handlers on the event loop send commands (add, abort, stop) through a
thread-safe queue; the thread drains it between steps, blocking on it while idle, and hands
each output to its HTTP request's asyncio queue with `loop.call_soon_threadsafe`.

Faults: the engine isolates a failed step itself (`LLMEngine.step`): that step's requests
come back with finish_reason "error" and the cause in `error`, which the routes answer with a
500 naming it, and the others go on. An exception escaping `engine.step()` (or anything else
on the thread) means the engine's state cannot be trusted: it kills the thread, the front
turns `dead` (so /health answers 503) and every pending and later request gets a 503 at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from jax_infer import compile_cache
from jax_infer.outputs import RequestOutput, child_request_ids
from jax_infer.sampling import SamplingParams
from jax_infer.server.metrics import Metrics, num_compiles
from jax_infer.server.protocol import APIError

log = logging.getLogger(__name__)

LOADING, READY, DRAINING, DEAD, STOPPED = "loading", "ready", "draining", "dead", "stopped"
SHUTTING_DOWN = "the server is shutting down"

# How often a waiting handler asks whether its client is still connected.
DISCONNECT_POLL_S = 0.2


class ClientDisconnected(Exception):
    """The HTTP client went away; its requests have been aborted."""


@dataclasses.dataclass
class Failure:
    """An error for a stream, from the engine thread."""

    status: int
    message: str


@dataclasses.dataclass(eq=False)
class Stream:
    """The engine requests of one HTTP request, and the asyncio queue their outputs reach.
    `request_ids`: one per sample, prompt by prompt (`child_request_ids` of each of
    `group_ids`, the ids the prompts are added under)."""

    request_ids: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    group_ids: list[str] = dataclasses.field(default_factory=list)

    def put(self, item) -> None:
        """Thread-safe: deliver an output (or a Failure) to the handler."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclasses.dataclass
class _Timing:
    arrival: float
    last: RequestOutput  # the request's latest output (a drain's abort repeats it, finished)
    last_token: float | None = None
    first_scheduled: float | None = None


class AsyncEngine:
    """make_engine: a callable returning an engine (`LLMEngine` or anything with its
    add_request/step/abort/has_unfinished_requests/stats, plus tokenizer, max_model_len and
    config.vocab_size), called on the engine thread."""

    def __init__(
        self,
        make_engine: Callable[[], object],
        *,
        metrics: Metrics | None = None,
        max_waiting_requests: int | None = None,
        idle_poll_s: float = 0.1,
    ):
        self._make_engine = make_engine
        self.metrics = metrics or Metrics()
        self.max_waiting_requests = max_waiting_requests
        self._idle_poll_s = idle_poll_s
        self._commands: queue.Queue = queue.Queue()
        # state and _pending_adds change under the lock, so a command is either queued before
        # the thread ends (and failed by it) or refused by submit.
        self._lock = threading.Lock()
        self.state = LOADING
        self.error: str | None = None
        self.engine = None
        self._pending_adds = 0
        self._num_waiting = 0
        # The last value of each engine counter copied into a metrics counter (_publish).
        self._counted: dict[int, float] = {}  # by id(counter)
        num_compiles()  # start counting before the engine is built
        self._ids = itertools.count()
        # Engine thread only:
        self._streams: dict[str, Stream] = {}
        self._timing: dict[str, _Timing] = {}
        self._drain_deadline: float | None = None
        self._on_drained: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="jax-infer-engine", daemon=True)

    # -- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self.state == READY and self._thread.is_alive()

    def check_ready(self) -> None:
        if self.state == LOADING:
            raise APIError(503, "the model is still loading")
        if self.state == DRAINING:
            raise APIError(503, f"{SHUTTING_DOWN}: no new requests are accepted")
        if not self.is_ready:
            raise APIError(503, f"the engine is not serving ({self.state}): {self.error}")

    def submit(self, prompts: list[tuple[list[int], SamplingParams]], prefix: str) -> Stream:
        """Queue one engine request per (prompt ids, params) (params.n samples each); raises
        APIError 503 when the engine is down or the waiting queue is full. Call on the event
        loop."""
        group_ids = [f"{prefix}-{next(self._ids)}" for _ in prompts]
        stream = Stream(
            request_ids=[
                rid
                for gid, (_, p) in zip(group_ids, prompts)
                for rid in child_request_ids(gid, p.n)
            ],
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            group_ids=group_ids,
        )
        num = len(stream.request_ids)
        with self._lock:
            self.check_ready()
            limit = self.max_waiting_requests
            waiting = self._num_waiting + self._pending_adds
            if limit is not None and waiting + num > limit:
                raise APIError(
                    503,
                    f"the waiting queue is full ({waiting} requests waiting, "
                    f"max_waiting_requests={limit}); retry later",
                )
            self._pending_adds += num
            self._commands.put(("add", stream, prompts, time.monotonic()))
        return stream

    def abort(self, stream: Stream) -> None:
        """Abort whatever of `stream` is still running (a no-op for finished requests)."""
        self._commands.put(("abort", stream))

    async def outputs(
        self, stream: Stream, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of `stream` until all its requests finish. Raises APIError for a
        failure, ClientDisconnected (after aborting) when `is_disconnected()` turns true."""
        remaining = set(stream.request_ids)
        last_check = time.monotonic()
        try:
            while remaining:
                try:
                    item = await asyncio.wait_for(stream.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    item = None
                if is_disconnected is not None and (
                    item is None or time.monotonic() - last_check > DISCONNECT_POLL_S
                ):
                    last_check = time.monotonic()
                    if await is_disconnected():
                        raise ClientDisconnected()
                if item is None:
                    continue
                if isinstance(item, Failure):
                    raise APIError(item.status, item.message)
                if item.finished:
                    remaining.discard(item.request_id)
                yield item
        finally:
            if remaining:
                self.abort(stream)

    def drain(self, timeout: float, on_drained: Callable[[], None]) -> None:
        """Stop accepting (new requests get 503) and give the requests in flight up to
        `timeout` seconds to finish; the rest then end with finish_reason "abort". Calls
        `on_drained()` (from the engine thread, or here when there is nothing to drain)."""
        with self._lock:
            if self.state == READY and self._thread.is_alive():
                self.state = DRAINING
                self.error = SHUTTING_DOWN
                self._commands.put(("drain", time.monotonic() + timeout, on_drained))
                return
            if self.state == LOADING:
                self.state, self.error = STOPPED, SHUTTING_DOWN
        on_drained()

    def shutdown(self, reason: str = SHUTTING_DOWN, timeout: float = 10.0) -> None:
        """Stop accepting, abort and fail everything pending, and join the engine thread."""
        with self._lock:
            if self.state in (LOADING, READY, DRAINING):
                self.state = STOPPED
                self.error = reason
            self._commands.put(("stop", reason))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._make_engine()
            with self._lock:
                self.engine = engine
                if self.state == LOADING:
                    self.state = READY
            while self._drain(block=not engine.has_unfinished_requests()):
                if engine.has_unfinished_requests():
                    self._step(engine)
                self._publish(engine)
                if self._drain_deadline is not None:
                    self._check_drain()
        except BaseException as e:
            log.exception("the engine thread died")
            with self._lock:
                self.state = DEAD
                self.error = f"the engine thread died: {type(e).__name__}: {e}"
        finally:
            with self._lock:
                if self.state in (LOADING, READY, DRAINING):
                    self.state = STOPPED
                message = self.error or "the engine stopped"
                self._fail_all(503, message)
            if self._on_drained is not None:  # a drain the thread did not finish
                self._on_drained()

    def _fail_all(self, status: int, message: str) -> None:
        """Fail every tracked stream and every queued command (engine thread, under lock)."""
        for stream in {id(s): s for s in self._streams.values()}.values():
            stream.put(Failure(status, message))
        self._streams.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                command[1].put(Failure(status, message))
        self._pending_adds = 0

    def _drain(self, block: bool) -> bool:
        """Run the queued commands (waiting a little for one when `block`); False on stop."""
        try:
            command = self._commands.get(timeout=self._idle_poll_s) if block else None
        except queue.Empty:
            return True
        while True:
            if command is not None and not self._execute(command):
                return False
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _execute(self, command) -> bool:
        kind = command[0]
        if kind == "add":
            _, stream, prompts, arrival = command
            with self._lock:
                self._pending_adds -= len(stream.request_ids)
            self._add(stream, prompts, arrival)
        elif kind == "abort":
            self._abort(command[1].request_ids)
        elif kind == "stop":
            self._abort(list(self._streams), reason=command[1])
            return False
        elif kind == "drain":
            _, self._drain_deadline, self._on_drained = command
        return True

    def _check_drain(self) -> None:
        """Draining: once nothing is in flight, or at the deadline after aborting what is
        (each ends with its output so far and finish_reason "abort"), report drained."""
        if self._streams and time.monotonic() < self._drain_deadline:
            return
        if self._streams:
            log.warning("shutdown timeout: aborting %d requests in flight", len(self._streams))
        for rid in list(self._streams):
            stream, last = self._streams[rid], self._timing[rid].last
            self._abort([rid])
            stream.put(
                dataclasses.replace(
                    last, finish_reason="abort", finished=True, delta_text="", delta_token_ids=[]
                )
            )
        self._drain_deadline = None
        on_drained, self._on_drained = self._on_drained, None
        on_drained()

    def _add(self, stream: Stream, prompts, arrival: float) -> None:
        added = []
        for gid, (ids, params) in zip(stream.group_ids, prompts):
            try:
                self.engine.add_request(ids, params, request_id=gid)
            except ValueError as e:  # checked by the handler already; a race is still a 400
                self._abort(added)
                stream.put(Failure(400, str(e)))
                return
            for rid in child_request_ids(gid, params.n):
                added.append(rid)
                self._streams[rid] = stream
                self._timing[rid] = _Timing(arrival, RequestOutput(rid, None, list(ids)))

    def _abort(self, request_ids, reason: str | None = None) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is None:
                continue
            self._timing.pop(rid, None)
            self.engine.abort(rid)
            self.metrics.request_success.labels(finished_reason="abort").inc()
            if reason is not None:
                stream.put(Failure(503, reason))

    def _step(self, engine) -> None:
        outputs = engine.step()  # a failed step comes back as "error" outputs; a raise is fatal
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted by us, or not a server request
                continue
            self._observe(out, now)
            if not out.finished:
                self._timing[out.request_id].last = out
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _observe(self, out: RequestOutput, now: float) -> None:
        m, timing = self.metrics, self._timing[out.request_id]
        k = len(out.delta_token_ids)
        if timing.first_scheduled is None and out.first_scheduled_time is not None:
            timing.first_scheduled = out.first_scheduled_time
            m.request_queue_time.observe(max(0.0, out.first_scheduled_time - timing.arrival))
        if k:
            if timing.last_token is None:
                m.time_to_first_token.observe(now - timing.arrival)
                k, gap = k - 1, 0.0
            else:  # several tokens at once (speculative decoding) share the gap
                gap = (now - timing.last_token) / k
            for _ in range(k):
                m.inter_token_latency.observe(gap)
            timing.last_token = now
        if out.finished:
            del self._timing[out.request_id]
            m.e2e_request_latency.observe(now - timing.arrival)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.generation_tokens.inc(len(out.token_ids))
            m.request_success.labels(finished_reason=out.finish_reason).inc()

    def _publish(self, engine) -> None:
        stats = engine.stats()
        compiled = compile_cache.stats()
        self._num_waiting = stats["num_waiting"]
        m = self.metrics
        m.num_requests_running.set(stats["num_running"])
        m.num_requests_waiting.set(stats["num_waiting"])
        m.kv_cache_usage.set(stats["kv_usage"])
        spec = stats.get("speculative") or {}
        for counter, value in (
            (m.num_preemptions, stats["num_preemptions"]),
            (m.prefix_cache_queries, stats.get("prefix_cache_queries", 0)),
            (m.prefix_cache_hits, stats.get("prefix_cache_hits", 0)),
            (m.spec_decode_num_draft_tokens, spec.get("num_draft_tokens", 0)),
            (m.spec_decode_num_accepted_tokens, spec.get("num_accepted_tokens", 0)),
            (m.num_compiles, num_compiles()),
            (m.compile_cache_hits, compiled["cache_hits"]),
            (m.num_programs_compiled, compiled["compiled"]),
            (m.compile_seconds, compiled["compile_seconds"]),
            (m.trace_seconds, compiled["trace_seconds"]),
        ):
            self._count(counter, value)
        pre = stats.get("precompile") or {}
        m.precompile_seconds.set(pre.get("seconds", 0.0))
        m.precompile_shapes.set(pre.get("shapes", 0))

    def _count(self, counter, value: float) -> None:
        """Advance `counter` to the engine's running total `value`."""
        new = value - self._counted.get(id(counter), 0)
        if new > 0:
            counter.inc(new)
        self._counted[id(counter)] = value
