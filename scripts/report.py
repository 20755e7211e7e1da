"""The benchmarks' output, written once: an aligned text table and a JSON file that says
which machine produced it.

    report.print_table(["run", "tok/s"], [["decode", "44.3"]])
    report.write_json(FLAGS.json, result)   # adds result["machine"] = machine_info()

Results quoted in notes name the command; the machine block names where it ran (backend,
device kind, CPU, cores, jax version, load average), since speeds on a shared machine
depend on all of these.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence

import jax


def machine_info() -> dict:
    """Where a result was measured."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "load_average": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Columns as wide as their widest cell; the first left-aligned, the rest right-aligned.
    Cells are printed with str(): format numbers before passing them."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"table row {row} has {len(row)} cells for {len(headers)} headers")
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    out = [line(cells[0]), "-" * len(line(cells[0]))]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    print(format_table(headers, rows), flush=True)


def write_json(path: str | None, result: dict, *, machine: bool = True) -> None:
    """Write result to path (creating its directory); a no-op for path None or ''. With
    machine, result gains a "machine" entry (`machine_info`) unless it has one."""
    if not path:
        return
    if machine and "machine" not in result:
        result = {**result, "machine": machine_info()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}")


__all__ = ["format_table", "machine_info", "print_table", "write_json"]
