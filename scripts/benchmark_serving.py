"""Serving benchmarks: continuous batching against static batching, batched decode, KV
capacity with pages against contiguous reservation, and TTFT with a shared prefix; or, with
--url, a client of any OpenAI-compatible server (vLLM's benchmark_serving figures).

    python scripts/benchmark_serving.py --json results/serving.json
    python scripts/benchmark_serving.py --scenarios=decode32,prefix --json results/serving.json
    python scripts/benchmark_serving.py --scenarios=decode32 --compare_http
    python scripts/benchmark_serving.py --config=configs/cpu_smollm2_f32.py --scenarios=decode32
    python scripts/benchmark_serving.py --url http://127.0.0.1:8000 --num_requests 16 \
        --input_len 128 --output_len 16 --request_rate 4 --goodput "ttft:500 tpot:50"

Scenarios (--scenarios, comma-separated):
  mixed     --num_requests requests, prompt lengths uniform in [32, 512], output lengths
            uniform in [16, 256] (ignore_eos), arriving all at once or as a Poisson process
            (--request_rate per second). Runs the continuous engine and the static mode of the
            same engine (padded batches of max_num_seqs that wait for their slowest member):
            output tokens/s, TTFT and time per output token (p50, p99), peak KV usage.
  decode32  32 requests of 128-token prompts generating 128 tokens each, all at once (after
            the same workload with other token ids: no compiles, no prefix-cache hits).
  capacity  how many of the mixed workload's sequences fit in the engine's KV budget with
            pages, against a contiguous max_model_len reservation per sequence.
  prefix    TTFT of a request with a --prefix_len-token prefix, then of a second request
            sharing it (prefix cache on).
  poisson   goodput under load: for each rate in --poisson_rates, --poisson_requests requests
            (prompt lengths uniform in --poisson_prompt_len, outputs in --poisson_output_len,
            ignore_eos) arrive as a Poisson process; the continuous and the static engine
            serve the same seeded arrivals and prompts. Static policy: whenever the engine is
            free it takes every request that has arrived (FIFO, at most --max_num_seqs) as one
            batch and runs it to completion; if none has arrived it waits for the next. Per
            rate and engine: TTFT/TPOT/e2e p50/p90/p99, the share of requests meeting both
            --ttft_target_ms and --tpot_target_ms, and goodput (such requests per second of
            wall time); then, at the highest rate where continuous batching meets the targets
            for >= 90% of requests, continuous goodput / static goodput.
  structured  decode32's shape (32 x 128-token prompts, 128 tokens each) with
            --structured_fraction of the requests constrained to a JSON schema (llguidance)
            that cannot finish within 128 tokens (so every request runs its full length),
            against the same shape unconstrained (fresh prompts each, after a warm-up of
            both): output tokens/s of each, their ratio, and the host's mask time per
            constrained token (computed on a worker while the forward runs).

--compare_http (with decode32): then serve the same workload (same prompts and output lengths,
ignore_eos, temperature 0, after the same warm-up) through scripts/serve.py, started here as a
subprocess on a free 127.0.0.1 port with the same model and engine flags, and report both
output tokens/s and their ratio (http_decode32): what the HTTP layer costs.

Client mode (--url; --scenarios is not used): --workload random (--num_requests prompts of
--input_len random token ids, --output_len tokens each), mixed (the mixed scenario's lengths)
or decode32; sent as streamed /v1/completions (ignore_eos, so lengths are exact) at Poisson
arrivals of --request_rate per second (0 or inf: all at once), at most --max_concurrency in
flight. Reports completed/failed requests, duration, request and token throughput, TTFT, TPOT,
ITL and end-to-end latency (mean, p50, p99) and, with --goodput "ttft:MS tpot:MS e2el:MS",
the completed requests per second that met every target. Timing is scripts/serving_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import report
import serving_client
import shared_flags
from absl import app, flags

from jax_infer import LLM, SamplingParams, compile_cache
from jax_infer.sampling import StructuredOutputsParams

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
shared_flags.define_engine_flags()
shared_flags.define_mesh_flags()
shared_flags.define_json_flag()
shared_flags.define_config_flags()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_string("scenarios", "mixed,decode32,capacity,prefix", "Which scenarios to run.")
flags.DEFINE_integer("num_requests", 64, "Requests in the mixed workload.")
flags.DEFINE_float("request_rate", 0.0, "Poisson arrivals per second; 0 or inf = all at once.")
flags.DEFINE_integer("max_model_len", 2048, "Longest request accepted.")
flags.DEFINE_integer("prefix_len", 1000, "Shared prefix length for the prefix scenario.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_bool(
    "full_warmup",
    True,
    "Serve the mixed workload once (other token ids) before timing it, so the timed run "
    "measures steady-state serving rather than XLA compiling new step shapes. In client "
    "mode: send the whole workload once (other token ids) before timing it; without it, "
    "one short request.",
)
flags.DEFINE_list("poisson_rates", ["0.5", "1", "2", "4"], "poisson: arrival rates (req/s).")
flags.DEFINE_integer("poisson_requests", 24, "poisson: requests per rate.", lower_bound=1)
flags.DEFINE_list("poisson_prompt_len", ["32", "256"], "poisson: prompt length range LO,HI.")
flags.DEFINE_list("poisson_output_len", ["16", "64"], "poisson: output length range LO,HI.")
flags.DEFINE_float("ttft_target_ms", 2000.0, "poisson: TTFT target (ms) for goodput.")
flags.DEFINE_float("tpot_target_ms", 200.0, "poisson: TPOT target (ms) for goodput.")
flags.DEFINE_float(
    "structured_fraction", 0.5, "structured scenario: the share of requests constrained."
)
flags.DEFINE_bool(
    "compare_http",
    False,
    "With decode32: also run its workload through scripts/serve.py started as a subprocess "
    "(same model and engine flags), and report HTTP against in-process output tokens/s.",
)
flags.DEFINE_bool(
    "compare_hf",
    False,
    "With decode32: also run its prompts through HF transformers static batching "
    "(scripts/hf_static.py: one padded greedy batch, --hf_threads torch threads) in the same "
    "process, and report the engine's output tokens/s against it.",
)
flags.DEFINE_integer("hf_threads", None, "--compare_hf: torch threads (default: every core).")
flags.DEFINE_enum("hf_dtype", "float32", ["float32", "bfloat16"], "--compare_hf: torch dtype.")
flags.DEFINE_integer(
    "check_single",
    0,
    "With decode32: generate this many of its prompts again one request at a time (same "
    "engine, greedy) and check the batched run's tokens are identical.",
    lower_bound=0,
)
# Client mode: any OpenAI-compatible server.
flags.DEFINE_string("url", None, "Benchmark the server at this base URL instead of in process.")
flags.DEFINE_string("api_key", None, "Bearer key for --url.")
flags.DEFINE_string("served_model", None, "Model name to send (default: first of /v1/models).")
flags.DEFINE_enum(
    "workload", "random", ["random", "mixed", "decode32"], "Client-mode prompts and lengths."
)
flags.DEFINE_integer("input_len", 128, "Prompt tokens per request (--workload random).")
flags.DEFINE_integer("output_len", 128, "Output tokens per request (--workload random).")
flags.DEFINE_integer(
    "max_concurrency", None, "Most requests in flight (default: no limit).", lower_bound=1
)
flags.DEFINE_string("goodput", None, 'Targets in ms for goodput, e.g. "ttft:500 tpot:50".')
flags.DEFINE_bool("ignore_eos", True, "Send ignore_eos so output lengths are exact (vLLM field).")
flags.DEFINE_float("request_timeout_s", 600.0, "Client timeout per request.")
flags.DEFINE_float(
    "disconnect_fraction",
    0.0,
    "--url: share of requests that drop their connection after the first streamed chunk.",
)
flags.DEFINE_float(
    "invalid_fraction",
    0.0,
    "--url: share of requests sent with an invalid field (max_tokens=-1); each must get a 400.",
)


def mixed_workload(n: int, seed: int, vocab_lo: int = 100, vocab_hi: int = 20000):
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(vocab_lo, vocab_hi, size=int(rng.integers(32, 513))).tolist() for _ in range(n)
    ]
    outputs = [int(rng.integers(16, 257)) for _ in range(n)]
    return prompts, outputs


arrivals = serving_client.arrivals


def percentiles(values) -> dict:
    v = np.asarray(values, float)
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def serve(llm: LLM, prompts, max_tokens, arrive, structured=None) -> dict:
    """Feed requests at their arrival times; time every token of every request. structured:
    a StructuredOutputsParams or None per request (default: none constrained)."""
    structured = structured or [None] * len(prompts)
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, structured_outputs=so)
        for m, so in zip(max_tokens, structured)
    ]
    n = len(prompts)
    first, last, counts, tokens = {}, {}, {}, {}
    start = time.perf_counter()
    peak_kv = 0.0
    if llm.engine_kind == "static":
        submit = {}
        for chunk in llm.stream(prompts, params):
            now = time.perf_counter() - start
            first.setdefault(chunk.request_id, now)
            last[chunk.request_id] = now
            counts[chunk.request_id] = len(chunk.token_ids)
            tokens[chunk.request_id] = chunk.token_ids
        ids = sorted(first, key=int)
        submit = dict.fromkeys(ids, 0.0)
    else:
        engine = llm.engine
        submit, ids = {}, []
        next_req = 0
        while next_req < n or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while next_req < n and arrive[next_req] <= now:
                rid = engine.add_request(prompts[next_req], params[next_req])
                submit[rid] = now
                ids.append(rid)
                next_req += 1
            if not engine.has_unfinished_requests():
                time.sleep(min(0.01, max(0.0, arrive[next_req] - now)))
                continue
            for chunk in engine.step():
                t = time.perf_counter() - start
                if chunk.delta_token_ids:
                    first.setdefault(chunk.request_id, t)
                    last[chunk.request_id] = t
                    counts[chunk.request_id] = len(chunk.token_ids)
                    tokens[chunk.request_id] = chunk.token_ids
            peak_kv = max(peak_kv, engine.scheduler.kv_usage())
    wall = time.perf_counter() - start
    total = sum(counts.values())
    ttft = [first[i] - submit[i] for i in ids]
    tpot = [(last[i] - first[i]) / (counts[i] - 1) for i in ids if counts[i] > 1]
    return {
        "requests": n,
        "output_tokens": total,
        "wall_s": wall,
        "output_tokens_per_s": total / wall,
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "peak_kv_usage": peak_kv,
        "_token_ids": [list(tokens[i]) for i in ids],  # in submission order; not in --json
    }


@functools.cache
def mesh():
    """The --mesh_data x --mesh_model mesh (None for 1x1), built once per process: the
    scenarios make several LLMs, and jax.distributed starts only once."""
    return shared_flags.mesh_from_flags()


# The resolved --config (set in main): its speculative section reaches the continuous engine.
CONFIG: dict | None = None


def make_llm(engine: str, **overrides) -> LLM:
    """An LLM from the shared model and engine flags (--max_num_seqs is also the static
    batch size), on the mesh built once per process."""
    kwargs = dict(
        shared_flags.llm_kwargs(mesh=mesh(), config=CONFIG if engine == "continuous" else None),
        max_model_len=FLAGS.max_model_len,
        engine=engine,
        progress=False,
    )
    kwargs.update(overrides)
    return LLM(**kwargs)


def scenario_mixed(results):
    prompts, outs = mixed_workload(FLAGS.num_requests, FLAGS.seed)
    arrive = arrivals(len(prompts), FLAGS.request_rate, FLAGS.seed)
    for kind in ("continuous", "static"):
        llm = make_llm(kind)
        if FLAGS.full_warmup:
            # Same lengths and arrivals, other token ids (no prefix-cache hits carry over).
            warm_p, _ = mixed_workload(FLAGS.num_requests, FLAGS.seed, 20000, 40000)
            serve(llm, warm_p, outs, arrive)
        else:
            warm_p, warm_o = mixed_workload(8, FLAGS.seed + 100)
            serve(llm, warm_p, [4] * len(warm_o), np.zeros(len(warm_p)))
        results[f"mixed_{kind}"] = serve(llm, prompts, outs, arrive)
        if kind == "continuous":
            results["mixed_continuous"]["prefix_hit_rate"] = llm.engine.scheduler.prefix_hit_rate()
    results["mixed_speedup"] = (
        results["mixed_continuous"]["output_tokens_per_s"]
        / results["mixed_static"]["output_tokens_per_s"]
    )


def decode32_workload(seed: int):
    """32 prompts of 128 token ids, and a warm-up set of the same shape with other ids."""
    rng = np.random.default_rng(seed + 7)
    prompts = [rng.integers(100, 20000, size=128).tolist() for _ in range(32)]
    warm = [rng.integers(100, 20000, size=128).tolist() for _ in range(32)]
    return prompts, warm


def scenario_decode32(results):
    # Warm-up: the same workload with other token ids, so the timed run compiles nothing
    # (every step shape and page bucket was seen) and finds none of its prompts in the
    # prefix cache (its prefill is computed, as for new requests).
    prompts, warm = decode32_workload(FLAGS.seed)
    llm = make_llm("continuous")
    serve(llm, warm, [128] * 32, np.zeros(32))
    results["decode32"] = serve(llm, prompts, [128] * 32, np.zeros(32))
    results["decode32"]["attention_backend"] = llm.engine.backend
    batched = results["decode32"].pop("_token_ids")
    if FLAGS.check_single:
        check_single_requests(results, llm, prompts, batched)
    if FLAGS.compare_hf or FLAGS.compare_http:
        del llm  # its weights, page pool and threads go before HF or the server load theirs
        gc.collect()
    if FLAGS.compare_hf:
        compare_hf_decode32(results, prompts, batched)
    if FLAGS.compare_http:
        compare_http_decode32(results, prompts, warm)


def check_single_requests(results, llm, prompts, batched):
    """The first --check_single prompts again, each alone through the same engine: greedy
    tokens must equal the batched run's."""
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    n = min(FLAGS.check_single, len(prompts))
    differ = []
    for i in range(n):
        alone = llm.generate([prompts[i]], params)[0].token_ids
        if list(alone) != batched[i]:
            differ.append(i)
    results["decode32"]["single_request_check"] = {"checked": n, "differ": differ}


def compare_hf_decode32(results, prompts, batched):
    """decode32's prompts through HF transformers static batching, in this process."""
    from hf_static import hf_static_generate

    hf = hf_static_generate(prompts, 128, threads=FLAGS.hf_threads, dtype=FLAGS.hf_dtype)
    hf_ids = hf.pop("token_ids")
    # Information only: two f32 implementations may round differently and part ways.
    same = sum(a == b for a, b in zip(hf_ids, batched))
    hf["sequences_identical_to_engine"] = same
    results["hf_decode32"] = hf
    results["hf_decode32_ratio"] = (
        results["decode32"]["output_tokens_per_s"] / hf["output_tokens_per_s"]
    )


# Objects of a few fields (strings, bounded integers, enum arrays), at least 64 of them: no
# valid output is shorter than 128 tokens, so constrained requests run their full length.
STRUCTURED_SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
}


def scenario_structured(results):
    n = 32
    fraction = FLAGS.structured_fraction
    if not 0 < fraction <= 1:
        raise app.UsageError(f"--structured_fraction={fraction} must be in (0, 1]")
    so = StructuredOutputsParams(json=STRUCTURED_SCHEMA)
    # Constrained requests spread evenly over the batch.
    constrained = [so if int((i + 1) * fraction) > int(i * fraction) else None for i in range(n)]
    plain_prompts, warm = decode32_workload(FLAGS.seed)
    so_prompts, warm2 = decode32_workload(FLAGS.seed + 1)
    llm = make_llm("continuous")
    arrive = np.zeros(n)
    serve(llm, warm, [128] * n, arrive)
    serve(llm, warm2, [128] * n, arrive, constrained)
    masks = llm.engine.structured_outputs
    plain = serve(llm, plain_prompts, [128] * n, arrive)
    seconds, count = masks.mask_seconds, masks.num_masks
    run = serve(llm, so_prompts, [128] * n, arrive, constrained)
    run["num_constrained"] = sum(c is not None for c in constrained)
    run["mask_ms_per_token"] = 1e3 * (masks.mask_seconds - seconds) / (masks.num_masks - count)
    run["masks"] = masks.num_masks - count
    results["structured_plain"] = plain
    results["structured"] = run
    results["structured_ratio"] = run["output_tokens_per_s"] / plain["output_tokens_per_s"]


def scenario_capacity(results):
    prompts, outs = mixed_workload(FLAGS.num_requests, FLAGS.seed)
    llm = make_llm("continuous")
    page = llm.engine_config.page_size
    pages = llm.engine.num_pages - 1
    lengths = [len(p) + o for p, o in zip(prompts, outs)]
    # Paged: sequences of the workload, in order, until their pages exceed the pool.
    used, fit_paged = 0, 0
    for n in lengths:
        need = -(-n // page)
        if used + need > pages:
            break
        used, fit_paged = used + need, fit_paged + 1
    if fit_paged == len(lengths):  # the workload fits whole: extrapolate by the mean
        fit_paged = int(pages / np.mean([-(-n // page) for n in lengths]))
    fit_contiguous = (pages * page) // FLAGS.max_model_len
    results["capacity"] = {
        "kv_tokens": pages * page,
        "sequences_paged": fit_paged,
        "sequences_contiguous": fit_contiguous,
        "ratio": fit_paged / max(fit_contiguous, 1),
    }


def scenario_prefix(results):
    rng = np.random.default_rng(FLAGS.seed + 3)
    prefix = rng.integers(100, 20000, size=FLAGS.prefix_len).tolist()
    llm = make_llm("continuous", max_model_len=max(FLAGS.max_model_len, FLAGS.prefix_len + 64))
    params = SamplingParams(temperature=0.0, max_tokens=1)
    # Compile both shapes first (a full prefill, and a short chunk over cached pages) with a
    # prefix of the same length that the measured requests do not share.
    warm = rng.integers(100, 20000, size=FLAGS.prefix_len).tolist()
    for suffix in ([1, 2, 3], [4, 5, 6]):
        llm.generate([warm + suffix], params)
    times = []
    for suffix in ([1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]):
        t0 = time.perf_counter()
        llm.generate([prefix + suffix], params)
        times.append(time.perf_counter() - t0)
    results["prefix"] = {
        "prefix_len": FLAGS.prefix_len,
        "ttft_first_s": times[0],
        "ttft_second_s": times[1],
        "speedup": times[0] / times[1],
        "prefix_hit_rate": llm.engine.scheduler.prefix_hit_rate(),
    }


# -- poisson: goodput of continuous against static batching under Poisson arrivals --------


def length_range(name: str) -> tuple[int, int]:
    """A LO,HI flag of two positive integers, LO <= HI."""
    value = FLAGS[name].value
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise app.UsageError(f"--{name}={','.join(value)}: give LO,HI (integers)") from None
    if not 1 <= lo <= hi:
        raise app.UsageError(f"--{name}={lo},{hi}: need 1 <= LO <= HI")
    return lo, hi


def poisson_workload(
    n: int, seed: int, prompt_len, output_len, vocab=(100, 20000), ids_seed: int | None = None
):
    """n prompts and output lengths drawn from seed; the prompts' token ids from ids_seed
    (default: seed) in [vocab): the same lengths with other ids share no prefix."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, size=n).tolist()
    ids = np.random.default_rng(seed if ids_seed is None else ids_seed)
    prompts = [ids.integers(vocab[0], vocab[1], size=int(k)).tolist() for k in lens]
    return prompts, [int(o) for o in outputs]


def serve_arrivals(llm: LLM, prompts, max_tokens, arrive) -> list[dict]:
    """Serve request i from time arrive[i] (seconds after the start); per request: arrival,
    first-token and finish times (seconds) and output tokens. TTFT counts from the arrival,
    so time spent waiting for the engine counts against it.

    continuous: each request joins the engine at the first step boundary after it arrives.
    static: whenever the engine is free it takes every request that has arrived (FIFO, at
    most max_num_seqs) as one padded batch and runs it to completion; when none has arrived
    it sleeps until the next one does."""
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    n = len(prompts)
    rec = [
        {"arrival": float(arrive[i]), "first": None, "finish": None, "tokens": 0} for i in range(n)
    ]

    def record(i, chunk, t):
        if chunk.token_ids and rec[i]["first"] is None:
            rec[i]["first"] = t
        rec[i]["tokens"] = len(chunk.token_ids)
        if chunk.finished:
            rec[i]["finish"] = t

    start = time.perf_counter()
    next_req = 0
    if llm.engine_kind == "static":
        size = llm.engine_config.max_num_seqs
        while next_req < n:
            now = time.perf_counter() - start
            if arrive[next_req] > now:
                time.sleep(arrive[next_req] - now)
                continue
            batch = [i for i in range(next_req, n) if arrive[i] <= now][:size]
            next_req += len(batch)
            # The stream's request ids are new to this call; rows first appear in batch order.
            index: dict[str, int] = {}
            for chunk in llm.stream([prompts[i] for i in batch], [params[i] for i in batch]):
                if chunk.request_id not in index:
                    index[chunk.request_id] = batch[len(index)]
                i = index[chunk.request_id]
                record(i, chunk, time.perf_counter() - start)
        return rec
    engine = llm.engine
    index = {}
    while next_req < n or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while next_req < n and arrive[next_req] <= now:
            index[engine.add_request(prompts[next_req], params[next_req])] = next_req
            next_req += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrive[next_req] - now))
            continue
        for chunk in engine.step():
            record(index[chunk.request_id], chunk, time.perf_counter() - start)
    return rec


def goodput_summary(rec: list[dict], ttft_ms: float, tpot_ms: float) -> dict:
    """Latency percentiles (ms) and goodput: requests meeting both targets per second, over
    the wall time from the first arrival's start (t=0) to the last finish."""
    ttft = np.array([r["first"] - r["arrival"] for r in rec])
    e2e = np.array([r["finish"] - r["arrival"] for r in rec])
    tokens = np.array([r["tokens"] for r in rec])
    # Time per output token after the first (0 for one-token answers, as vLLM).
    tpot = np.where(tokens > 1, (e2e - ttft) / np.maximum(tokens - 1, 1), 0.0)
    good = (ttft * 1e3 <= ttft_ms) & (tpot * 1e3 <= tpot_ms)
    wall = max(r["finish"] for r in rec)

    def pct(v):
        return {f"p{q}": float(np.percentile(v * 1e3, q)) for q in (50, 90, 99)}

    return {
        "requests": len(rec),
        "output_tokens": int(tokens.sum()),
        "wall_s": float(wall),
        "output_tokens_per_s": float(tokens.sum() / wall),
        "ttft_ms": pct(ttft),
        "tpot_ms": pct(tpot),
        "e2e_ms": pct(e2e),
        "good_requests": int(good.sum()),
        "good_fraction": float(good.mean()),
        "goodput_rps": float(good.sum() / wall),
    }


def scenario_poisson(results):
    try:
        rates = [float(r) for r in FLAGS.poisson_rates]
    except ValueError:
        raise app.UsageError(f"--poisson_rates={FLAGS.poisson_rates}: not numbers") from None
    if not rates or any(not (0 < r < float("inf")) for r in rates):
        raise app.UsageError(f"--poisson_rates={FLAGS.poisson_rates}: need finite rates > 0")
    lens = length_range("poisson_prompt_len"), length_range("poisson_output_len")
    n, targets = FLAGS.poisson_requests, (FLAGS.ttft_target_ms, FLAGS.tpot_target_ms)

    # Every run (each rate's warm-up and timed run) gets the same lengths with token ids of
    # its own: the engine keeps its prefix cache between runs, and a run that re-served an
    # earlier run's prompts would skip their prefill (later rates once looked far better than
    # the first for that reason alone).
    def workload(run: int):
        return poisson_workload(n, FLAGS.seed, *lens, ids_seed=FLAGS.seed * 1000 + run)

    outs = workload(0)[1]
    out = {"targets_ms": {"ttft": targets[0], "tpot": targets[1]}, "rates": {}}
    for kind in ("continuous", "static"):
        llm = make_llm(kind)
        # Every rate's schedule once with other ids first, so the timed runs compile (almost)
        # nothing: the step shapes a schedule meets depend on how arrivals fall between steps.
        for i, rate in enumerate(sorted(rates)):
            serve_arrivals(llm, workload(2 * i + 1)[0], outs, arrivals(n, rate, FLAGS.seed))
        for i, rate in enumerate(sorted(rates)):
            prompts = workload(2 * i + 2)[0]
            before = compile_cache.stats()
            rec = serve_arrivals(llm, prompts, outs, arrivals(n, rate, FLAGS.seed))
            after = compile_cache.stats()
            r = out["rates"].setdefault(str(rate), {})[kind] = goodput_summary(rec, *targets)
            # Programs traced or compiled during the timed run (shapes the warm-up missed).
            r["programs_during_run"] = after["programs"] - before["programs"]
            r["compile_s_during_run"] = round(
                after["compile_seconds"] - before["compile_seconds"], 2
            )
            print(  # progress: a loaded machine can take minutes per rate
                f"poisson {kind} at {rate:g}/s: {r['good_fraction']:.2f} met the targets, "
                f"goodput {r['goodput_rps']:.3f}/s; {r['programs_during_run']} programs "
                f"({r['compile_s_during_run']:.1f} s compiling) during the run",
                flush=True,
            )
        del llm
        gc.collect()
    ok = [r for r in sorted(rates) if out["rates"][str(r)]["continuous"]["good_fraction"] >= 0.9]
    out["highest_rate_continuous_90pct"] = ok[-1] if ok else None
    if ok:
        at = out["rates"][str(ok[-1])]
        static = at["static"]["goodput_rps"]
        out["goodput_ratio_at_that_rate"] = (
            at["continuous"]["goodput_rps"] / static if static > 0 else float("inf")
        )
    results["poisson"] = out


def print_poisson(p: dict) -> None:
    rows = []
    for rate, by_kind in p["rates"].items():
        for kind, r in by_kind.items():
            rows.append(
                (
                    rate,
                    kind,
                    f"{r['good_fraction']:.2f}",
                    f"{r['goodput_rps']:.3f}",
                    f"{r['output_tokens_per_s']:.1f}",
                    "/".join(f"{r['ttft_ms'][q]:.0f}" for q in ("p50", "p90", "p99")),
                    "/".join(f"{r['tpot_ms'][q]:.0f}" for q in ("p50", "p90", "p99")),
                    "/".join(f"{r['e2e_ms'][q]:.0f}" for q in ("p50", "p90", "p99")),
                )
            )
    t = p["targets_ms"]
    print(f"poisson: targets TTFT <= {t['ttft']:g} ms and TPOT <= {t['tpot']:g} ms")
    headers = ["rate/s", "engine", "met", "goodput/s", "out tok/s"]
    headers += ["TTFT p50/90/99 ms", "TPOT p50/90/99 ms", "e2e p50/90/99 ms"]
    report.print_table(headers, rows)
    top = p["highest_rate_continuous_90pct"]
    if top is None:
        print("continuous batching met the targets for >= 90% of requests at no rate measured")
    else:
        print(
            f"highest rate with continuous >= 90% meeting targets: {top:g}/s; goodput "
            f"continuous / static there: {p['goodput_ratio_at_that_rate']:.2f}x"
        )


# -- HTTP: a server subprocess, and the client --------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argv(port: int) -> list[str]:
    """scripts/serve.py with this run's model and engine flags (those not None)."""
    argv = [sys.executable, os.path.join(os.path.dirname(__file__), "serve.py")]
    argv += ["--port", str(port), "--log_level", "warning"]
    # The config file and its overrides (for what no flag carries: speculative decoding).
    argv += [a for a in sys.argv[1:] if a.startswith(("--config", "-config"))]
    for name in ["model", "dtype", "quantization", *shared_flags.ENGINE_FLAGS, "max_model_len"]:
        value = FLAGS[name].value
        if isinstance(value, bool):
            argv.append(f"--{'' if value else 'no'}{name}")
        elif value is not None:
            argv.append(f"--{name}={value}")
    return argv


@contextlib.contextmanager
def server_subprocess(timeout_s: float = 600.0):
    """Start scripts/serve.py on a free port, wait for /health 200, yield its base URL, then
    stop it with SIGTERM (SIGKILL after 30 s). Its output goes to a temporary log, printed
    if it fails to come up."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(server_argv(port), stdout=log, stderr=subprocess.STDOUT)

        def output() -> str:
            log.seek(0)
            return log.read()

        try:
            serving_client.wait_healthy(url, proc, timeout_s, output)
            yield url
        finally:
            serving_client.stop_server(proc)


def run_client(
    url, prompts, max_tokens, *, model, rate=0.0, concurrency=None, disconnect=0.0, invalid=0.0
):
    """One client run: (results, duration). `disconnect` / `invalid`: shares of the requests
    that drop mid-stream / carry an invalid field (serving_client.mark_requests)."""
    requests = [serving_client.ClientRequest(p, m) for p, m in zip(prompts, max_tokens)]
    try:
        requests = serving_client.mark_requests(requests, disconnect, invalid, FLAGS.seed)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return asyncio.run(
        serving_client.run_workload(
            url,
            requests,
            model=model,
            api_key=FLAGS.api_key,
            request_rate=rate,
            max_concurrency=concurrency,
            ignore_eos=FLAGS.ignore_eos,
            seed=FLAGS.seed,
            timeout_s=FLAGS.request_timeout_s,
        )
    )


def compare_http_decode32(results, prompts, warm):
    """decode32's workload through the HTTP server, after the same warm-up."""
    with server_subprocess() as url:
        model = asyncio.run(serving_client.first_model(url, FLAGS.api_key))
        run_client(url, warm, [128] * len(warm), model=model)
        cpu = time.process_time()
        got, duration = run_client(url, prompts, [128] * len(prompts), model=model)
        cpu = time.process_time() - cpu
    summary = serving_client.summarize(got, duration)
    # The client shares the machine with the server: its CPU time is load the in-process
    # run does not carry (on 2 cores, a part of the gap).
    summary["client_cpu_s"] = cpu
    results["http_decode32"] = summary
    results["http_decode32_ratio"] = (
        summary["output_tokens_per_s"] / results["decode32"]["output_tokens_per_s"]
    )


def client_workload():
    if FLAGS.workload == "mixed":
        return mixed_workload(FLAGS.num_requests, FLAGS.seed)
    if FLAGS.workload == "decode32":
        prompts, _ = decode32_workload(FLAGS.seed)
        return prompts, [128] * len(prompts)
    rng = np.random.default_rng(FLAGS.seed)
    prompts = [
        rng.integers(100, 20000, size=FLAGS.input_len).tolist() for _ in range(FLAGS.num_requests)
    ]
    return prompts, [FLAGS.output_len] * FLAGS.num_requests


def client_mode(results):
    """--url: the workload against a running server."""
    try:
        goodput = serving_client.parse_goodput(FLAGS.goodput)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    url = FLAGS.url.rstrip("/").removesuffix("/v1")
    model = FLAGS.served_model or asyncio.run(serving_client.first_model(url, FLAGS.api_key))
    prompts, outs = client_workload()
    if FLAGS.full_warmup:
        # Same lengths, other token ids (another seed; ids < 20000 fit most vocabularies):
        # compiles every shape, shares no prefix.
        rng = np.random.default_rng(FLAGS.seed + 100)
        warm = [rng.integers(100, 20000, size=len(p)).tolist() for p in prompts]
        run_client(url, warm, outs, model=model, concurrency=FLAGS.max_concurrency)
    else:
        run_client(url, [prompts[0]], [4], model=model)
    got, duration = run_client(
        url,
        prompts,
        outs,
        model=model,
        rate=FLAGS.request_rate,
        concurrency=FLAGS.max_concurrency,
        disconnect=FLAGS.disconnect_fraction,
        invalid=FLAGS.invalid_fraction,
    )
    # What the server holds once the run is over: anything running, waiting or in the KV
    # cache now belongs to a request it lost (e.g. one whose client disconnected).
    after = asyncio.run(serving_client.wait_idle(url, FLAGS.api_key))
    results["client"] = {
        "url": url,
        "served_model": model,
        **serving_client.summarize(got, duration, goodput),
        "server_after_run": after,
        "requests": serving_client.per_request(got),
    }


SCENARIOS = {
    "mixed": scenario_mixed,
    "decode32": scenario_decode32,
    "capacity": scenario_capacity,
    "prefix": scenario_prefix,
    "poisson": scenario_poisson,
    "structured": scenario_structured,
}


def print_table(results):
    rows = []
    for key in ("mixed_continuous", "mixed_static", "decode32", "structured_plain", "structured"):
        if key in results:
            r = results[key]
            rows.append(
                (
                    key,
                    f"{r['output_tokens_per_s']:.1f}",
                    f"{r['ttft_s']['p50']:.2f}/{r['ttft_s']['p99']:.2f}",
                    f"{r['tpot_s']['p50'] * 1e3:.0f}/{r['tpot_s']['p99'] * 1e3:.0f}",
                    f"{r['peak_kv_usage']:.2f}",
                )
            )
    if rows:
        headers = ["run", "out tok/s", "TTFT p50/p99 s", "TPOT p50/p99 ms", "peak KV"]
        report.print_table(headers, rows)
    if "structured_ratio" in results:
        r = results["structured"]
        print(
            f"{r['num_constrained']} of {r['requests']} requests constrained: "
            f"{results['structured_ratio']:.3f}x the unconstrained output tokens/s; mask "
            f"{r['mask_ms_per_token']:.3f} ms per constrained token (host, on a worker)"
        )
    if "mixed_speedup" in results:
        print(f"continuous / static output tokens/s: {results['mixed_speedup']:.2f}x")
    if "capacity" in results:
        c = results["capacity"]
        print(
            f"KV budget {c['kv_tokens']} tokens: {c['sequences_paged']} sequences paged vs "
            f"{c['sequences_contiguous']} contiguous ({c['ratio']:.1f}x)"
        )
    if "prefix" in results:
        p = results["prefix"]
        print(
            f"shared {p['prefix_len']}-token prefix: TTFT {p['ttft_first_s']:.2f} s then "
            f"{p['ttft_second_s']:.3f} s ({p['speedup']:.1f}x)"
        )
    if "poisson" in results:
        print_poisson(results["poisson"])
    if "single_request_check" in results.get("decode32", {}):
        c = results["decode32"]["single_request_check"]
        verdict = "identical" if not c["differ"] else f"DIFFER at {c['differ']}"
        print(f"decode32 greedy vs single-request generation ({c['checked']} prompts): {verdict}")
    if "hf_decode32" in results:
        h = results["hf_decode32"]
        print(
            f"HF static batching ({h['engine']}, {h['dtype']}, {h['torch_threads']} threads): "
            f"{h['output_tokens_per_s']:.1f} out tok/s; engine / HF: "
            f"{results['hf_decode32_ratio']:.2f}x (HF sequences identical to the engine's: "
            f"{h['sequences_identical_to_engine']}/{h['batch']})"
        )
    if "http_decode32" in results:
        d, h = results["decode32"], results["http_decode32"]
        rows = [
            (
                "decode32 in-process",
                f"{d['output_tokens_per_s']:.1f}",
                "32/0",
                f"{d['ttft_s']['p50']:.2f}/{d['ttft_s']['p99']:.2f}",
                f"{d['tpot_s']['p50'] * 1e3:.0f}/{d['tpot_s']['p99'] * 1e3:.0f}",
            ),
            (
                "decode32 over HTTP",
                f"{h['output_tokens_per_s']:.1f}",
                f"{h['completed']}/{h['failed']}",
                f"{h['ttft_ms']['p50'] / 1e3:.2f}/{h['ttft_ms']['p99'] / 1e3:.2f}",
                f"{h['tpot_ms']['p50']:.0f}/{h['tpot_ms']['p99']:.0f}",
            ),
        ]
        headers = ["run", "out tok/s", "ok/failed", "TTFT p50/p99 s", "TPOT p50/p99 ms"]
        report.print_table(headers, rows)
        print(
            f"HTTP / in-process output tokens/s: {results['http_decode32_ratio']:.3f}x "
            f"(client CPU {h['client_cpu_s']:.1f} s in {h['duration_s']:.1f} s)"
        )
    if "client" in results:
        c = results["client"]
        print(f"{c['url']} ({c['served_model']})")
        head, totals, lat_head, latencies = serving_client.summary_tables(c)
        report.print_table(head, totals)
        report.print_table(lat_head, latencies)
        for error in c["errors"]:
            print(f"failed: {error}")
        if c.get("server_after_run"):
            left = ", ".join(f"{k} {v:g}" for k, v in c["server_after_run"].items())
            print(f"server after the run: {left}")


CLIENT_FLAGS = ["url", "served_model", "workload", "input_len", "output_len", "max_concurrency"]
CLIENT_FLAGS += ["goodput", "ignore_eos", "full_warmup"]


def main(argv):
    del argv
    global CONFIG
    CONFIG = shared_flags.apply_config()
    if FLAGS.dry_run:
        return shared_flags.dry_run(CONFIG)
    if FLAGS.url:
        names = [*CLIENT_FLAGS, "num_requests", "request_rate", "seed"]
        results = {"flags": {k: FLAGS[k].value for k in names}}
        client_mode(results)
        print_table(results)
        report.write_json(FLAGS.json, results)
        return
    names = ["model", "dtype", "quantization", "scenarios", "num_requests", "request_rate"]
    names += [*shared_flags.ENGINE_FLAGS, "max_model_len", "seed", "mesh_data", "mesh_model"]
    names += ["compare_http", "structured_fraction", "compare_hf", "hf_threads", "hf_dtype"]
    names += ["check_single"]
    if "poisson" in FLAGS.scenarios.split(","):
        names += ["poisson_rates", "poisson_requests", "poisson_prompt_len", "poisson_output_len"]
        names += ["ttft_target_ms", "tpot_target_ms"]
    results = {"flags": {k: FLAGS[k].value for k in names}}
    if FLAGS.compare_http:
        if "decode32" not in FLAGS.scenarios.split(","):
            raise app.UsageError("--compare_http compares decode32: add it to --scenarios")
        if FLAGS.mesh_data * FLAGS.mesh_model != 1:
            raise app.UsageError("--compare_http: scripts/serve.py runs on one device (no mesh)")
    for flag in ("compare_hf", "check_single"):
        if FLAGS[flag].value and "decode32" not in FLAGS.scenarios.split(","):
            raise app.UsageError(f"--{flag} works on decode32: add it to --scenarios")
    for name in FLAGS.scenarios.split(","):
        if name not in SCENARIOS:
            raise app.UsageError(f"--scenarios: {name!r} is not one of {sorted(SCENARIOS)}")
        SCENARIOS[name](results)
    print_table(results)
    report.write_json(FLAGS.json, results)


if __name__ == "__main__":
    app.run(main, flags_parser=shared_flags.parse_flags)
