"""Speed of prefill and decode at batch 1, with the weight-read bandwidth they achieve.

    python scripts/benchmark.py --json results/benchmark.json
    python scripts/benchmark.py --quantization int8+embed --json results/benchmark_int8.json

Prefill: tokens/s for one `--prompt_len`-token prompt (time to the first token, sampling
included). Decode: tokens/s over `--decode_tokens` generated tokens through the same loop
`LLM.generate` runs (host round trip and sampling included). Decode at batch 1 reads every
weight once per token, so weight bytes x tokens/s is the bandwidth it achieves; it is printed
next to this machine's read bandwidth measured the same way (a jitted reduction over a large
array).
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jax_infer import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model name or path.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_string(
    "quantization",
    "none",
    "none, or a jax_infer.quant scheme: int8, int8-g64, int4, ... (+embed also quantizes the "
    "embedding and LM head). Weight bytes count the quantized arrays as stored: packed int4 is "
    "half a byte per weight, scales included.",
)
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens for the prefill measurement.")
flags.DEFINE_integer("decode_tokens", 128, "Generated tokens for the decode measurement.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")
flags.DEFINE_enum(
    "engine", "continuous", ["continuous", "static"], "Paged continuous engine or static batching."
)
flags.DEFINE_string("json", None, "Write the results to this JSON file.")

TEXT = (
    "The history of computing is a story of abstractions layered on abstractions. Early "
    "machines were programmed by rewiring; stored programs made software a thing of its own; "
    "compilers let people write for an idea of a machine rather than a machine. "
)


def read_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a jitted sum over an f32 array far larger than the caches."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    reduce = jax.jit(jnp.sum)
    reduce(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reduce(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def decode_read_bytes(params) -> int:
    """Weight bytes one decode step reads: every weight, except the embedding table when a
    separate [D, V] LM head exists (the lookup reads one row; on CPU a tied f32 embedding
    also gets a head copy, see model.llama.untie_lm_head)."""
    total = tree_bytes(params)
    if "lm_head" in params and "embed" in params:
        total -= tree_bytes(params["embed"])
    return total


def tree_bytes(tree) -> int:
    """Bytes of the arrays in a params (sub)tree; a quantized matrix is a pytree of its
    arrays (int8 values or packed int4 bytes, scales), so this counts what is stored."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def run_once(llm: LLM, prompt_ids: list[int], decode_tokens: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    stamps = []
    t0 = time.perf_counter()
    for _ in llm.stream([prompt_ids], params):
        stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    decode_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return ttft, decode_rate


def main(argv):
    del argv
    # Prefix caching off: the timed runs repeat one prompt, and a cache hit would turn the
    # prefill measurement into a one-token step.
    llm = LLM(
        model=FLAGS.model,
        dtype=FLAGS.dtype,
        max_num_seqs=1,
        engine=FLAGS.engine,
        enable_prefix_caching=False,
        quantization=None if FLAGS.quantization == "none" else FLAGS.quantization,
    )
    ids = llm.tokenizer.encode(TEXT * 64)
    while len(ids) < FLAGS.prompt_len:
        ids = ids + ids
    prompt_ids = ids[: FLAGS.prompt_len]
    run_once(llm, prompt_ids, FLAGS.decode_tokens)  # compile every shape used below
    runs = [run_once(llm, prompt_ids, FLAGS.decode_tokens) for _ in range(FLAGS.repeats)]
    ttft = float(np.median([r[0] for r in runs]))
    decode = float(np.median([r[1] for r in runs]))
    wbytes = decode_read_bytes(llm.params)
    machine_bw = read_bandwidth_gbs()
    result = {
        "model": FLAGS.model,
        "dtype": FLAGS.dtype,
        "quantization": FLAGS.quantization,
        "engine": FLAGS.engine,
        "prompt_len": FLAGS.prompt_len,
        "decode_tokens": FLAGS.decode_tokens,
        "prefill_tokens_per_s": FLAGS.prompt_len / ttft,
        "ttft_s": ttft,
        "decode_tokens_per_s": decode,
        "weight_bytes": wbytes,
        "stored_weight_bytes": tree_bytes(llm.params),
        "decode_weight_read_gb_per_s": wbytes * decode / 1e9,
        "machine_read_gb_per_s": machine_bw,
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
    }
    rows = [
        (
            "prefill tokens/s",
            f"{result['prefill_tokens_per_s']:.1f}",
            f"{FLAGS.prompt_len}-token prompt",
        ),
        ("decode tokens/s", f"{decode:.1f}", f"{FLAGS.decode_tokens} tokens, batch 1"),
        (
            "weights read per token (MB)",
            f"{wbytes / 1e6:.0f}",
            f"{FLAGS.dtype}, quantization {FLAGS.quantization}",
        ),
        (
            "decode weight read (GB/s)",
            f"{result['decode_weight_read_gb_per_s']:.1f}",
            "weights x tokens/s",
        ),
        ("machine read (GB/s)", f"{machine_bw:.1f}", "jitted sum over 512 MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>8}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>8}  {note}")
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
