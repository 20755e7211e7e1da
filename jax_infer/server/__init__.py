"""An OpenAI-compatible HTTP server over the continuous engine (FastAPI + uvicorn).

    python scripts/serve.py --port 8000          # or: jax-infer serve --port 8000

One engine thread steps the engine (`async_engine.AsyncEngine`); the routes (`app.py`) turn
OpenAI requests (`protocol.py`) into engine requests and stream their outputs back; metrics
are Prometheus (`metrics.py`). Needs the `serve` extra: pip install -e .[serve].
"""

from jax_infer.server.app import ServerConfig, build_app
from jax_infer.server.async_engine import AsyncEngine
from jax_infer.server.cli import run_server

__all__ = ["AsyncEngine", "ServerConfig", "build_app", "run_server"]
