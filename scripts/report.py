"""The benchmarks' output, written once: an aligned text table and a JSON file that says
which machine produced it.

    report.print_table(["run", "tok/s"], [["decode", "44.3"]])
    report.write_json(FLAGS.json, result)   # adds result["machine"] = machine_info()

Results quoted in notes name the command; the machine block names where it ran (backend,
device kind, CPU, cores, CPU features, jax version, load average), since speeds on a shared
machine depend on all of these. A benchmark that calls `ceiling()` (the machine's read
bandwidth and best matmul rate per dtype, measured once per process, see
jax_infer/eval/ceiling.py) prints results as a share of it, and the machine block carries it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Sequence

import jax

from jax_infer.cpu import build as cpu_build
from jax_infer.eval import ceiling as ceiling_probe

_CEILING: list = []  # the probe, once measured in this process


def machine_info() -> dict:
    """Where a result was measured."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cpu_features": cpu_build.cpu_features().names(),
        "jax": jax.__version__,
        "load_average": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def ceiling() -> ceiling_probe.Ceiling:
    """This machine's ceilings, measured on the first call in this process (a few seconds)."""
    if not _CEILING:
        _CEILING.append(ceiling_probe.probe())
    return _CEILING[0]


def share(value: float, of: float) -> str:
    """A result as a percentage of its ceiling, as the tables print it."""
    return f"{100.0 * value / of:.0f}%"


# A number as the tables print one: 12, -3.5, 1.2e-05, 2.02x, 0.25/0.99.
_NUMBER = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?x?(/[-+]?[\d.,]+(e[-+]?\d+)?)?")


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Columns as wide as their widest cell: numeric columns (every cell a number) right-
    aligned, the others left-aligned. Cells are printed with str(): format numbers first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"table row {row} has {len(row)} cells for {len(headers)} headers")
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(_NUMBER.fullmatch(row[i]) for row in cells[1:])
        for i in range(len(headers))
    ]

    def line(row):
        parts = (
            cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)
        )
        return "  ".join(parts).rstrip()

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
        if _CEILING:
            result["machine"]["ceiling"] = _CEILING[0].as_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}")


__all__ = ["ceiling", "format_table", "machine_info", "print_table", "share", "write_json"]
