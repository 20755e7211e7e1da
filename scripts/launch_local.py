"""Run a multi-process (multi-controller) JAX job on one machine: the pod code path on a laptop.

python scripts/launch_local.py --num_processes 2 -- scripts/generate.py --model=DIR \
    --mesh_data=2 --mesh_model=4

Starts N copies of the script (a `.py` path or `-m module`, run with this Python; or any
command), each
with `JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i`,
`JAX_PLATFORMS=cpu` and `JAX_NUM_CPU_DEVICES=--devices_per_process` in its environment.
`jax_infer.distributed.initialize_distributed()` (which every script calls through its mesh
flags) reads them and starts `jax.distributed` with gloo CPU collectives, so the N processes
form one mesh of N * devices_per_process simulated devices.

The launcher watches its children: the first that exits non-zero (or is killed) stops the
others, and the launcher exits non-zero with a line naming that process; so does passing
--timeout. Each child runs in its own process group and the whole group is stopped
(SIGTERM, then SIGKILL after --grace seconds), so nothing a child started outlives the job.
Ctrl-C or SIGTERM to the launcher stops every child the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

EXIT_CHILD_FAILED = 1
EXIT_TIMEOUT = 124


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" not in argv:
        raise SystemExit(
            "usage: launch_local.py [--num_processes N] [--devices_per_process D] -- "
            "SCRIPT [ARGS...]   (the command follows a literal '--')"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds (0: none)")
    parser.add_argument("--grace", type=float, default=5.0, help="SIGTERM-to-SIGKILL seconds")
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    if args.num_processes < 1:
        parser.error(f"--num_processes={args.num_processes} is invalid: must be >= 1")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process={args.devices_per_process} is invalid: must be >= 1")
    if not args.command:
        parser.error("no command after '--': give the script to run and its flags")
    return args


def child_env(args, process_id: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(args.num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(args.devices_per_process),
    )
    return env


def stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every live child's process group, then SIGKILL what is left after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None or sig == signal.SIGKILL:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
    for p in procs:
        p.wait()


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(args) -> int:
    port = args.port or free_port()
    command = list(args.command)
    if command[0].endswith(".py") or command[0] == "-m":
        command = [sys.executable, *command]
    procs: list[subprocess.Popen] = []
    interrupted: list[int] = []

    def on_signal(signum, frame):
        interrupted.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    try:
        for i in range(args.num_processes):
            procs.append(
                subprocess.Popen(command, env=child_env(args, i, port), start_new_session=True)
            )
        print(
            f"launch_local: {args.num_processes} processes x {args.devices_per_process} CPU "
            f"devices, coordinator 127.0.0.1:{port}, pids {[p.pid for p in procs]}",
            file=sys.stderr,
            flush=True,
        )
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(
                    f"launch_local: process {i} (pid {procs[i].pid}) {describe(code)}; "
                    "stopping the other processes",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_CHILD_FAILED
            if all(c == 0 for c in codes):
                return 0
            if interrupted:
                name = signal.Signals(interrupted[0]).name
                print(f"launch_local: got {name}; stopping all processes", file=sys.stderr)
                return 128 + interrupted[0]
            if args.timeout and time.monotonic() - start > args.timeout:
                print(
                    f"launch_local: --timeout={args.timeout:g}s passed; stopping all processes",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_TIMEOUT
            time.sleep(0.1)
    finally:
        stop(procs, args.grace)
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    return launch(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
