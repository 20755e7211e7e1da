"""jax_infer/eval/ceiling.py: the FLOP count of a forward against a count by hand, and the
probe's figures on tiny shapes (their values are timings: only their sanity is checked)."""

from __future__ import annotations

import json
import math

import pytest
import report

from jax_infer.config import TINY_LLAMA_TEST as C
from jax_infer.eval import ceiling


def test_forward_flops_counts_projections_mlp_head_and_attention():
    d, f, v, layers = C.hidden_size, C.intermediate_size, C.vocab_size, C.num_layers
    q, kv = C.num_heads * C.head_dim, C.num_kv_heads * C.head_dim
    per_layer = 2 * d * q + 2 * 2 * d * kv + 2 * q * d + 3 * 2 * d * f
    t = 10
    # Causal prefill of 10 tokens: 55 (query, key) pairs per head; the head on the last token.
    want = t * layers * per_layer + 2 * d * v + layers * 4 * q * 55
    assert ceiling.forward_flops(C, t) == pytest.approx(want)
    # One decode token against 100 cached ones, logits on it.
    want = layers * per_layer + 2 * d * v + layers * 4 * q * 100
    assert ceiling.forward_flops(C, 1, context=100) == pytest.approx(want)


def test_probe_on_small_shapes(tmp_path):
    c = ceiling.probe(rows=(4, 16), k=128, n=128, repeats=1, read_bytes=16 * 2**20)
    assert set(c.matmul_gflops) == set(ceiling.DTYPES)
    for dtype, by_rows in c.matmul_by_rows.items():
        assert set(by_rows) == {4, 16}
        assert all(math.isfinite(g) and g > 0 for g in by_rows.values())
        assert c.matmul_gflops[dtype] == max(by_rows.values())
    assert c.read_gb_per_s > 0
    assert c.matmul_share(c.matmul_gflops["bfloat16"] / 2, "bfloat16") == pytest.approx(0.5)
    assert c.read_share(c.read_gb_per_s) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="float16"):
        c.matmul_share(1.0, "float16")
    with pytest.raises(ValueError, match="dtypes"):
        ceiling.probe(dtypes=("float16",))
    # report.write_json carries a probe taken in the process in its machine block.
    report._CEILING[:] = [c]
    try:
        path = tmp_path / "r.json"
        report.write_json(str(path), {"x": 1})
        machine = json.loads(path.read_text())["machine"]
        assert machine["ceiling"]["matmul_gflops"]["int8"] == c.matmul_gflops["int8"]
        assert "cpu_features" in machine
    finally:
        report._CEILING.clear()
