"""scripts/report.py: the benchmarks' table and JSON output."""

from __future__ import annotations

import json

import pytest
import report


def test_format_table_aligns_numbers_right_and_text_left():
    text = report.format_table(
        ["metric", "value", "note"], [["decode", "44.3", "batch 1"], ["speedup", "2.02x", "k=4"]]
    )
    lines = text.split("\n")
    assert lines[0] == "metric   value  note"
    assert set(lines[1]) == {"-"}
    assert lines[2] == "decode    44.3  batch 1"
    assert lines[3] == "speedup  2.02x  k=4"
    with pytest.raises(ValueError, match="has 1 cells for 2 headers"):
        report.format_table(["a", "b"], [["x"]])


def test_write_json_adds_the_machine(tmp_path):
    path = tmp_path / "sub" / "out.json"
    report.write_json(str(path), {"tokens_per_s": 1.5})
    data = json.loads(path.read_text())
    assert data["tokens_per_s"] == 1.5
    assert {"backend", "cpu", "cores", "jax", "load_average"} <= set(data["machine"])
    report.write_json(None, {"x": 1})  # no path: nothing written, no error
