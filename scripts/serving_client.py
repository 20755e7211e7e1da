"""A benchmark client for any OpenAI-compatible server: streamed completions sent at Poisson
arrivals (or all at once, or at most --max_concurrency in flight), timed chunk by chunk, and
summarised the way vLLM's benchmark_serving does.

    requests = [ClientRequest(prompt=[101, 102, ...], max_tokens=16), ...]
    results, duration = asyncio.run(run_workload("http://127.0.0.1:8000", requests, model="m"))
    summary = summarize(results, duration, goodput={"ttft": 500.0, "tpot": 50.0})

Every request is `POST /v1/completions` with stream=true and stream_options.include_usage, so
the server's usage chunk gives the exact output token count. Times are per streamed chunk, as
vLLM measures them: TTFT is the first chunk, ITL the gaps between chunks (a chunk may carry
more than one token when the server holds text back, e.g. an incomplete UTF-8 character),
TPOT (latency - TTFT) / (output tokens - 1), E2EL the time to `data: [DONE]`.

A request fails, and is counted as failed rather than raising, on an HTTP error status, an
error event inside the stream, a stream that ends before [DONE], or any transport error.
Pure Python over httpx and numpy (no jax): the tests import it without a model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import signal
import subprocess
import time
from collections.abc import Callable

import httpx
import numpy as np

# Goodput targets are written as "ttft:MS tpot:MS e2el:MS"; the keys name RequestResult fields.
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


# What a request of the workload does (`ClientRequest.kind`): a normal streamed completion;
# one that drops its connection after the first chunk (a client that goes away mid-stream);
# one with an invalid field (max_tokens=-1), which the server must refuse with a 400.
NORMAL, DISCONNECT, INVALID = "normal", "disconnect", "invalid"


@dataclasses.dataclass(frozen=True)
class ClientRequest:
    prompt: str | list[int]  # token ids give exact prompt lengths
    max_tokens: int
    kind: str = NORMAL


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, output: Callable[[], str]):
    """Poll `url`/health until it answers 200. RuntimeError with the server's `output()` if
    the process exits first, or when `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{output()}")
        try:
            if httpx.get(f"{url}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} was not healthy after {timeout_s:.0f} s")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (the server drains), then SIGKILL after `grace_s`; reaps the process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mark_requests(
    requests: list[ClientRequest], disconnect: float, invalid: float, seed: int
) -> list[ClientRequest]:
    """The same requests, a `disconnect` fraction of them dropping mid-stream and an `invalid`
    fraction sent with an invalid field (chosen at random, seeded, disjoint)."""
    for name, value in (("disconnect_fraction", disconnect), ("invalid_fraction", invalid)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} is invalid: must be in [0, 1]")
    if disconnect + invalid > 1.0:
        raise ValueError(
            f"disconnect_fraction + invalid_fraction = {disconnect + invalid} exceeds 1"
        )
    n = len(requests)
    order = np.random.default_rng(seed + 2).permutation(n)
    num_disconnect, num_invalid = round(disconnect * n), round(invalid * n)
    kinds = [NORMAL] * n
    for i in order[:num_disconnect]:
        kinds[i] = DISCONNECT
    for i in order[num_disconnect : num_disconnect + num_invalid]:
        kinds[i] = INVALID
    return [dataclasses.replace(r, kind=k) for r, k in zip(requests, kinds)]


@dataclasses.dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from when it was sent."""

    ok: bool = False
    error: str = ""
    kind: str = NORMAL
    # DISCONNECT: the stream was dropped after its first chunk, as planned. INVALID: the
    # server answered 400, as it must (ok stays False for both: they are not completions).
    as_expected: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] if self.chunk_times else math.nan

    @property
    def itl(self) -> list[float]:
        return np.diff(self.chunk_times).tolist()

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 for a one-token answer, as vLLM)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Send times in seconds: a Poisson process at `rate` per second, or all at 0 for a rate
    of 0 or inf."""
    if rate <= 0 or math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, size=n))


def parse_goodput(spec: str | None) -> dict[str, float]:
    """ "ttft:500 tpot:50" (milliseconds; spaces or commas between) -> {"ttft": 500.0, ...}."""
    out: dict[str, float] = {}
    for item in (spec or "").replace(",", " ").split():
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput: {item!r} is not METRIC:MS with METRIC one of {list(GOODPUT_METRICS)}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r} has no number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput: {item!r} must be > 0 ms")
        out[name] = ms
    return out


# -- one request -----------------------------------------------------------------------


async def send_one(
    client: httpx.AsyncClient,
    request: ClientRequest,
    *,
    model: str | None,
    ignore_eos: bool = True,
    headers: dict | None = None,
) -> RequestResult:
    """Stream one completion; never raises (a failure is a RequestResult with ok=False)."""
    payload = {
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        payload["model"] = model
    if ignore_eos:
        payload["ignore_eos"] = True
    if request.kind == INVALID:
        payload["max_tokens"] = -1
    result = RequestResult(prompt_len=len(request.prompt), kind=request.kind)
    text_chunks, usage, done = 0, None, False
    start = time.perf_counter()
    try:
        async with client.stream(
            "POST", "/v1/completions", json=payload, headers=headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                result.as_expected = request.kind == INVALID and response.status_code == 400
                return result
            if request.kind == INVALID:
                result.error = "an invalid request was accepted (HTTP 200)"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter() - start
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {json.dumps(event['error'])[:200]}"
                    return result
                if event.get("choices"):
                    result.chunk_times.append(now)
                    if event["choices"][0].get("text"):
                        text_chunks += 1
                    if request.kind == DISCONNECT:
                        # Leaving the `async with` closes the connection mid-stream.
                        result.error, result.as_expected = "disconnected (planned)", True
                        return result
                if event.get("usage"):
                    usage = event["usage"]
    except Exception as e:  # transport errors, broken streams, bad JSON: a failed request
        result.error = f"{type(e).__name__}: {e}"[:300]
        return result
    result.latency = time.perf_counter() - start
    if not done:
        result.error = "stream ended before data: [DONE]"
        return result
    if not result.chunk_times:
        result.error = "stream had no completion chunk"
        return result
    # Without a usage chunk (a server that ignores include_usage), count chunks with text.
    result.output_tokens = int(usage["completion_tokens"]) if usage else text_chunks
    result.ok = True
    return result


# -- a workload --------------------------------------------------------------------------


async def run_workload(
    base_url: str,
    requests: list[ClientRequest],
    *,
    model: str | None = None,
    api_key: str | None = None,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    ignore_eos: bool = True,
    seed: int = 0,
    timeout_s: float = 600.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[list[RequestResult], float]:
    """Send `requests` at Poisson arrivals (`request_rate` per second; 0 or inf: all at once),
    with at most `max_concurrency` in flight; returns the results in request order and the
    wall time from the first send to the last answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    # No pool limit below the concurrency asked for: the client must not be the queue.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    send_at = arrivals(len(requests), request_rate, seed)

    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout_s, limits=limits, transport=transport
    ) as client:

        async def one(request):
            if semaphore is None:
                return await send_one(
                    client, request, model=model, ignore_eos=ignore_eos, headers=headers
                )
            async with semaphore:
                return await send_one(
                    client, request, model=model, ignore_eos=ignore_eos, headers=headers
                )

        start = time.perf_counter()
        tasks = []
        for request, at in zip(requests, send_at):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration


async def first_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id that GET /v1/models lists (what --served_model defaults to)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        response = await client.get("/v1/models", headers=headers)
        response.raise_for_status()
        return response.json()["data"][0]["id"]


# -- statistics -------------------------------------------------------------------------


def stats_ms(values_s) -> dict:
    """mean, p50 and p99 in milliseconds (numpy's linear percentiles, as vLLM); NaN if empty."""
    v = np.asarray(values_s, float) * 1e3
    if v.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
    return {
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p99": float(np.percentile(v, 99)),
    }


def meets(result: RequestResult, targets_ms: dict[str, float]) -> bool:
    """Whether a completed request meets every goodput target."""
    values = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.latency}
    return result.ok and all(values[k] * 1e3 <= ms for k, ms in targets_ms.items())


def summarize(
    results: list[RequestResult], duration_s: float, goodput: dict[str, float] | None = None
) -> dict:
    """vLLM benchmark_serving's figures over one run. Planned disconnects and invalid
    requests are counted apart: `failed` counts only normal requests that did not complete
    (a lost request) and planned ones that did not behave as planned."""
    done = [r for r in results if r.ok]
    planned = [r for r in results if r.kind != NORMAL]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    summary = {
        "completed": len(done),
        "failed": sum(not r.ok and not r.as_expected for r in results),
        "disconnected": sum(r.as_expected for r in planned if r.kind == DISCONNECT),
        "invalid_rejected": sum(r.as_expected for r in planned if r.kind == INVALID),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_tokens_per_s": output_tokens / duration_s,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms([r.tpot for r in done if r.output_tokens > 1]),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": stats_ms([r.latency for r in done]),
        "errors": sorted({r.error for r in results if not r.ok and not r.as_expected}),
    }
    if goodput:
        good = sum(meets(r, goodput) for r in results)
        summary["goodput"] = {
            "targets_ms": dict(goodput),
            "good_requests": good,
            "request_goodput": good / duration_s,
        }
    return summary


def summary_tables(summary: dict) -> tuple[tuple, list, tuple, list]:
    """(headers, rows) of the run's totals and of its latencies, for report.print_table."""
    totals = [
        ("completed requests", summary["completed"]),
        ("failed requests", summary["failed"]),
        ("disconnected mid-stream (planned)", summary["disconnected"]),
        ("invalid, refused with 400 (planned)", summary["invalid_rejected"]),
        ("duration (s)", f"{summary['duration_s']:.2f}"),
        ("input tokens", summary["total_input_tokens"]),
        ("output tokens", summary["total_output_tokens"]),
        ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("output throughput (tok/s)", f"{summary['output_tokens_per_s']:.1f}"),
        ("total throughput (tok/s)", f"{summary['total_tokens_per_s']:.1f}"),
    ]
    if "goodput" in summary:
        g = summary["goodput"]
        targets = " ".join(f"{k}:{v:g}" for k, v in g["targets_ms"].items())
        totals.append((f"goodput (req/s, {targets} ms)", f"{g['request_goodput']:.2f}"))
    latencies = [
        (name, *(f"{summary[key][s]:.1f}" for s in ("mean", "p50", "p99")))
        for name, key in (
            ("TTFT", "ttft_ms"),
            ("TPOT", "tpot_ms"),
            ("ITL", "itl_ms"),
            ("E2EL", "e2el_ms"),
        )
    ]
    return ("metric", "value"), totals, ("latency (ms)", "mean", "p50", "p99"), latencies


IDLE_GAUGES = (
    "jax_infer:num_requests_running",
    "jax_infer:num_requests_waiting",
    "jax_infer:kv_cache_usage_perc",
)


def parse_gauges(text: str, names=IDLE_GAUGES) -> dict[str, float]:
    """The unlabelled samples `names` from a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[name] = float(value)
    return out


async def wait_idle(
    base_url: str, api_key: str | None = None, timeout_s: float = 10.0, poll_s: float = 0.2
) -> dict[str, float]:
    """Poll GET /metrics until the server reports no running or waiting request and no KV
    pages in use (or `timeout_s` passes); returns the last reading of IDLE_GAUGES (empty for
    a server without them). After a run, anything left is a request the server lost."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    deadline = time.perf_counter() + timeout_s
    gauges: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
        while True:
            response = await client.get("/metrics", headers=headers)
            if response.status_code != 200:
                return gauges
            gauges = parse_gauges(response.text)
            if not gauges or not any(gauges.values()) or time.perf_counter() > deadline:
                return gauges
            await asyncio.sleep(poll_s)


def per_request(results: list[RequestResult]) -> list[dict]:
    """The JSON record of each request (ITLs summarised, not listed)."""
    return [
        {
            "ok": r.ok,
            "error": r.error or None,
            "prompt_len": r.prompt_len,
            "output_tokens": r.output_tokens,
            "ttft_s": r.ttft if r.chunk_times else None,
            "latency_s": r.latency if r.ok else None,
            "chunks": len(r.chunk_times),
        }
        for r in results
    ]


__all__ = [
    "GOODPUT_METRICS",
    "ClientRequest",
    "RequestResult",
    "arrivals",
    "first_model",
    "meets",
    "parse_goodput",
    "per_request",
    "run_workload",
    "send_one",
    "stats_ms",
    "summarize",
    "summary_tables",
]
