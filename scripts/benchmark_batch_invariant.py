"""The cost of batch-invariant mode (`LLM(batch_invariant=True)`, model/invariant.py).

    python scripts/benchmark_batch_invariant.py --json results/batch_invariant.json

One model loaded once, two engines over the same params: the default and batch_invariant.
Per batch size it times prefill (B prompts of --prompt_len tokens, one output token each:
prompt tokens/s) and decode (B requests with --decode_prompt_len-token prompts generating
--decode_tokens tokens: output tokens/s after every request has its first token). Each
measurement runs once to compile, then --repeats times with the two modes interleaved
(off, on, off, on, ...) so that load from other processes lands on both; the table shows
the median and the cost (1 - on / off). Quote the load average printed with it: on a
shared machine a few percent is within the noise.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import report
import shared_flags
from absl import app, flags

from jax_infer import LLM, SamplingParams
from jax_infer.engine import EngineConfig, LLMEngine

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model name or path.")
flags.DEFINE_list("prefill_batches", ["1", "8"], "Prefill batch sizes.")
flags.DEFINE_list("decode_batches", ["1", "8", "32"], "Decode batch sizes.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request in the prefill runs.")
flags.DEFINE_integer("decode_prompt_len", 16, "Prompt tokens per request in the decode runs.")
flags.DEFINE_integer("decode_tokens", 32, "Tokens generated per request in the decode runs.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Token budget per step (prefill chunk).")
flags.DEFINE_integer("repeats", 3, "Timed runs per mode and measurement (median reported).")
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)


def make_engine(llm: LLM, params, batch_invariant: bool) -> LLMEngine:
    ec = EngineConfig(
        max_num_seqs=64,
        max_num_batched_tokens=FLAGS.max_num_batched_tokens,
        num_pages=256,
        enable_prefix_caching=False,
        batch_invariant=batch_invariant,
    )
    return LLMEngine(
        llm.config,
        params,
        llm.tokenizer,
        dtype=llm.dtype,
        max_model_len=1024,
        engine_config=ec,
    )


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=length).tolist() for _ in range(batch)]


def timed_run(engine: LLMEngine, batch_prompts, max_tokens: int) -> tuple[float, float]:
    """(seconds to every request's first token, seconds from then to the end)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = {engine.add_request(p, params) for p in batch_prompts}
    started: set[str] = set()
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id in ids and out.token_ids:
                started.add(out.request_id)
        if t_first is None and started == ids:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return t_first - t0, t_end - t_first


def measure(engines, phase: str, batch: int, vocab: int) -> dict[bool, float]:
    """Median tokens/s of each mode for one phase and batch size."""
    if phase == "prefill":
        length, max_tokens = FLAGS.prompt_len, 1
    else:
        length, max_tokens = FLAGS.decode_prompt_len, FLAGS.decode_tokens
    rates: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(FLAGS.repeats + 1):  # rep 0 compiles
        for mode in (False, True):
            # Fresh prompts each run (no prefix cache anyway), the same for both modes.
            ps = prompts(batch, length, vocab, seed=rep)
            first, rest = timed_run(engines[mode], ps, max_tokens)
            if rep == 0:
                continue
            if phase == "prefill":
                rates[mode].append(batch * length / first)
            else:
                rates[mode].append(batch * (max_tokens - 1) / rest)
    return {mode: statistics.median(r) for mode, r in rates.items()}


def main(argv):
    del argv
    # Only the loaded weights are used: LLM's own engine (a small one) is dropped.
    llm = LLM(model=FLAGS.model, progress=False, max_model_len=256, num_pages=17)
    params = llm.params
    del llm.engine
    engines = {mode: make_engine(llm, params, mode) for mode in (False, True)}
    vocab = llm.config.vocab_size
    load_before = os.getloadavg()
    rows, results = [], []
    plan = [("prefill", int(b)) for b in FLAGS.prefill_batches]
    plan += [("decode", int(b)) for b in FLAGS.decode_batches]
    for phase, batch in plan:
        med = measure(engines, phase, batch, vocab)
        cost = 1.0 - med[True] / med[False]
        results.append(
            {
                "phase": phase,
                "batch": batch,
                "tok_s_default": med[False],
                "tok_s_batch_invariant": med[True],
                "cost": cost,
            }
        )
        rows.append([phase, batch, f"{med[False]:.1f}", f"{med[True]:.1f}", f"{100 * cost:+.1f}%"])
    load_after = os.getloadavg()
    print(
        f"{FLAGS.model}: prefill {FLAGS.prompt_len}-token prompts, decode "
        f"{FLAGS.decode_tokens} tokens after {FLAGS.decode_prompt_len}-token prompts; median of "
        f"{FLAGS.repeats}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    report.print_table(["phase", "batch", "default tok/s", "invariant tok/s", "cost"], rows)
    report.write_json(
        FLAGS.json,
        {
            "benchmark": "batch_invariant",
            "model": FLAGS.model,
            "prompt_len": FLAGS.prompt_len,
            "decode_prompt_len": FLAGS.decode_prompt_len,
            "decode_tokens": FLAGS.decode_tokens,
            "repeats": FLAGS.repeats,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": results,
        },
    )


if __name__ == "__main__":
    app.run(main)
