"""Running the server: `run_server` (uvicorn over the app) and the `jax-infer` console command.

`jax-infer serve --port 8000 ...` runs scripts/serve.py, whose flags are the scripts' shared
groups (scripts/shared_flags.py); scripts/ ships with a source checkout (an editable install),
not inside the package.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn

from jax_infer.server.app import ServerConfig, build_app
from jax_infer.server.async_engine import AsyncEngine

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """On SIGINT/SIGTERM, first stop the engine front (new requests get 503, running ones
    are aborted and answered), then let uvicorn close the connections."""

    def __init__(self, config: uvicorn.Config, front: AsyncEngine):
        super().__init__(config)
        self.front = front

    def handle_exit(self, sig, frame) -> None:
        self.front.shutdown("the server is shutting down", timeout=0)
        super().handle_exit(sig, frame)


def run_server(
    make_engine: Callable[[], object],
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_waiting_requests: int | None = None,
    log_level: str = "info",
) -> None:
    """Serve until SIGINT/SIGTERM. make_engine runs on the engine thread: /health answers 503
    until it returns."""
    front = AsyncEngine(make_engine, max_waiting_requests=max_waiting_requests)
    app = build_app(front, config)
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
    )
    _Server(uv_config, front).run()


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
