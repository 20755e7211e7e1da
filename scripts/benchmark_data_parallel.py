"""Throughput of the continuous engine's data replicas: one batch of requests at data=1, 2, ...

    python scripts/benchmark_data_parallel.py --json results/data_parallel.json
    python scripts/benchmark_data_parallel.py --data_sizes=1,2,4 --num_requests=32

For each data size D the same requests (`--num_requests` prompts of `--prompt_len` random
tokens, `--max_tokens` greedy tokens each) run through `LLM(mesh=(D, 1))` with
`--max_num_seqs` seats per replica: once to compile, then timed. The table gives engine
steps, rows per step (mean and most, from `LLMEngine.stats()`), generated tokens/s and the
speed-up over D=1. On a CPU the devices are simulated (`jax_num_cpu_devices` is set to the
largest D unless JAX_NUM_CPU_DEVICES is given) and share the machine's cores, so the rows
per step are what data parallelism changes; the tokens/s say what this machine makes of it.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import report
import shared_flags
from absl import app, flags

from jax_infer import LLM, SamplingParams

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)
flags.DEFINE_list("data_sizes", ["1", "2"], "Data replica counts to compare.")
flags.DEFINE_integer("num_requests", 16, "Requests in the batch.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per request.")
flags.DEFINE_integer("max_tokens", 32, "Generated tokens per request.")
flags.DEFINE_integer("max_num_seqs", 8, "Seats per data replica.")
flags.DEFINE_integer("num_pages", 128, "KV pages per data replica.")


def make_prompts(vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    high = min(vocab_size, 1000)
    return [
        rng.integers(0, high, size=FLAGS.prompt_len).tolist() for _ in range(FLAGS.num_requests)
    ]


def run(data: int, params) -> dict:
    kwargs = shared_flags.llm_kwargs() | dict(
        mesh=(data, 1),
        max_num_seqs=FLAGS.max_num_seqs,
        num_pages=FLAGS.num_pages,
        enable_prefix_caching=False,
        progress=False,
    )
    llm = LLM(**kwargs)
    prompts = make_prompts(llm.config.vocab_size)
    llm.generate(prompts, params)  # compiles every step shape this batch meets
    before = llm.engine.stats()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = llm.engine.stats()
    steps = after["num_steps"] - before["num_steps"]
    rows = after["num_rows"] - before["num_rows"]
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "data": data,
        "steps": steps,
        "mean_rows_per_step": rows / steps,
        "max_rows_per_step": after["max_rows_per_step"],
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "token_ids": [o.token_ids for o in outs],
    }


def main(argv):
    del argv
    sizes = [int(d) for d in FLAGS.data_sizes]
    if any(d < 1 for d in sizes):
        raise ValueError(f"--data_sizes={FLAGS.data_sizes} is invalid: each must be >= 1")
    if "JAX_NUM_CPU_DEVICES" not in os.environ:
        jax.config.update("jax_num_cpu_devices", max(sizes))
    params = SamplingParams(temperature=0.0, max_tokens=FLAGS.max_tokens, ignore_eos=True)
    results = [run(d, params) for d in sizes]
    first = results[0]["token_ids"]
    for r in results:
        r["same_tokens_as_first"] = r.pop("token_ids") == first
    base = results[0]
    rows = []
    for r in results:
        rows.append(
            [
                r["data"],
                r["steps"],
                f"{r['mean_rows_per_step']:.1f}",
                r["max_rows_per_step"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                r["same_tokens_as_first"],
            ]
        )
    report.print_table(
        ["data", "steps", "rows/step", "max rows", "tok/s", "vs first", "same tokens"],
        rows,
    )
    report.write_json(
        FLAGS.json,
        {
            "model": FLAGS.model,
            "num_requests": FLAGS.num_requests,
            "prompt_len": FLAGS.prompt_len,
            "max_tokens": FLAGS.max_tokens,
            "max_num_seqs": FLAGS.max_num_seqs,
            "results": results,
        },
    )


if __name__ == "__main__":
    app.run(main)
