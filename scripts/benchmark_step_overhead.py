"""Host overhead of the engine: batch-1 decode through `LLM` against the bare jitted step.

    python scripts/benchmark_step_overhead.py --json results/step_overhead.json
    python scripts/benchmark_step_overhead.py --dtype bfloat16 --decode_tokens 256

In one run, on one model, it times

* bare step: the engine's own fused program (`runner.forward_and_sample`: forward and
  greedy sampling) for one decode row, called in a tight loop with every input already on the
  device, each step's token fed to the next on the device; no Python between steps but the
  call. The ceiling for the engine at batch 1.
* bare step + fetch: the same, bringing each token to the host before the next call (what
  a synchronous engine cannot avoid).
* LLM async / LLM sync: `LLM.stream` decode tokens/s (first to last token of one greedy
  request, ignore_eos) with EngineConfig.async_scheduling on and off: scheduling, layout,
  host-to-device copies, detokenization and output objects included.

The table gives each as tokens/s and as a share of the bare step (the target for LLM async is
>= 90%). Repeats interleave the four so machine load hits each alike; medians are reported.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import report
import shared_flags
from absl import app, flags

from jax_infer import LLM, SamplingParams
from jax_infer.attention import flat_tokens
from jax_infer.eval.speed import run_once
from jax_infer.runner import StepBatch, forward_and_sample
from jax_infer.scheduler import Request

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
shared_flags.define_engine_flags(names=["attention_backend", "kv_cache_dtype", "page_size"])
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens before the timed decode.")
flags.DEFINE_integer("decode_tokens", 128, "Decode steps timed per run.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions of each measurement (median reported).")


def bare_step(llm: LLM, position: int, steps: int, fetch: bool) -> float:
    """Decode tokens/s of the fused step for one row at `position`, inputs on the device."""
    runner = llm.engine.runner
    pages = list(range(1, position // runner.page_size + 2))
    req = Request(
        "bench",
        [1] * position,
        steps,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True),
    )
    batch = StepBatch(starts=[position], rows=[[1]], block_tables=[pages], sample=[req])
    meta, order, offsets = runner._layout(batch)
    tokens = flat_tokens(meta, batch.rows, offsets)
    _, sflags, inputs = runner._sampler_inputs(order, batch.sample)
    src = np.zeros(8, np.int32)
    dst = np.full(8, len(tokens), np.int32)
    dst[0] = offsets[0]  # the row's input token is the previous step's sampled one
    tokens, meta, src, dst, inputs = jax.device_put((tokens, meta, src, dst, inputs))
    static = dict(config=runner.config, dtype=runner.dtype, backend=runner.backend, flags=sflags)
    prev = jnp.zeros((1,), jnp.int32)

    def run(n):
        nonlocal prev
        for _ in range(n):
            res, runner.pool, _ = forward_and_sample(
                runner.params, tokens, meta, runner.pool, prev, src, dst, *inputs, **static
            )
            prev = res.token_ids
            if fetch:
                np.asarray(prev)
        jax.block_until_ready(prev)

    run(2)  # compile
    t0 = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - t0)


def llm_decode(llm: LLM, prompt_ids, steps: int, async_scheduling: bool) -> float:
    llm.engine.async_scheduling = async_scheduling
    return run_once(llm, prompt_ids, steps)[1]


def main(argv):
    del argv
    kwargs = shared_flags.llm_kwargs()
    llm = LLM(**kwargs, max_num_seqs=1, enable_prefix_caching=False, progress=False)
    rng = np.random.default_rng(0)
    prompt_ids = [int(t) for t in rng.integers(100, llm.config.vocab_size - 100, FLAGS.prompt_len)]
    steps = FLAGS.decode_tokens
    position = FLAGS.prompt_len + steps // 2  # the mean context of the LLM runs
    names = ["bare step", "bare step + fetch", "LLM async", "LLM sync"]
    runs = {
        "bare step": lambda: bare_step(llm, position, steps, fetch=False),
        "bare step + fetch": lambda: bare_step(llm, position, steps, fetch=True),
        "LLM async": lambda: llm_decode(llm, prompt_ids, steps, True),
        "LLM sync": lambda: llm_decode(llm, prompt_ids, steps, False),
    }
    load_before = os.getloadavg()
    for name in names:  # compile every program used
        runs[name]()
    samples = {name: [] for name in names}
    for _ in range(FLAGS.repeats):
        for name in names:
            samples[name].append(runs[name]())
    median = {name: float(np.median(v)) for name, v in samples.items()}
    bare = median["bare step"]
    rows = [
        (name, f"{median[name]:.1f}", f"{median[name] / bare:.1%}", f"{min(v):.1f}-{max(v):.1f}")
        for name, v in samples.items()
    ]
    report.print_table(["path", "decode tokens/s", "of bare step", "range"], rows)
    load_after = os.getloadavg()
    print(f"load average before {load_before}, after {load_after}")
    result = {
        "model": FLAGS.model,
        "dtype": FLAGS.dtype,
        "quantization": FLAGS.quantization,
        "attention_backend": llm.engine.backend,
        "prompt_len": FLAGS.prompt_len,
        "decode_tokens": steps,
        "repeats": FLAGS.repeats,
        "tokens_per_s": median,
        "runs_tokens_per_s": samples,
        "llm_async_over_bare": median["LLM async"] / bare,
        "llm_sync_over_bare": median["LLM sync"] / bare,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    report.write_json(FLAGS.json, result)


if __name__ == "__main__":
    app.run(main, flags_parser=shared_flags.parse_flags)
