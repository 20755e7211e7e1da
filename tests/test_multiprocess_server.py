"""The OpenAI server over 2 processes x 4 simulated CPU devices (one 2x4 mesh), end to end.

`scripts/launch_local.py` starts `scripts/serve.py` twice; process 0 serves HTTP, process 1
follows its steps (`jax_infer.lockstep`). The official `openai` client sends completions and
chat, plain and streamed, some at once (rows of both data replicas in one step); greedy
outputs must equal a single-process `LLM` (SmolLM2-135M). Then SIGTERM to process 0 stops the
whole job (launcher exit 0, no process left, checked in /proc), and a second job whose
follower is killed stops with the launcher naming it.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from serving_client import wait_healthy

from jax_infer import SamplingParams
from tests.test_distributed import process_alive
from tests.test_multiprocess import finish

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 10
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
]
CHAT = [{"role": "user", "content": "What is the color of the sky?"}]


def free_ports() -> tuple[int, int]:
    """Two distinct free ports: HTTP and the jax coordinator."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


def launch(tmp: Path, ports: tuple[int, int] | None = None) -> tuple[subprocess.Popen, Path, str]:
    port, coordinator = ports or free_ports()
    log = tmp / f"job{port}.log"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "launch_local.py"),
        f"--port={coordinator}",
        "--num_processes=2",
        "--devices_per_process=4",
        "--timeout=1200",
        "--",
        str(ROOT / "scripts" / "serve.py"),
        "--model=smollm2-135m",
        "--mesh_data=2",
        "--mesh_model=4",
        f"--port={port}",
        "--max_model_len=256",
        "--num_pages=24",
        "--max_num_seqs=4",
        "--log_level=warning",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log, f"http://127.0.0.1:{port}"


def job_pids(log: Path) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"pids \[(\d+), (\d+)\]", log.read_text())
        if match:
            return [int(match[1]), int(match[2])]
        time.sleep(0.2)
    raise AssertionError(f"the launcher named no pids:\n{log.read_text()}")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mpserver")
    proc, log, url = launch(tmp)
    try:
        pids = job_pids(log)
        wait_healthy(url, proc, 900, log.read_text)
        yield {"proc": proc, "log": log, "pids": pids, "url": url}
    finally:
        finish(proc, 120)


def client(job) -> openai.OpenAI:
    if job["proc"].poll() is not None:
        lines = [x for x in job["log"].read_text().splitlines() if "[Gloo]" not in x]
        pytest.fail(f"the job exited with {job['proc'].returncode}:\n" + "\n".join(lines[-60:]))
    return openai.OpenAI(base_url=job["url"] + "/v1", api_key="none", max_retries=0, timeout=600)


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_completions_equal_one_process(job, smollm2):
    c = client(job)
    want = [o.text for o in smollm2.generate(PROMPTS, greedy())]
    extra = {"ignore_eos": True}

    def complete(prompt):
        r = c.completions.create(
            model="smollm2-135m",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_body=extra,
        )
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # rows on both replicas
        got = list(pool.map(complete, PROMPTS))
    assert got == want
    stream = c.completions.create(
        model="smollm2-135m",
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        extra_body=extra,
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == want[0]


def test_chat_equals_one_process(job, smollm2):
    c = client(job)
    want = smollm2.chat(CHAT, greedy())[0].text
    kw = dict(model="smollm2-135m", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0)
    r = c.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want
    stream = c.chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want


def test_sigterm_to_process_0_stops_the_job(job):
    """Runs after the requests (module order): process 0 drains, tells process 1 to stop,
    both exit 0 and the launcher with them."""
    proc, (p0, p1) = job["proc"], job["pids"]
    os.kill(p0, signal.SIGTERM)
    code, _ = finish(proc, 120)
    text = job["log"].read_text()
    assert code == 0, text
    assert not process_alive(p0) and not process_alive(p1)
    assert "Traceback" not in text, text


def test_a_dead_follower_stops_the_job(tmp_path):
    proc, log, url = launch(tmp_path)
    try:
        pids = job_pids(log)
        wait_healthy(url, proc, 900, log.read_text)
        os.kill(pids[1], signal.SIGKILL)
        code, _ = finish(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 1, text
    assert f"process 1 (pid {pids[1]}) was killed by SIGKILL" in text
    assert not any(process_alive(p) for p in pids)


def test_a_port_in_use_stops_the_job(tmp_path):
    """Process 0 cannot serve: its followers are told (not left waiting for steps), and the
    launcher stops the job with process 0's failure."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, log, _ = launch(tmp_path, (port, free_ports()[1]))
        code, _ = finish(proc, 600)
    text = log.read_text()
    assert code == 1, text
    assert "address already in use" in text
    assert "launch_local: process 0" in text or "process 0 stopped" in text
