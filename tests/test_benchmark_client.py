"""scripts/serving_client.py: the statistics on synthetic timings, and the client against fake
OpenAI streaming servers (httpx.MockTransport, and a FastAPI app over a real socket)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import serving_client
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from serving_client import ClientRequest, RequestResult

# -- statistics --------------------------------------------------------------------------


def test_ttft_tpot_itl_from_chunk_times():
    r = RequestResult(ok=True, output_tokens=5, chunk_times=[0.2, 0.3, 0.45, 0.5, 0.7])
    r.latency = 0.72
    assert r.ttft == 0.2
    np.testing.assert_allclose(r.itl, [0.1, 0.15, 0.05, 0.2])
    assert r.tpot == pytest.approx((0.72 - 0.2) / 4)
    # A chunk may carry several tokens: TPOT divides by tokens, ITL counts chunks.
    r2 = RequestResult(ok=True, output_tokens=9, chunk_times=[0.1, 0.5], latency=0.5)
    assert r2.tpot == pytest.approx(0.4 / 8)
    assert len(r2.itl) == 1
    assert RequestResult(ok=True, output_tokens=1, chunk_times=[0.3], latency=0.3).tpot == 0.0
    assert math.isnan(RequestResult().ttft)


def test_stats_ms_mean_and_linear_percentiles():
    values = np.arange(1, 101) / 1e3  # 1..100 ms
    s = serving_client.stats_ms(values)
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)  # numpy's linear interpolation, as vLLM
    assert math.isnan(serving_client.stats_ms([])["p99"])


def _result(ttft, latency, tokens, ok=True):
    times = np.linspace(ttft, latency, tokens).tolist() if ok else []
    return RequestResult(
        ok=ok, output_tokens=tokens if ok else 0, chunk_times=times, latency=latency
    )


def test_summarize_counts_and_goodput():
    results = [
        _result(0.1, 1.1, 11),  # ttft 100 ms, tpot 100 ms
        _result(0.6, 1.6, 11),  # ttft 600 ms: misses ttft:500
        _result(0.2, 3.2, 11),  # tpot 300 ms: misses tpot:200
        _result(0.0, 0.0, 0, ok=False),
    ]
    results[3].error = "HTTP 500: boom"
    s = serving_client.summarize(results, 4.0, {"ttft": 500.0, "tpot": 200.0})
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_output_tokens"] == 33
    assert s["output_tokens_per_s"] == pytest.approx(33 / 4)
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["ttft_ms"]["mean"] == pytest.approx(300.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["e2el_ms"]["p50"] == pytest.approx(1600.0)
    assert s["goodput"]["good_requests"] == 1
    assert s["goodput"]["request_goodput"] == pytest.approx(0.25)
    assert s["errors"] == ["HTTP 500: boom"]
    # Targets met by all completed requests; the failed one never counts.
    s = serving_client.summarize(results, 2.0, {"e2el": 5000.0})
    assert s["goodput"]["good_requests"] == 3
    assert "goodput" not in serving_client.summarize(results, 2.0)
    head, totals, lat_head, lat = serving_client.summary_tables(
        serving_client.summarize(results, 4.0, {"ttft": 500.0})
    )
    assert ("failed requests", 1) in totals
    assert [row[0] for row in lat] == ["TTFT", "TPOT", "ITL", "E2EL"]


def test_parse_goodput():
    assert serving_client.parse_goodput("ttft:500 tpot:50") == {"ttft": 500.0, "tpot": 50.0}
    assert serving_client.parse_goodput("e2el:2000,ttft:1") == {"e2el": 2000.0, "ttft": 1.0}
    assert serving_client.parse_goodput(None) == {}
    for bad in ("ttft", "itl:5", "ttft:abc", "tpot:0"):
        with pytest.raises(ValueError, match="--goodput"):
            serving_client.parse_goodput(bad)


def test_arrivals_poisson_or_all_at_once():
    assert not serving_client.arrivals(5, 0.0, 0).any()
    assert not serving_client.arrivals(5, math.inf, 0).any()
    t = serving_client.arrivals(4000, 10.0, 0)
    assert np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(0.1, rel=0.1)


# -- the client against a fake server (MockTransport) -------------------------------------


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class FakeServer:
    """Streams one chunk per token, then usage and [DONE]. A prompt whose first id is
    500 gets an HTTP 500; 501 a stream cut before [DONE]; 502 an error event."""

    def __init__(self, delay=0.002):
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.bodies = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append((body, request.headers.get("authorization")))
        kind = body["prompt"][0]
        if kind == 500:
            return httpx.Response(500, json={"error": {"message": "boom"}})

        async def events():
            # In flight from the first byte to [DONE] (the client stops reading there, so a
            # `finally` here would run only when the generator is collected).
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if kind == 502:
                self.in_flight -= 1
                yield _sse({"error": {"message": "step failed"}})
                yield b"data: [DONE]\n\n"
                return
            for i in range(body["max_tokens"]):
                await asyncio.sleep(self.delay)
                last = i == body["max_tokens"] - 1
                choice = {"index": 0, "text": f"t{i}", "finish_reason": "length" if last else None}
                yield _sse({"object": "text_completion", "choices": [choice]})
                if kind == 501 and i == 1:
                    self.in_flight -= 1
                    return  # the connection drops mid-stream
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield _sse({"object": "text_completion", "choices": [], "usage": usage})
            self.in_flight -= 1
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})


def _run(fake, requests, **kw):
    return asyncio.run(
        serving_client.run_workload(
            "http://fake", requests, transport=httpx.MockTransport(fake.handle), **kw
        )
    )


def test_client_streams_times_and_counts_failures():
    fake = FakeServer()
    requests = [
        ClientRequest([7, 8, 9], 6),
        ClientRequest([500, 1], 6),
        ClientRequest([501, 1], 6),
        ClientRequest([502, 1], 6),
        ClientRequest([10, 11], 4),
    ]
    results, duration = _run(fake, requests, model="m", api_key="k")
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert "HTTP 500" in results[1].error
    assert "before data: [DONE]" in results[2].error
    assert "error event" in results[3].error and "step failed" in results[3].error
    good = results[0]
    assert (good.prompt_len, good.output_tokens, len(good.chunk_times)) == (3, 6, 6)
    assert 0 < good.ttft <= good.chunk_times[-1] <= good.latency <= duration
    assert all(gap > 0 for gap in good.itl)
    body, auth = fake.bodies[0]
    assert auth == "Bearer k"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["model"] == "m"
    s = serving_client.summarize(results, duration)
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 3, 10)


def test_client_survives_a_transport_error():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    results, _ = asyncio.run(
        serving_client.run_workload(
            "http://fake", [ClientRequest([1], 2)] * 3, transport=httpx.MockTransport(refuse)
        )
    )
    assert not any(r.ok for r in results)
    assert all("ConnectError" in r.error for r in results)


def test_max_concurrency_bounds_requests_in_flight():
    fake = FakeServer(delay=0.005)
    requests = [ClientRequest([1, 2], 4) for _ in range(12)]
    results, _ = _run(fake, requests, max_concurrency=3)
    assert all(r.ok for r in results)
    assert fake.most_in_flight == 3
    fake = FakeServer(delay=0.005)
    _run(fake, requests)  # all at once
    assert fake.most_in_flight == 12


def test_poisson_arrivals_spread_the_sends():
    fake = FakeServer(delay=0.0)
    requests = [ClientRequest([1], 1) for _ in range(10)]
    _, duration = _run(fake, requests, request_rate=200.0, seed=3)
    expected = serving_client.arrivals(10, 200.0, 3)[-1]
    assert duration >= expected


# -- the client over a real socket: a FastAPI app under uvicorn in a thread ---------------


def test_client_against_a_fastapi_sse_server():
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body["max_tokens"] > 8:
            return JSONResponse({"error": {"message": "too long"}}, status_code=400)

        async def events():
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.001)
                yield _sse({"choices": [{"index": 0, "text": "x", "finish_reason": None}]})
            yield _sse({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        model = asyncio.run(serving_client.first_model(url))
        assert model == "fake-model"
        requests = [ClientRequest([1, 2, 3], 5)] * 4 + [ClientRequest([1], 20)]
        results, duration = asyncio.run(
            serving_client.run_workload(url, requests, model=model, max_concurrency=2)
        )
    finally:
        server.should_exit = True
        thread.join(10)
    s = serving_client.summarize(results, duration)
    assert (s["completed"], s["failed"]) == (4, 1)
    assert s["total_output_tokens"] == 20
    assert s["errors"] == ['HTTP 400: {"error":{"message":"too long"}}']
    assert all(len(r.itl) == 4 for r in results if r.ok)


def test_mark_requests_fractions_disjoint_and_checked():
    requests = [ClientRequest([i], 4) for i in range(200)]
    marked = serving_client.mark_requests(requests, 0.10, 0.05, seed=0)
    kinds = [r.kind for r in marked]
    assert kinds.count(serving_client.DISCONNECT) == 20
    assert kinds.count(serving_client.INVALID) == 10
    assert [r.prompt for r in marked] == [r.prompt for r in requests]
    assert marked == serving_client.mark_requests(requests, 0.10, 0.05, seed=0)
    with pytest.raises(ValueError, match="disconnect_fraction=1.5"):
        serving_client.mark_requests(requests, 1.5, 0.0, seed=0)
    with pytest.raises(ValueError, match="exceeds 1"):
        serving_client.mark_requests(requests, 0.6, 0.5, seed=0)


class RefusingFakeServer(FakeServer):
    """FakeServer that refuses max_tokens < 1 with a 400, as the real server does."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["max_tokens"] < 1:
            self.bodies.append((body, None))
            return httpx.Response(400, json={"error": {"param": "max_tokens"}})
        return await super().handle(request)


def test_planned_disconnects_and_invalid_requests_are_counted_apart():
    fake = RefusingFakeServer()
    requests = [
        ClientRequest([1, 2], 6),
        ClientRequest([3, 4], 6, kind=serving_client.DISCONNECT),
        ClientRequest([5, 6], 6, kind=serving_client.INVALID),
        ClientRequest([500, 1], 6),  # a real failure: HTTP 500
    ]
    results, duration = _run(fake, requests)
    ok, dropped, invalid, failed = results
    assert ok.ok and ok.output_tokens == 6
    assert not dropped.ok and dropped.as_expected and len(dropped.chunk_times) == 1
    assert not invalid.ok and invalid.as_expected and "HTTP 400" in invalid.error
    assert not failed.ok and not failed.as_expected
    s = serving_client.summarize(results, duration)
    assert (s["completed"], s["failed"], s["disconnected"], s["invalid_rejected"]) == (1, 1, 1, 1)
    assert s["errors"] == [failed.error]


def test_an_invalid_request_the_server_accepts_is_a_failure():
    fake = FakeServer()  # accepts anything
    (result,), duration = _run(fake, [ClientRequest([1], 3, kind=serving_client.INVALID)])
    assert not result.ok and not result.as_expected
    assert serving_client.summarize([result], duration)["failed"] == 1


def test_parse_gauges_reads_the_idle_metrics():
    text = (
        "# HELP jax_infer:num_requests_running Running\n"
        "jax_infer:num_requests_running 0.0\n"
        "jax_infer:num_requests_waiting 2.0\n"
        'jax_infer:request_success_total{finished_reason="stop"} 3.0\n'
        "jax_infer:kv_cache_usage_perc 0.25\n"
    )
    assert serving_client.parse_gauges(text) == {
        "jax_infer:num_requests_running": 0.0,
        "jax_infer:num_requests_waiting": 2.0,
        "jax_infer:kv_cache_usage_perc": 0.25,
    }
