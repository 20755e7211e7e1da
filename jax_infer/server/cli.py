"""Running the server: `run_server` (uvicorn over the app) and the `jax-infer` console command.

`jax-infer serve --port 8000 ...` runs scripts/serve.py, whose flags are the scripts' shared
groups (scripts/shared_flags.py); scripts/ ships with a source checkout (an editable install),
not inside the package.

Test hook: with JAX_INFER_TEST_FAULT_SEED=<int> in the environment, every engine step that
schedules a request sampled with that seed raises inside the step (`LLMEngine.fault_hook`),
so tests can provoke a failed step through the API (`"seed": <int>`) on a shared server
whatever ran before. Never set it in service.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import uvicorn

from jax_infer import lockstep
from jax_infer.server.app import ServerConfig, build_app
from jax_infer.server.async_engine import DEAD, SHUTTING_DOWN, AsyncEngine

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """SIGTERM (or SIGINT) drains: new requests get 503 while those in flight have up to
    `shutdown_timeout` seconds to finish (the rest end with finish_reason "abort"); then
    uvicorn closes the listener and the connections and `run()` returns, so the process exits
    0. A second signal stops at once (what is still running gets a 503)."""

    def __init__(self, config: uvicorn.Config, front: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.front = front
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's own handler would re-raise the signal after shutting down (exit -15):
        # a drained shutdown is a clean one.
        if self._draining:
            log.warning("second signal: stopping now")
            self.front.shutdown(SHUTTING_DOWN, timeout=0)
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        log.info("draining: up to %.1f s for the requests in flight", self.shutdown_timeout)
        self.front.drain(self.shutdown_timeout, on_drained=self._drained)
        # Should the engine thread be stuck in a step, exit anyway.
        watchdog = threading.Timer(self.shutdown_timeout + 10, self._drained)
        watchdog.daemon = True
        watchdog.start()

    def _drained(self) -> None:
        self.should_exit = True  # uvicorn's main loop polls it


FAULT_SEED_ENV = "JAX_INFER_TEST_FAULT_SEED"


def seed_fault_hook(seed: int):
    """A `LLMEngine.fault_hook` failing each step that schedules a request seeded `seed`."""

    def fault_hook(engine, out) -> None:
        for s in out.scheduled:
            if s.request.sampling_params.seed == seed:
                raise RuntimeError(
                    f"injected test fault ({FAULT_SEED_ENV}={seed}) in step {engine.num_steps}"
                )

    return fault_hook


def with_test_faults(make_engine: Callable[[], object]) -> Callable[[], object]:
    """make_engine, with the fault hook of JAX_INFER_TEST_FAULT_SEED set when it is."""
    value = os.environ.get(FAULT_SEED_ENV)
    if not value:
        return make_engine
    seed = int(value)

    def make():
        engine = make_engine()
        log.warning("test hook: steps scheduling a request with seed=%d will fail", seed)
        engine.fault_hook = seed_fault_hook(seed)
        return engine

    return make


def run_server(
    make_engine: Callable[[], object],
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_waiting_requests: int | None = None,
    shutdown_timeout: float = 30.0,
    log_level: str = "info",
) -> int:
    """Serve until SIGINT/SIGTERM, then drain for up to `shutdown_timeout` seconds (see
    `_Server`). make_engine runs on the engine thread: /health answers 503 until it returns.

    In a multi-process job (jax.distributed started, `jax.process_count() > 1`) every
    process calls this: process 0 serves HTTP over a `lockstep.LeaderEngine`, the others
    build the same engine and replay its steps (`lockstep.follow`), serving nothing. Returns
    the exit status: 0, or (several processes) 1 when process 0's engine never came up or
    died, so the launcher stops the job."""
    make_engine = with_test_faults(make_engine)
    if jax.process_count() > 1 and jax.process_index() != 0:
        return _follow(make_engine)
    leader, channel = [], None
    if jax.process_count() > 1:
        channel = lockstep.Channel()
        make_engine = _leading(make_engine, channel, leader, lambda: server)
    front = AsyncEngine(make_engine, max_waiting_requests=max_waiting_requests)
    app = build_app(front, config)
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
    )
    server = _Server(uv_config, front, shutdown_timeout)
    if channel is None:
        server.run()
        return 0
    clean = False
    try:
        server.run()
        clean = front.state != DEAD and bool(leader)
    finally:
        # Whatever ended the server (a drain, a dead engine, a port in use), the followers
        # must not wait for steps that will never come.
        error = None if clean else (front.error or "process 0's server stopped")
        if leader:
            leader[0].stop(error)
        else:
            channel.abort(f"{error} before its engine was ready")
    return 0 if clean else 1


def _leading(make_engine, channel, leader: list, server: Callable[[], _Server]):
    """Process 0's make_engine: the engine wrapped in a LeaderEngine (kept in `leader`); a
    failed build stops the server, so the launcher sees process 0 exit and stops the job."""

    def make():
        try:
            engine = lockstep.LeaderEngine(make_engine(), channel)
        except BaseException:
            server().should_exit = True
            raise
        leader.append(engine)
        return engine

    return make


def _follow(make_engine) -> int:
    """A follower: no HTTP, no output; the engine replays process 0's steps until it stops."""
    lockstep.ignore_sigterm_while_following()
    logging.getLogger("jax_infer").setLevel(logging.WARNING)  # process 0 says it all
    engine = make_engine()
    try:
        stats = lockstep.follow(engine)
    except lockstep.LockstepError as e:
        raise SystemExit(f"process {jax.process_index()}: {e}") from e
    log.info("process %d followed %d steps", jax.process_index(), stats.steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`jax-infer serve [flags]`."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] != "serve":
        print("usage: jax-infer serve [--model ...] [--port 8000] [--help]", file=sys.stderr)
        return 2
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    if not (scripts / "serve.py").is_file():
        print(
            f"jax-infer serve needs scripts/serve.py of a source checkout ({scripts})",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(scripts))
    # scripts/ is on the path only now; importing serve defines its flags.
    import serve
    from absl import app

    app.run(serve.main, argv=[str(scripts / "serve.py"), *argv[2:]])
    return 0
