"""scripts/benchmark_serving.py's poisson scenario without a model: goodput and percentiles on
synthetic timings, and the static engine's batching policy against a fake LLM."""

from __future__ import annotations

import time
from types import SimpleNamespace

import benchmark_serving as bs
import numpy as np
import pytest


def test_goodput_counts_requests_meeting_both_targets():
    # TTFT 0.5, 1.5, 0.2 s; TPOT (finish - first) / (tokens - 1): 0.1, 0.1, 0.3 s.
    rec = [
        {"arrival": 0.0, "first": 0.5, "finish": 1.5, "tokens": 11},
        {"arrival": 1.0, "first": 2.5, "finish": 3.5, "tokens": 11},
        {"arrival": 2.0, "first": 2.2, "finish": 5.2, "tokens": 11},
    ]
    s = bs.goodput_summary(rec, ttft_ms=1000.0, tpot_ms=200.0)
    assert s["good_requests"] == 1 and s["good_fraction"] == pytest.approx(1 / 3)
    assert s["wall_s"] == 5.2 and s["goodput_rps"] == pytest.approx(1 / 5.2)
    assert s["output_tokens"] == 33
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0)
    assert s["tpot_ms"]["p99"] == pytest.approx(np.percentile([100, 100, 300], 99))
    assert s["e2e_ms"]["p90"] == pytest.approx(np.percentile([1500, 2500, 3200], 90))
    # Looser targets: all three meet them.
    assert bs.goodput_summary(rec, ttft_ms=2000.0, tpot_ms=300.0)["good_requests"] == 3


class FakeStaticLLM:
    """Streams each batch as an LLM with engine="static" does: one chunk per row per step,
    rows in batch order, new request ids per call; each step takes `step_s`."""

    engine_kind = "static"

    def __init__(self, max_num_seqs: int, step_s: float):
        self.engine_config = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.step_s = step_s
        self.batches: list[list] = []
        self._next_id = 0

    def stream(self, prompts, params):
        self.batches.append([p[0] for p in prompts])
        ids = [str(self._next_id + i) for i in range(len(prompts))]
        self._next_id += len(prompts)
        steps = max(p.max_tokens for p in params)
        for step in range(1, steps + 1):
            time.sleep(self.step_s)
            for rid, p in zip(ids, params):
                if step <= p.max_tokens:
                    yield SimpleNamespace(
                        request_id=rid, token_ids=[0] * step, finished=step == p.max_tokens
                    )


def test_static_engine_batches_what_has_arrived_when_free():
    llm = FakeStaticLLM(max_num_seqs=2, step_s=0.05)
    prompts = [[i] for i in range(5)]
    # 0, 1, 2 at once (a batch of at most 2 takes 0 and 1); 3 arrives during that batch; 4
    # arrives well after the engine is idle again.
    arrive = np.array([0.0, 0.0, 0.0, 0.05, 0.6])
    rec = bs.serve_arrivals(llm, prompts, [2, 3, 2, 2, 1], arrive)
    assert llm.batches == [[0, 1], [2, 3], [4]]
    assert [r["tokens"] for r in rec] == [2, 3, 2, 2, 1]
    # Request 2 waited for the first batch (3 steps): its TTFT counts from its arrival.
    assert rec[2]["first"] - rec[2]["arrival"] >= 4 * 0.05 - 1e-3
    assert rec[4]["first"] >= 0.6 and rec[4]["finish"] == rec[4]["first"]
    for r in rec:
        assert r["arrival"] <= r["first"] <= r["finish"]
