"""Multi-process start-up (`jax_infer.distributed`): a no-op on one process, errors named."""

from __future__ import annotations

import pytest

from jax_infer import distributed


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize_distributed() is False
    assert (
        distributed.initialize_distributed("10.0.0.1:1234", num_processes=1, process_id=0) is False
    )
    with pytest.raises(ValueError, match="process_id=2 is invalid"):
        distributed.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="num_processes=0 is invalid"):
        distributed.initialize_distributed(num_processes=0)


def test_launcher_detection(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed._launched_multiprocess()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed._launched_multiprocess()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed._launched_multiprocess()
