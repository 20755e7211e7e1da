"""The notebooks in notebooks/: stored without outputs, and executed end to end on the CPU.

Each notebook runs in a fresh python3 kernel (nbclient) with its CPU parameters (small token
counts), importing this checkout's jax_infer. A cell that raises fails the test with the cell
and its traceback. The serving notebook starts a server process: the tests check that none is
left behind, after a clean run and after a run that fails while the server is up.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
import uuid

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ["quickstart.ipynb", "serving.ipynb"]
CELL_TIMEOUT_S = 900


def stored_notebooks() -> list[str]:
    """Every notebook in git (every one under notebooks/ outside a git checkout)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--", "*.ipynb"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    if listed:
        return sorted(os.path.join(ROOT, p) for p in listed)
    return sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_notebooks_are_stored_without_outputs():
    paths = stored_notebooks()
    assert {os.path.basename(p) for p in paths} >= set(NOTEBOOKS), paths
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            where = f"{os.path.relpath(path, ROOT)} cell {i}"
            assert cell.outputs == [], f"{where} is stored with outputs: clear them"
            assert cell.execution_count is None, f"{where} has an execution count: clear it"


def kernel_env(**overrides) -> dict:
    """The kernel runs this interpreter (the python3 kernelspec says `python`, found on PATH),
    imports this checkout, and takes the notebooks' CPU parameters."""
    return {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
        "JAX_INFER_NB_DEVICE": "cpu",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        **overrides,
    }


def execute(nb, cwd: str, env: dict):
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": cwd}},
    )
    client.execute(env=env)
    return nb


def processes_with(marker: str) -> list[str]:
    """Command lines of live processes that mention marker (Linux /proc)."""
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{path.split('/')[2]}: {cmdline}")
    return found


def assert_no_process_with(marker: str, wait_s: float = 60.0) -> None:
    deadline = time.monotonic() + wait_s
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_with(marker)
    assert not left, f"processes left behind: {left}"


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_end_to_end(name, tmp_path):
    # A marker in the served model's name finds the serving notebook's server process.
    marker = f"nbtest-{uuid.uuid4().hex[:12]}"
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    execute(nb, str(tmp_path), kernel_env(JAX_INFER_NB_SERVED_NAME=marker))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    assert "platform: local, accelerator: cpu" in outputs_text(nb)
    # Every chart reached the notebook as an image.
    images = sum("image/png" in out.get("data", {}) for c in code for out in c.outputs)
    assert images == {"quickstart.ipynb": 3, "serving.ipynb": 1}[name]
    assert_no_process_with(marker)


@pytest.mark.slow
@pytest.mark.real_model
def test_a_failing_cell_stops_the_run_and_a_killed_kernel_leaves_no_server(tmp_path):
    """A cell that raises while the server is up stops the run with its error. Then the
    kernel is killed outright (SIGKILL: no atexit, no ipykernel cleanup of its children, as
    when the OOM killer takes it): the server must still go away, before the kernel manager's
    own cleanup could signal the kernel's process group."""
    marker = f"nbtest-{uuid.uuid4().hex[:12]}"
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, "serving.ipynb"), as_version=4)
    start = next(i for i, c in enumerate(nb.cells) if "subprocess.Popen(" in c.source)
    broken = nbformat.v4.new_code_cell(
        "assert server.poll() is None, 'the server should be up'\n"
        "raise RuntimeError('deliberately broken cell')"
    )
    nb.cells.insert(start + 1, broken)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.reset_execution_trackers()
    with client.setup_kernel(env=kernel_env(JAX_INFER_NB_SERVED_NAME=marker)):
        with pytest.raises(nbclient.exceptions.CellExecutionError, match="deliberately broken"):
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
        assert processes_with(marker), "the server should be running after the failed cell"
        os.kill(client.km.provisioner.pid, signal.SIGKILL)
        assert_no_process_with(marker)
