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
    assert c.read is not None and c.read.best_gb_per_s == c.read_gb_per_s
    assert len(c.read.runs_gb_per_s) == 2 * 12  # two sizes, 12 passes each
    assert c.read.spread[0] <= c.read.spread[1] <= c.read.spread[2] == c.read_gb_per_s
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


def test_read_probe_sums_every_chunk_and_rejects_bad_sizes():
    """The native probe (probe.cc) must read the whole buffer: its sum of a known array,
    split in uneven chunks across the pool, is checked; and bad arguments name themselves."""
    import ctypes

    import numpy as np

    from jax_infer.cpu import build
    from jax_infer.eval import speed

    lib = build.library()
    if lib is None:
        pytest.skip("the C++ kernels are not built here")
    fn = lib.JaxInferReadSum
    fn.restype = ctypes.c_float
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    x = np.zeros(128 * 1000, np.float32)
    x[::997] = 1.0  # 129 ones, in every chunk
    for chunk in (128, 128 * 3, 128 * 1000, 128 * 5000):
        assert fn(x.ctypes.data, x.size, chunk) == float(np.sum(x))
    with pytest.raises(ValueError, match="sizes"):
        speed.measure_read_bandwidth(sizes=(1000,))
    with pytest.raises(ValueError, match="repeats"):
        speed.measure_read_bandwidth(sizes=(2**20,), repeats=0)
    r = speed.measure_read_bandwidth(sizes=(2**20, 2**21), repeats=3, buffer_bytes=2**23)
    assert len(r.runs_gb_per_s) == 6 and r.best_gb_per_s == max(r.runs_gb_per_s)
    assert "kernel pool" in r.method and "GB/s" in r.describe()
