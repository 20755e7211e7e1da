"""Multi-process start-up: `jax.distributed` for a job spread over several hosts.

`initialize_distributed` must run before anything touches the jax backend (`jax.devices()`,
any computation); the mesh (`sharding.make_mesh`) then spans every process's devices, and
the sharded loaders (`load_hf(..., mesh=...)`) read on each host only the slices its devices
hold. On one process it does nothing, so scripts call it unconditionally.
"""

from __future__ import annotations

import os

import jax


def _launched_multiprocess() -> bool:
    """Whether a launcher started several processes: jax's own JAX_COORDINATOR_ADDRESS, or
    a Slurm / Open MPI job of more than one task (jax's cluster detection reads the rest)."""
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "1")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise ValueError(f"environment variable {name}={value!r} is invalid: must be an int >= 0")
    return int(value)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
) -> bool:
    """Start `jax.distributed` for a multi-process job; returns whether it is running.

    A no-op (False) for a single process: num_processes == 1, or nothing given, auto_detect
    off and no multi-process launcher (JAX_COORDINATOR_ADDRESS, Slurm or Open MPI with more
    than one task). Otherwise unset values are auto-detected by jax (TPU pods, Slurm, Open
    MPI). Must run before anything touches the jax backend (jax.devices(), any computation).

    Unset num_processes and process_id are read from JAX_NUM_PROCESSES and JAX_PROCESS_ID
    when set (`scripts/launch_local.py` sets them with JAX_COORDINATOR_ADDRESS). On CPU the
    processes' collectives run over gloo (TCP), jax's default CPU implementation.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes is None and process_id is None:
        # A local launcher (scripts/launch_local.py) names both in the environment.
        num_processes = _env_int("JAX_NUM_PROCESSES")
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None:
        if (
            not isinstance(num_processes, int)
            or isinstance(num_processes, bool)
            or num_processes < 1
        ):
            raise ValueError(f"num_processes={num_processes!r} is invalid: must be an int >= 1")
        if num_processes == 1:
            return False
    if process_id is not None and (
        not isinstance(process_id, int)
        or process_id < 0
        or (num_processes is not None and process_id >= num_processes)
    ):
        raise ValueError(
            f"process_id={process_id!r} is invalid: must be an int in [0, num_processes="
            f"{num_processes})"
        )
    given = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not (given or auto_detect or _launched_multiprocess()):
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


__all__ = ["initialize_distributed"]
