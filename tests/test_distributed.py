"""Multi-process start-up (`jax_infer.distributed`): a no-op on one process, errors named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_launcher_environment_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed.initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is invalid"):
        distributed.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="process_id=2 is invalid"):
        distributed.initialize_distributed()


# -- scripts/launch_local.py without jax: plain Python children ------------------------

LAUNCHER = Path(__file__).resolve().parent.parent / "scripts" / "launch_local.py"
# Process 1 fails (or sleeps with "hang"); process 0 records its pid, then sleeps.
CHILD = (
    "import os, sys, time\n"
    "i = int(os.environ['JAX_PROCESS_ID'])\n"
    "open(os.path.join(sys.argv[1], f'pid{i}'), 'w').write(str(os.getpid()))\n"
    "assert os.environ['JAX_COORDINATOR_ADDRESS'].startswith('127.0.0.1:')\n"
    "assert os.environ['JAX_NUM_CPU_DEVICES'] == '3'\n"
    "if i == 1 and sys.argv[2] == 'fail':\n"
    "    time.sleep(1); sys.exit(3)\n"
    "if sys.argv[2] != 'ok':\n"
    "    time.sleep(300)\n"
)


def run_launcher(tmp_path, mode: str, *flags: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run(
        [sys.executable, str(LAUNCHER), "--num_processes=2", "--devices_per_process=3"]
        + list(flags)
        + ["--", str(script), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )


def child_pids(tmp_path) -> list[int]:
    return [int((tmp_path / f"pid{i}").read_text()) for i in range(2)]


def test_launcher_runs_every_process(tmp_path):
    proc = run_launcher(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    assert len(set(child_pids(tmp_path))) == 2


def test_launcher_stops_the_rest_when_one_fails(tmp_path):
    proc = run_launcher(tmp_path, "fail")
    pids = child_pids(tmp_path)
    assert proc.returncode == 1
    assert f"process 1 (pid {pids[1]}) exited with code 3" in proc.stderr
    assert not any(process_alive(p) for p in pids)


def test_launcher_timeout_stops_everything(tmp_path):
    proc = run_launcher(tmp_path, "hang", "--timeout=3", "--grace=1")
    assert proc.returncode == 124
    assert "--timeout=3s passed" in proc.stderr
    assert not any(process_alive(p) for p in child_pids(tmp_path))


def test_launcher_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), "--num_processes=0", "--", "x.py"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--num_processes=0 is invalid" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), "x.py"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "literal '--'" in proc.stderr


def process_alive(pid: int) -> bool:
    """Whether pid names a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
