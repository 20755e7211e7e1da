"""Serve the OpenAI API over HTTP.

python scripts/serve.py --port 8000
python scripts/serve.py --model smollm2-135m --max_model_len 2048 --api_key secret
jax-infer serve --port 8000          # the same, through the console entry point
python scripts/serve.py --config=configs/cpu_smollm2_f32.py --config.engine.max_num_seqs=8

Model and engine flags are the shared groups of scripts/shared_flags.py; a --config also
gives the mesh (as do --mesh_data, --mesh_model) and speculative decoding. The API key may
also come from the environment (JAX_INFER_API_KEY); /v1/* then need `Authorization: Bearer`.

Several processes (one engine over all their devices; process 0 serves, the others follow
its steps, see jax_infer/lockstep.py):
python scripts/launch_local.py --num_processes 2 --devices_per_process 4 -- \
    scripts/serve.py --mesh_data=1 --mesh_model=8 --port 8000
"""

from __future__ import annotations

import os

import shared_flags
from absl import app, flags, logging

from jax_infer import LLM
from jax_infer.server import ServerConfig, run_server

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
shared_flags.define_engine_flags()
# A server compiles every step bucket before it reports healthy (--noprecompile: on first use),
# by default on a TPU or GPU only: on a CPU every bucket of SmolLM2 took over 8 minutes on two
# cores, while one bucket compiles in seconds on first use and is stored for the next start
# (program_store.py). --precompile forces it on a CPU too.
FLAGS.set_default("precompile", None)
shared_flags.define_config_flags()
shared_flags.define_mesh_flags()
flags.adopt_module_key_flags(shared_flags)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string(
    "api_key", None, "Key required on /v1/* (default: $JAX_INFER_API_KEY; none: open)."
)
flags.DEFINE_integer(
    "max_model_len", None, "Longest prompt + completion (default: the model's, capped at 4096)."
)
flags.DEFINE_integer(
    "max_waiting_requests", None, "Answer 503 when this many requests wait (default: no limit)."
)
flags.DEFINE_float(
    "shutdown_timeout",
    30.0,
    "On SIGTERM: seconds the requests in flight get to finish (new ones get 503); the rest end "
    "with finish_reason 'abort', then the server exits 0.",
)
flags.DEFINE_string("served_model_name", None, "The model name clients send (default: --model).")
flags.DEFINE_integer("max_request_bytes", 2 * 2**20, "Largest request body (413 above).")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "uvicorn log level.")


def default_precompile() -> bool:
    """--precompile's default: on, except on a CPU (a log line says so)."""
    import jax

    if jax.default_backend() == "cpu":
        logging.info(
            "precompile off on the CPU (every step bucket takes minutes there): each step "
            "shape compiles on first use and is stored for the next start; --precompile to "
            "compile them all now"
        )
        return False
    return True


def main(argv):
    del argv
    cfg = shared_flags.apply_config()
    if FLAGS.dry_run:
        return shared_flags.dry_run(cfg)
    # llm_kwargs first: with mesh flags it starts jax.distributed, which must come before
    # anything that initializes the backend (default_precompile asks for it).
    kwargs = {**shared_flags.llm_kwargs(config=cfg), "max_model_len": FLAGS.max_model_len}
    if kwargs.get("precompile") is None:
        kwargs["precompile"] = default_precompile()
    # Progress bars (loading, then precompiling) only for a start that precompiles.
    kwargs["progress"] = bool(kwargs["precompile"])
    config = ServerConfig(
        model_name=FLAGS.served_model_name or FLAGS.model,
        api_key=FLAGS.api_key or os.environ.get("JAX_INFER_API_KEY") or None,
        max_request_bytes=FLAGS.max_request_bytes,
    )

    def make_engine():
        return LLM(**kwargs).engine

    return run_server(
        make_engine,
        config,
        host=FLAGS.host,
        port=FLAGS.port,
        max_waiting_requests=FLAGS.max_waiting_requests,
        shutdown_timeout=FLAGS.shutdown_timeout,
        log_level=FLAGS.log_level,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=shared_flags.parse_flags)
