"""Serving benchmarks: continuous batching against static batching, batched decode, KV
capacity with pages against contiguous reservation, and TTFT with a shared prefix.

    python scripts/benchmark_serving.py --json results/serving.json
    python scripts/benchmark_serving.py --scenarios=decode32,prefix --json results/serving.json

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
"""

from __future__ import annotations

import functools
import time

import numpy as np
import report
import shared_flags
from absl import app, flags

from jax_infer import LLM, SamplingParams

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
shared_flags.define_engine_flags()
shared_flags.define_mesh_flags()
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_string("scenarios", "mixed,decode32,capacity,prefix", "Which scenarios to run.")
flags.DEFINE_integer("num_requests", 64, "Requests in the mixed workload.")
flags.DEFINE_float("request_rate", 0.0, "Poisson arrivals per second; 0 = all at once.")
flags.DEFINE_integer("max_model_len", 2048, "Longest request accepted.")
flags.DEFINE_integer("prefix_len", 1000, "Shared prefix length for the prefix scenario.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_bool(
    "full_warmup",
    True,
    "Serve the mixed workload once (other token ids) before timing it, so the timed run "
    "measures steady-state serving rather than XLA compiling new step shapes.",
)


def mixed_workload(n: int, seed: int, vocab_lo: int = 100, vocab_hi: int = 20000):
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(vocab_lo, vocab_hi, size=int(rng.integers(32, 513))).tolist() for _ in range(n)
    ]
    outputs = [int(rng.integers(16, 257)) for _ in range(n)]
    return prompts, outputs


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    if rate <= 0:
        return np.zeros(n)
    return np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, size=n))


def percentiles(values) -> dict:
    v = np.asarray(values, float)
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def serve(llm: LLM, prompts, max_tokens, arrive) -> dict:
    """Feed requests at their arrival times; time every token of every request."""
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    n = len(prompts)
    first, last, counts = {}, {}, {}
    start = time.perf_counter()
    peak_kv = 0.0
    if llm.engine_kind == "static":
        submit = {}
        for chunk in llm.stream(prompts, params):
            now = time.perf_counter() - start
            first.setdefault(chunk.request_id, now)
            last[chunk.request_id] = now
            counts[chunk.request_id] = len(chunk.token_ids)
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
    }


@functools.cache
def mesh():
    """The --mesh_data x --mesh_model mesh (None for 1x1), built once per process: the
    scenarios make several LLMs, and jax.distributed starts only once."""
    return shared_flags.mesh_from_flags()


def make_llm(engine: str, **overrides) -> LLM:
    """An LLM from the shared model and engine flags (--max_num_seqs is also the static
    batch size), on the mesh built once per process."""
    kwargs = dict(
        shared_flags.llm_kwargs(mesh=mesh()),
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


def scenario_decode32(results):
    rng = np.random.default_rng(FLAGS.seed + 7)
    prompts = [rng.integers(100, 20000, size=128).tolist() for _ in range(32)]
    # Warm-up: the same workload with other token ids, so the timed run compiles nothing
    # (every step shape and page bucket was seen) and finds none of its prompts in the
    # prefix cache (its prefill is computed, as for new requests).
    warm = [rng.integers(100, 20000, size=128).tolist() for _ in range(32)]
    llm = make_llm("continuous")
    serve(llm, warm, [128] * 32, np.zeros(32))
    results["decode32"] = serve(llm, prompts, [128] * 32, np.zeros(32))
    results["decode32"]["attention_backend"] = llm.engine.backend


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


SCENARIOS = {
    "mixed": scenario_mixed,
    "decode32": scenario_decode32,
    "capacity": scenario_capacity,
    "prefix": scenario_prefix,
}


def print_table(results):
    rows = []
    for key in ("mixed_continuous", "mixed_static", "decode32"):
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


def main(argv):
    del argv
    names = ["model", "dtype", "quantization", "scenarios", "num_requests", "request_rate"]
    names += [*shared_flags.ENGINE_FLAGS, "max_model_len", "seed", "mesh_data", "mesh_model"]
    results = {"flags": {k: FLAGS[k].value for k in names}}
    for name in FLAGS.scenarios.split(","):
        if name not in SCENARIOS:
            raise app.UsageError(f"--scenarios: {name!r} is not one of {sorted(SCENARIOS)}")
        SCENARIOS[name](results)
    print_table(results)
    report.write_json(FLAGS.json, results)


if __name__ == "__main__":
    app.run(main)
