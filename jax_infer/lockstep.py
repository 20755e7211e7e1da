"""One engine over several processes: process 0 decides, every process runs the same steps.

Multi-controller JAX runs a sharded step only when every process calls it, with the same
global arrays. The engine's host side is deterministic: the same `add_request` and `abort`
calls in the same order, each batch followed by the same `step()`, give every process the
same schedule, the same drawn seeds and the same step inputs (`LLM.generate` on several
processes relies on this already). So serving needs only the requests broadcast, not the
steps: process 0 (the leader, the only one with an HTTP server) wraps its engine in
`LeaderEngine`, which records each add_request/abort and, at every `step()`, publishes the
calls recorded since the last step as message n through the `jax.distributed` key-value
store; each other process (a follower) runs `follow(engine)`: read message n, replay its
calls, step, repeat, until a stop message.

Why replay rather than broadcast the step's arrays: a message is the new requests' token ids
and sampling params (tens of bytes for a plain decode step), the followers need no second
engine code path (speculative drafts, grammar masks, prefix cache and preemption all follow
from the same calls), and a follower's state equals the leader's by construction. What it
requires: identical engines (`engine_fingerprint`, checked when a follower starts), and no
host decision that reads a clock or per-process state (the scheduler orders by calls, not
arrival times; the server's deadlines act through aborts, which are replayed).

Keys are `jax_infer/lockstep/{n}/{follower}`, one per follower, each deleted by its reader,
so the store holds at most the messages not yet read. A step whose device work fails on
every process (the engine isolates it, `LLMEngine.step`) stays in lockstep; an exception out
of the leader's `step()` publishes a stop with the error, so the followers exit non-zero and
the launcher stops the job.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import signal
import threading
import time

import jax

log = logging.getLogger(__name__)

KEY_PREFIX = "jax_infer/lockstep"
# A follower waits for the next message in slices of this many ms (an idle server sends none).
POLL_MS = 1000
# Message ops: ("add", prompt, params, request_id), ("abort", request_id), then exactly one
# of ("step",) or ("stop", error or None) last.
STEP, STOP, ADD, ABORT = "step", "stop", "add", "abort"


class LockstepError(RuntimeError):
    """The processes' engines differ, or the leader stopped with an error."""


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise LockstepError(
            "lockstep serving needs jax.distributed (jax_infer.distributed.initialize_distributed"
            "() first); this process runs alone"
        )
    return client


class Channel:
    """Messages from process 0 to every other process, in order, through the key-value store
    of `jax.distributed` (the coordinator's, reachable by every process)."""

    def __init__(self, name: str = "serve", client=None, poll_ms: int = POLL_MS):
        self.client = client or _client()
        self.poll_ms = poll_ms
        self.prefix = f"{KEY_PREFIX}/{name}"
        self.num_processes = jax.process_count()
        self.process = jax.process_index()

    def key(self, n: int, follower: int) -> str:
        return f"{self.prefix}/{n}/{follower}"

    def publish(self, n: int, payload: bytes) -> None:
        for follower in range(1, self.num_processes):
            self.client.key_value_set_bytes(self.key(n, follower), payload)

    def abort(self, reason: str) -> None:
        """Process 0 goes away without a stop message in order (its server failed before its
        engine was up): the followers raise LockstepError with `reason` when next idle."""
        self.client.key_value_set_bytes(f"{self.prefix}/abort", reason.encode())

    def receive(self, n: int, should_stop=lambda: False) -> bytes | None:
        """Message n for this process (blocking); None if should_stop() turns true first.
        LockstepError once process 0 aborted (`abort`)."""
        key = self.key(n, self.process)
        while True:
            try:
                payload = self.client.blocking_key_value_get_bytes(key, self.poll_ms)
            except Exception as e:  # jax raises its runtime error; only a timeout retries
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
                if should_stop():
                    return None
                try:
                    reason = self.client.key_value_try_get_bytes(f"{self.prefix}/abort")
                except Exception:  # NOT_FOUND: no abort
                    continue
                raise LockstepError(f"process 0 stopped: {reason.decode()}") from None
            self.client.key_value_delete(key)
            return payload


def engine_fingerprint(engine) -> dict:
    """What must be equal on every process for the same calls to give the same steps."""
    mesh = getattr(engine, "mesh", None)
    return {
        "config": repr(engine.config),
        "engine_config": repr(getattr(engine, "engine_config", None)),
        "max_model_len": engine.max_model_len,
        "dtype": str(getattr(engine, "dtype", None)),
        "mesh": None if mesh is None else dict(mesh.shape),
        "vocab": len(engine.tokenizer) if hasattr(engine.tokenizer, "__len__") else None,
    }


class LeaderEngine:
    """Process 0's engine: the wrapped engine, whose add_request/abort calls are recorded and
    published with each step (message 0 is the engine's fingerprint). Everything else
    (stats, tokenizer, config...) is the wrapped engine's."""

    def __init__(self, engine, channel: Channel | None = None):
        self.engine = engine
        self.channel = channel if channel is not None else Channel()
        self._lock = threading.Lock()  # the calls and their order, against a concurrent stop
        self._calls: list[tuple] = []
        self._n = 0
        self.stopped = False
        self.message_bytes = 0  # published, over all messages (one follower's copy)
        self._send(("hello", engine_fingerprint(engine)))

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _send(self, *ops) -> None:
        payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        self.channel.publish(self._n, payload)
        self._n += 1
        self.message_bytes += len(payload)

    def add_request(self, prompt, sampling_params=None, request_id=None) -> str:
        with self._lock:
            self._check_running()
            # The leader checks first: a refused request (ValueError) is never replayed.
            rid = self.engine.add_request(prompt, sampling_params, request_id=request_id)
            self._calls.append((ADD, prompt, sampling_params, request_id))
            return rid

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._check_running()
            self._calls.append((ABORT, request_id))
            return self.engine.abort(request_id)

    def step(self):
        with self._lock:
            self._check_running()
            calls, self._calls = self._calls, []
            self._send(*calls, (STEP,))
            try:
                return self.engine.step()
            except BaseException as e:
                self._stop(f"process 0's engine step raised {type(e).__name__}: {e}")
                raise

    def stop(self, error: str | None = None) -> None:
        """Tell the followers to exit (non-zero with `error`); later calls raise."""
        with self._lock:
            self._stop(error)

    def _stop(self, error: str | None) -> None:
        if not self.stopped:
            self.stopped = True
            self._send((STOP, error))

    def _check_running(self) -> None:
        if self.stopped:
            raise LockstepError("the lockstep engine is stopped")


@dataclasses.dataclass
class FollowStats:
    steps: int = 0
    requests: int = 0
    aborts: int = 0
    wait_s: float = 0.0  # blocked on the next message (idle server included)


def follow(engine, channel: Channel | None = None, should_stop=lambda: False) -> FollowStats:
    """A follower's loop: replay process 0's calls on `engine`, step by step, until process 0
    stops (returns) or stops with an error (LockstepError). should_stop: checked while idle;
    True returns at once (the caller is going away)."""
    channel = channel or Channel()
    stats = FollowStats()
    n = 0
    while True:
        start = time.perf_counter()
        payload = channel.receive(n, should_stop)
        stats.wait_s += time.perf_counter() - start
        if payload is None:
            return stats
        n += 1
        ops = pickle.loads(payload)
        for op in ops:
            kind = op[0]
            if kind == "hello":
                mine = engine_fingerprint(engine)
                differ = sorted(k for k in mine if mine[k] != op[1].get(k))
                if differ:
                    raise LockstepError(
                        f"process {channel.process}'s engine differs from process 0's in "
                        + "; ".join(
                            f"{k}: {mine[k]!r} here, {op[1].get(k)!r} there" for k in differ
                        )
                        + ": start every process with the same flags"
                    )
            elif kind == ADD:
                engine.add_request(op[1], op[2], request_id=op[3])
                stats.requests += 1
            elif kind == ABORT:
                engine.abort(op[1])
                stats.aborts += 1
            elif kind == STEP:
                engine.step()
                stats.steps += 1
            elif kind == STOP:
                if op[1] is not None:
                    raise LockstepError(f"process 0 stopped: {op[1]}")
                return stats
            else:
                raise LockstepError(f"unknown lockstep message {kind!r}")


def ignore_sigterm_while_following() -> None:
    """A follower's SIGTERM/SIGINT (the launcher signals every process at once) must not cut
    the steps process 0 is still draining: the follower goes on until process 0's stop
    message (or until process 0, which hosts the key-value store, is gone)."""

    def handler(signum, frame):
        log.info("%s: following process 0's shutdown", signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


__all__ = [
    "Channel",
    "FollowStats",
    "LeaderEngine",
    "LockstepError",
    "engine_fingerprint",
    "follow",
    "ignore_sigterm_while_following",
]
