"""The OpenAI-compatible server: request mapping (no server), fault handling over a fake engine
(in-process app), and the real server as a subprocess driven by the official openai client."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serving_client import stop_server, wait_healthy

from jax_infer import LLM, SamplingParams
from jax_infer.outputs import RequestOutput
from jax_infer.sampling import StructuredOutputsParams
from jax_infer.server import AsyncEngine, ServerConfig, build_app
from jax_infer.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse,
    sampling_params,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "test-key"
MAX_MODEL_LEN = 512
SHUTDOWN_TIMEOUT = 4
# The server's test hook fails every step that schedules a request with this seed.
FAULT_SEED = 666

# -- request -> SamplingParams (no server) ------------------------------------------------


def test_completion_request_maps_to_sampling_params():
    req = parse(
        CompletionRequest,
        b'{"prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 4,'
        b' "min_p": 0.1, "n": 3, "seed": 7, "stop": "x", "stop_token_ids": [2],'
        b' "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,'
        b' "logprobs": 2, "ignore_eos": true, "min_tokens": 1, "user": "u",'
        b' "logit_bias": {"5": -100, "12": 2.5}}',
    )
    p = sampling_params(req, prompt_len=3, max_model_len=64)
    # n samples in one engine request; sample i is seeded seed + i.
    assert (p.n, p.seed, [p.sample_seed(p.seed, i) for i in range(3)]) == (3, 7, [7, 8, 9])
    assert p.logit_bias == ((5, -100.0), (12, 2.5)) and p.prompt_logprobs is None
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (5, 0.5, 0.9, 4, 0.1)
    assert (p.stop, p.stop_token_ids, p.logprobs, p.ignore_eos, p.min_tokens) == (
        ("x",),
        (2,),
        2,
        True,
        1,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    # Defaults: OpenAI's 16 tokens for completions, temperature 1, no seed.
    d = sampling_params(
        parse(CompletionRequest, b'{"prompt": [1, 2]}'), prompt_len=2, max_model_len=64
    )
    assert (d.max_tokens, d.temperature, d.seed, d.n) == (16, 1.0, None, 1)
    echo = parse(CompletionRequest, b'{"prompt": "a", "echo": true, "logprobs": 3}')
    assert sampling_params(echo, prompt_len=1, max_model_len=64).prompt_logprobs == 3


def test_chat_request_maps_to_sampling_params():
    body = b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 3'
    p = sampling_params(parse(ChatCompletionRequest, body + b"}"), prompt_len=10, max_model_len=64)
    assert (p.logprobs, p.max_tokens) == (3, 54)  # chat fills the context by default
    req = parse(ChatCompletionRequest, body + b', "max_completion_tokens": 4, "max_tokens": 9}')
    assert sampling_params(req, prompt_len=10, max_model_len=64).max_tokens == 4


@pytest.mark.parametrize(
    "body, param",
    [
        (b'{"prompt": "a", "tools": []}', "tools"),
        (b'{"prompt": "a", "logit_bias": {"x1": 2}}', "logit_bias"),
        (b'{"prompt": "a", "logit_bias": {"1": 101}}', "logit_bias"),
        (b'{"prompt": "a", "logit_bias": {"1": "2"}}', "logit_bias"),
        (b'{"prompt": "a", "max_tokens": "ten"}', "max_tokens"),
        (b'{"prompt": "a", "temperature": true}', "temperature"),
        (b'{"prompt": "a", "n": 1000000}', "n"),
        (b'{"prompt": "a", "max_tokens": -1}', "max_tokens"),
        (b'{"prompt": "a", "temperature": -1}', "temperature"),
        (b'{"prompt": "a", "top_p": 0}', "top_p"),
        (b'{"prompt": "a", "seed": -3}', "seed"),
        (b'{"prompt": "a", "logprobs": 99}', "logprobs"),
        (
            b'{"messages": [{"role": "user", "content": "a", "tool_calls": []}]}',
            "messages[0].tool_calls",
        ),
        (b'{"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}', "top_logprobs"),
        (
            b'{"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0}',
            "max_completion_tokens",
        ),
        (b"{not json", None),
    ],
)
def test_invalid_requests_name_the_field(body, param):
    model = ChatCompletionRequest if b"messages" in body else CompletionRequest
    with pytest.raises(APIError) as err:
        sampling_params(parse(model, body), prompt_len=3, max_model_len=64)
    assert err.value.status == 400
    assert err.value.param == param


# -- faults, over a fake engine (in process) ---------------------------------------------


class FakeEngine:
    """The engine surface the server uses: one token (id 5, text "x") per request and step.
    Steps numbered in `fail_steps` fail as LLMEngine's do (their requests end "error");
    steps in `raise_steps` raise out of step(), and with die_on_stats stats() raises: either
    kills the engine thread."""

    def __init__(self, fail_steps=(), raise_steps=(), die_on_stats=False, step_s=0.0):
        self.fail_steps, self.die_on_stats = set(fail_steps), die_on_stats
        self.raise_steps, self.step_s = set(raise_steps), step_s
        self.max_model_len = 64
        self.config = types.SimpleNamespace(vocab_size=100)
        self.tokenizer = types.SimpleNamespace(
            encode=lambda text, add_special_tokens=True: [1] * len(text),
            decode=lambda ids, skip_special_tokens=True: "x" * len(ids),
            eos_token_ids=(0,),
        )
        self.requests: dict[str, tuple] = {}
        self.num_steps = 0

    def add_request(self, ids, params, request_id):
        self.requests[request_id] = (ids, params, [])
        return request_id

    def abort(self, request_id):
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.num_steps += 1
        time.sleep(self.step_s)
        if self.num_steps in self.raise_steps:
            raise RuntimeError("the scheduler broke")
        if self.num_steps in self.fail_steps:
            outs = [
                RequestOutput(
                    rid, None, ids, finish_reason="error", finished=True, error="boom in step"
                )
                for rid, (ids, _, _) in self.requests.items()
            ]
            self.requests.clear()
            return outs
        outs = []
        for rid, (ids, params, tokens) in list(self.requests.items()):
            tokens.append(5)
            done = len(tokens) >= params.max_tokens
            if done:
                del self.requests[rid]
            outs.append(
                RequestOutput(
                    rid,
                    None,
                    ids,
                    text="x" * len(tokens),
                    token_ids=list(tokens),
                    finish_reason="length" if done else None,
                    finished=done,
                    delta_text="x",
                    delta_token_ids=[5],
                )
            )
        return outs

    def stats(self):
        if self.die_on_stats and self.num_steps:
            raise RuntimeError("stats broke")
        n = len(self.requests)
        return {"num_running": n, "num_waiting": 0, "kv_usage": n / 10, "num_preemptions": 0}


def _client(engine, **kwargs):
    front = AsyncEngine(lambda: engine, **kwargs)
    return TestClient(
        build_app(front, ServerConfig(model_name="fake")), raise_server_exceptions=False
    )


def _wait_ready(client):
    for _ in range(100):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("fake server never became healthy")


def test_health_is_503_while_the_engine_loads():
    loaded = threading.Event()

    def make_engine():
        loaded.wait(10)
        return FakeEngine()

    front = AsyncEngine(make_engine)
    app = build_app(front, ServerConfig(model_name="fake"))
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        loaded.set()
        _wait_ready(client)
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "model": "fake"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xx"


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    with _client(FakeEngine(fail_steps={1})) as client:
        _wait_ready(client)
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3})
        assert r.status_code == 500
        assert "boom in step" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "xxx"
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("engine", ["raise_in_step", "die_on_stats"])
def test_a_dead_engine_thread_turns_health_503_and_fails_requests(engine):
    if engine == "raise_in_step":
        engine, message = FakeEngine(raise_steps={2}), "the scheduler broke"
    else:
        engine, message = FakeEngine(die_on_stats=True), "stats broke"
    with _client(engine) as client:
        _wait_ready(client)
        t = time.monotonic()
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 30})
        assert r.status_code == 503 and message in r.json()["error"]["message"]
        assert time.monotonic() - t < 5
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3})
        assert r.status_code == 503


def test_drain_lets_requests_finish_until_the_timeout_aborts_the_rest_and_refuses_new():
    engine = FakeEngine(step_s=0.02)
    with _client(engine) as client:
        _wait_ready(client)
        results = {}

        def post(name, max_tokens):
            body = {"prompt": "ab", "max_tokens": max_tokens}
            results[name] = client.post("/v1/completions", json=body)

        threads = [threading.Thread(target=post, args=a) for a in (("long", 60), ("short", 8))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(engine.requests) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        drained = threading.Event()
        t0 = time.monotonic()
        client.app.state.front.drain(0.5, drained.set)
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "draining"
        for t in threads:
            t.join(10)
        assert drained.wait(10) and 0.4 < time.monotonic() - t0 < 5
        short, long = results["short"].json()["choices"][0], results["long"].json()["choices"][0]
        assert (short["finish_reason"], short["text"]) == ("length", "x" * 8)
        assert long["finish_reason"] == "abort" and 8 <= len(long["text"]) < 60
        assert results["long"].json()["usage"]["completion_tokens"] == len(long["text"])


def test_engine_counters_reach_metrics_as_increments():
    engine = FakeEngine()
    totals = {"num_preemptions": 2, "prefix_cache_queries": 40, "prefix_cache_hits": 16}
    spec = {"num_draft_tokens": 10, "num_accepted_tokens": 7}
    engine.stats = lambda: {
        "num_running": 0,
        "num_waiting": 0,
        "kv_usage": 0.0,
        **totals,
        "speculative": dict(spec),
        "precompile": {"shapes": 7, "seconds": 1.5},
    }
    names = {
        "num_preemptions": "jax_infer:num_preemptions_total",
        "prefix_cache_queries": "jax_infer:prefix_cache_queries_total",
        "prefix_cache_hits": "jax_infer:prefix_cache_hits_total",
        "num_draft_tokens": "jax_infer:spec_decode_num_draft_tokens_total",
        "num_accepted_tokens": "jax_infer:spec_decode_num_accepted_tokens_total",
    }
    with _client(engine) as client:
        _wait_ready(client)
        for _ in range(2):
            time.sleep(0.3)  # the engine thread publishes its stats when idle, too
            m = _metrics(client)
            for key, name in names.items():
                assert m[name] == {**totals, **spec}[key], name
            for d in (totals, spec):
                for key in d:
                    d[key] *= 2
            # Cold start: the precompile's gauges, and the process's compile counters (every
            # program asked for is a persistent-cache hit or a compile).
            assert m["jax_infer:precompile_shapes"] == 7
            assert m["jax_infer:precompile_seconds"] == 1.5
            assert m["jax_infer:num_compiles_total"] == (
                m["jax_infer:compile_cache_hits_total"] + m["jax_infer:num_programs_compiled_total"]
            )
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2})
        assert r.status_code == 200
        time.sleep(0.3)
        # The fake engine reports no first_scheduled_time: no queue time is made up.
        assert _metrics(client)["jax_infer:request_queue_time_seconds_count"] == 0


def test_drain_with_nothing_in_flight_is_immediate():
    with _client(FakeEngine()) as client:
        _wait_ready(client)
        drained = threading.Event()
        client.app.state.front.drain(30, drained.set)
        assert drained.wait(2)


def test_full_waiting_queue_answers_503():
    engine = FakeEngine()
    engine.stats = lambda: {
        "num_running": 0,
        "num_waiting": 2,
        "kv_usage": 0.0,
        "num_preemptions": 0,
    }
    with _client(engine, max_waiting_requests=2) as client:
        _wait_ready(client)
        client.get("/health")
        time.sleep(0.3)  # the engine thread publishes its stats when idle, too
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1})
        assert r.status_code == 503 and "max_waiting_requests=2" in r.json()["error"]["message"]


# -- the real server -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(gguf_path):
    port = _free_port()
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "serve.py"),
        f"--port={port}",
        f"--model={gguf_path}",
        "--served_model_name=smollm2",
        f"--max_model_len={MAX_MODEL_LEN}",
        "--kv_cache_gb=0.05",
        "--max_num_seqs=4",
        "--max_request_bytes=100000",
        "--noprecompile",  # steps compile on first use (the precompile has tests of its own)
        f"--shutdown_timeout={SHUTDOWN_TIMEOUT}",
        "--log_level=warning",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_INFER_API_KEY": API_KEY,
        "JAX_INFER_TEST_FAULT_SEED": str(FAULT_SEED),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180, lambda: proc.stdout.read().decode()[-3000:])
        yield types.SimpleNamespace(url=url, proc=proc)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as c:
        yield c


def _metrics(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


WORDS = (
    "the river carried small boats past old stone houses while children counted the "
    "clouds and a baker sold warm bread to tired travellers near the bridge at dawn"
).split()


def varied_prompts(n: int) -> list[str]:
    """n prompts of 1 to ~120 words: short and long, several crossing page boundaries."""
    lengths = [1, 2, 3, 5, 8, 13, 16, 17, 21, 30, 34, 47, 55, 64, 89, 120]
    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=lengths[i % len(lengths)])) for i in range(n)]


@pytest.mark.slow
@pytest.mark.real_model
def test_concurrent_greedy_and_seeded_n4_equal_llm_generate(client, gguf_path):
    """16 prompts of varied lengths sent at once (the server batches them 4 at a time) give
    LLM.generate's greedy tokens; n=4 samples are LLM.generate's with seeds seed + i."""
    prompts = varied_prompts(16)
    greedy = SamplingParams(max_tokens=8, temperature=0)

    def complete(prompt):
        return client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=8, temperature=0
        )

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        served = list(pool.map(complete, prompts))
    n4 = client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=6, temperature=0.8, seed=5, n=4
    )
    llm = LLM(model=gguf_path, progress=False, max_model_len=MAX_MODEL_LEN, kv_cache_gb=0.05)
    local = llm.generate(prompts, greedy)
    local_n4 = llm.generate(
        ["Once upon a time"] * 4,
        [SamplingParams(max_tokens=6, temperature=0.8, seed=5 + i) for i in range(4)],
    )
    del llm
    for i, (r, o) in enumerate(zip(served, local)):
        assert r.choices[0].text == o.text, f"prompt {i} ({len(o.prompt_token_ids)} tokens)"
        assert r.usage.prompt_tokens == len(o.prompt_token_ids)
        assert r.usage.completion_tokens == len(o.token_ids)
    assert sorted(c.index for c in n4.choices) == [0, 1, 2, 3]
    texts = [c.text for c in sorted(n4.choices, key=lambda c: c.index)]
    assert texts == [o.text for o in local_n4]
    assert len(set(texts)) > 1, "four samples at temperature 0.8 should not all agree"
    assert n4.usage.prompt_tokens == len(local_n4[0].prompt_token_ids)  # counted once
    assert n4.usage.completion_tokens == sum(len(o.token_ids) for o in local_n4)


@pytest.mark.real_model
def test_models_health_tokenize(client, http):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert http.get("/health").status_code == 200
    ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"


@pytest.mark.real_model
def test_chat_stream_deltas_join_to_the_plain_answer(client):
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=6, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.content and text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert plain.usage.completion_tokens == 6


@pytest.mark.real_model
def test_completion_stream_n2_logprobs(client):
    r = client.completions.create(
        model="smollm2", prompt="Hello", max_tokens=4, temperature=0.8, seed=3, n=2, logprobs=2
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices) == 8
    for c in r.choices:
        assert "".join(c.logprobs.tokens) == c.text
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in c.logprobs.top_logprobs)
    again = client.completions.create(
        model="smollm2", prompt="Hello", max_tokens=4, temperature=0.8, seed=3, n=2
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded
    stream = client.completions.create(
        model="smollm2", prompt="Hello", max_tokens=4, temperature=0.8, seed=3, n=2, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]


@pytest.mark.real_model
def test_logit_bias_and_echo_with_prompt_logprobs(client, hf_smollm2):
    """logit_bias +100 forces a token under greedy decoding; echo with logprobs gives the
    prompt's tokens first (the first logprob null) with HF transformers' logprobs."""
    import torch

    hf_model, hf_tok = hf_smollm2
    forced = hf_tok.encode(" banana")[0]
    r = client.completions.create(
        model="smollm2", prompt="Hi", max_tokens=3, temperature=0, logit_bias={str(forced): 100}
    )
    assert r.choices[0].text == hf_tok.decode([forced] * 3)
    prompt = "The capital of France is"
    r = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2
    )
    ids = hf_tok.encode(prompt)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 2 and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    want = [ref[p - 1, ids[p]] for p in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=2e-3)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    stream = client.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=2,
        temperature=0,
        echo=True,
        logprobs=2,
        stream=True,
    )
    streamed = [x for c in stream for ch in c.choices if ch.logprobs for x in ch.logprobs.tokens]
    assert streamed == lp.tokens
    # vLLM's prompt_logprobs extra field: each prompt token's logprob and the top 3, ranked.
    r = client.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=1,
        temperature=0,
        extra_body={"prompt_logprobs": 3},
    )
    rows = r.choices[0].model_extra["prompt_logprobs"]
    assert len(rows) == len(ids) and rows[0] is None
    for p in range(1, len(ids)):
        row = {int(t): v for t, v in rows[p].items()}
        assert row[ids[p]]["logprob"] == pytest.approx(ref[p - 1, ids[p]], abs=2e-3)
        top3 = sorted((t for t in row if row[t]["rank"] is not None), key=lambda t: row[t]["rank"])
        assert [row[t]["rank"] for t in top3] == [1, 2, 3]
        assert top3 == list(np.argsort(-ref[p - 1])[:3])


@pytest.mark.real_model
@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "a", "tools": []}, 400, "tools"),
        ({"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "a", "n": 10**6}, 400, "n"),
        ({"prompt": "a", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        ({"prompt": [10**9]}, 400, "prompt"),
        ({"prompt": "a", "prompt_logprobs": 2, "stream": True}, 400, "prompt_logprobs"),
        ({"prompt": "a", "prompt_logprobs": -1}, 400, "prompt_logprobs"),
        ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(http, body, status, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.real_model
def test_bad_bodies_auth_and_size_then_still_serving(http, server):
    r = http.post("/v1/chat/completions", content=os.urandom(256))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert r.status_code == 401 and "error" in r.json()
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "a"},
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 401
    r = http.post("/v1/completions", json={"prompt": "a" * 200_000})
    assert r.status_code == 413 and "error" in r.json()
    assert http.get("/health").status_code == 200  # no key needed outside /v1
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.real_model
def test_a_failed_step_is_a_500_naming_the_cause_and_the_server_goes_on(http):
    bad = {"prompt": "Hello", "max_tokens": 4, "seed": FAULT_SEED}
    r = http.post("/v1/completions", json=bad)
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    assert "RuntimeError: injected test fault" in message and "failed" in message
    with http.stream("POST", "/v1/completions", json={**bad, "stream": True}) as r:
        assert r.status_code == 200  # the failure comes after the stream has started
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert "injected test fault" in lines[-2] and lines[-1] == "data: [DONE]"
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={**bad, "seed": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert (
        'jax_infer:request_success_total{finished_reason="error"} 2.0' in http.get("/metrics").text
    )
    _wait_idle(http)


def _wait_idle(http, timeout=15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(http)
        idle = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        if all(m[f"jax_infer:{name}"] == 0 for name in idle):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.2)


@pytest.mark.real_model
def test_metrics_queue_time_prefix_cache_compiles(http):
    before = _metrics(http)
    prompt = "A long shared opening line, " * 8  # several full pages, cached after the first
    for _ in range(2):
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
    m = _wait_idle(http)
    queued = m["jax_infer:request_queue_time_seconds_count"]
    assert queued - before["jax_infer:request_queue_time_seconds_count"] == 2
    assert 0 <= m["jax_infer:request_queue_time_seconds_sum"] < 60 * queued
    queries = m["jax_infer:prefix_cache_queries_total"]
    hits = m["jax_infer:prefix_cache_hits_total"]
    n = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert queries - before["jax_infer:prefix_cache_queries_total"] == 2 * n
    # The second request finds the full pages before its last token (pages of 16 tokens).
    assert hits - before["jax_infer:prefix_cache_hits_total"] == (n - 1) // 16 * 16 > 0
    assert m["jax_infer:num_compiles_total"] > 0  # the server compiled its steps
    assert m["jax_infer:spec_decode_num_draft_tokens_total"] == 0  # speculative decoding is off
    assert m["jax_infer:spec_decode_num_accepted_tokens_total"] == 0


@pytest.mark.real_model
def test_client_disconnect_aborts_and_frees_pages(http, server):
    body = {"prompt": "Count:", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _metrics(http)["jax_infer:num_requests_running"] == 1
    _wait_idle(http)
    # Not streamed: the client gives up (a timeout closes the connection).
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=body, timeout=3)
    m = _wait_idle(http)
    assert m["jax_infer:generation_tokens_total"] > 0
    text = http.get("/metrics").text
    for name in (
        "jax_infer:time_to_first_token_seconds_bucket",
        "jax_infer:inter_token_latency_seconds_bucket",
        "jax_infer:e2e_request_latency_seconds_count",
        "jax_infer:num_requests_waiting",
        "jax_infer:prompt_tokens_total",
        'jax_infer:request_success_total{finished_reason="abort"} 2.0',
        "jax_infer:num_preemptions_total",
    ):
        assert name in text, name


INVALID_BODIES = [
    {"prompt": "a", "max_tokens": -1},
    {"prompt": "a", "tools": []},
    {"prompt": "a", "temperature": "hot"},
    {"prompt": "a", "max_tokens": MAX_MODEL_LEN},
    {"prompt": [10**9]},
]


async def _load_client(http, i: int) -> tuple[str, object]:
    """Client i of the load test: 5% invalid, 10% disconnect mid-stream, the rest stream or
    not. Returns (kind, what it saw)."""
    body = {"prompt": f"Request {i}: " + " ".join(WORDS[: i % 20]), "max_tokens": 8}
    body.update(temperature=0, ignore_eos=True)
    if i % 20 == 7:
        r = await http.post("/v1/completions", json=INVALID_BODIES[i // 20 % len(INVALID_BODIES)])
        return "invalid", r.status_code
    if i % 10 == 3:
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # leaves with the response unread: the connection closes
        return "disconnect", None
    if i % 2:
        r = await http.post("/v1/completions", json=body)
        if r.status_code != 200:
            return "plain", False
        reply = r.json()
        return "plain", (
            reply["choices"][0]["finish_reason"],
            reply["usage"]["completion_tokens"],
        ) == ("length", 8)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = []
    async with http.stream("POST", "/v1/completions", json=stream) as r:
        if r.status_code != 200:
            return "stream", False
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                break
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    return "stream", reasons == ["length"] and events[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.slow
@pytest.mark.real_model
def test_200_concurrent_clients_lose_nothing(server):
    """200 clients at once (8 tokens each): every valid request that stays connected completes,
    every invalid one gets a 400, and the engine ends idle with its pages free."""

    async def run():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(
            base_url=server.url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=120,
            limits=limits,
        ) as http:
            return await asyncio.gather(*(_load_client(http, i) for i in range(200)))

    results = asyncio.run(run())
    kinds = collections.Counter(kind for kind, _ in results)
    assert kinds == {"plain": 70, "stream": 100, "disconnect": 20, "invalid": 10}
    assert all(seen == 400 for kind, seen in results if kind == "invalid")
    lost = [i for i, (kind, seen) in enumerate(results) if kind in ("plain", "stream") and not seen]
    assert not lost, f"requests {lost} did not complete"
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        _wait_idle(http)


def _wait_running(http, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _metrics(http)["jax_infer:num_requests_running"] < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests running"
        time.sleep(0.1)


def test_structured_output_fields_map_to_sampling_params():
    def so(body: dict):
        model = ChatCompletionRequest if "messages" in body else CompletionRequest
        req = parse(model, json.dumps(body).encode())
        return sampling_params(req, prompt_len=3, max_model_len=64).structured_outputs

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert so({**chat, "response_format": rf}) == StructuredOutputsParams(json=schema)
    assert so({**chat, "response_format": {"type": "json_object"}}).json_object
    assert so({**chat, "response_format": {"type": "text"}}) is None
    assert so({"prompt": "a", "structured_outputs": {"regex": "[ab]+"}}).regex == "[ab]+"
    assert so({"prompt": "a", "structured_outputs": {"choice": ["x", "y"]}}).choice == ("x", "y")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "text", "json_schema": {"name": "x", "schema": {}}}},
            "response_format.json_schema",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{oops"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"ebnf": "x"}}, "structured_outputs.ebnf"),
    ],
)
def test_invalid_structured_output_fields_name_the_field(extra, param):
    with pytest.raises(APIError) as err:
        body = json.dumps({"prompt": "a", **extra}).encode()
        sampling_params(parse(CompletionRequest, body), prompt_len=3, max_model_len=64)
    assert err.value.status == 400
    assert err.value.param == param, err.value.message


@pytest.mark.real_model
def test_structured_outputs_over_http(client, http):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "population": {"type": "integer", "minimum": 0, "maximum": 10**8},
            "tags": {"type": "array", "items": {"enum": ["big", "old", "new"]}, "maxItems": 2},
        },
        "required": ["city", "population", "tags"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Describe a city as JSON."}]
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    r = client.chat.completions.create(
        model="smollm2", messages=messages, response_format=rf, max_tokens=60, temperature=0
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # Streamed and sampled, n=2: the joined deltas validate too.
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        response_format=rf,
        max_tokens=60,
        temperature=0.9,
        seed=5,
        n=2,
        stream=True,
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    r = client.completions.create(
        model="smollm2",
        prompt="Is water wet? Answer:",
        max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    # Schemas, regexes and grammars the compiler refuses: a 400 naming the field, never run.
    for body, param, reason in [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
            "response_format.json_schema.schema",
            "objectx",
        ),
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "unclosed group"),
        ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs", "nope"),
    ]:  # fmt: skip
        r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and reason in err["message"], err
        assert err["message"].startswith(param), err


@pytest.mark.real_model
def test_sigterm_drains_then_exits_0(http, server):
    """Last: stops the module's server. In flight at SIGTERM, a short request finishes and a
    long one ends "abort" at --shutdown_timeout; new requests get 503 while it drains; then
    the process exits 0 and the port is closed."""
    long_body = {"prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    short_body = {"prompt": "Hi", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    lines: list[str] = []
    short = {}

    def stream_long():
        with http.stream("POST", "/v1/completions", json=long_body) as r:
            lines.extend(r.iter_lines())

    def post_short():
        short["r"] = http.post("/v1/completions", json=short_body)

    threads = [threading.Thread(target=stream_long), threading.Thread(target=post_short)]
    threads[0].start()
    _wait_running(http, 1)
    threads[1].start()
    _wait_running(http, 2)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    r = http.post("/v1/completions", json=short_body)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert http.get("/health").status_code == 503
    # Generous bounds: on 2 cores shared with another test worker, the short request's first
    # steps may compile new shapes; what is checked is exit 0 after the drain, not speed.
    assert server.proc.wait(SHUTDOWN_TIMEOUT + 60) == 0
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert short["r"].status_code == 200
    choice = short["r"].json()["choices"][0]
    assert (
        choice["finish_reason"] == "length"
        and short["r"].json()["usage"]["completion_tokens"] == 24
    )
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "abort"
    assert lines[-1] == "" and "data: [DONE]" in lines
    assert SHUTDOWN_TIMEOUT - 1 < elapsed < SHUTDOWN_TIMEOUT + 55
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


# -- structured outputs: response_format and structured_outputs -----------------------------
