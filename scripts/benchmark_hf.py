"""HF transformers static batching on the decode32 workload: the reference the serving
benchmark's targets are stated against, measured on this machine rather than quoted.

    python scripts/benchmark_hf.py --json results/hf_decode32.json

Workload: the same 32 prompts as `scripts/benchmark_serving.py --scenarios=decode32` (128
random token ids each, same seed), greedy, 128 new tokens each (eos ignored), one padded
batch through `model.generate` with its KV cache, SmolLM2-135M-Instruct at f32 (--hf_dtype)
from the same GGUF file (transformers' own GGUF loader), torch on all cores (--threads).
Output tokens/s = generated tokens / wall time of the generate call (prefill included), after
one short warm-up call (scripts/hf_static.py). `benchmark_serving.py --scenarios=decode32 --compare_hf` runs the same
in the same process as the engine, for a ratio measured under one machine load.

Needs the test extras (torch, transformers); nothing here is used by jax_infer itself.
"""

from __future__ import annotations

import numpy as np
import report
import shared_flags
from absl import app, flags
from hf_static import DTYPES, hf_static_generate

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Prompts in the batch.")
flags.DEFINE_integer("prompt_len", 128, "Tokens per prompt.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt.")
flags.DEFINE_integer("seed", 0, "Workload seed (benchmark_serving.py's --seed).")
flags.DEFINE_integer("threads", None, "torch threads (default: every core).")
flags.DEFINE_enum("hf_dtype", "float32", list(DTYPES), "torch dtype of the HF model.")
flags.DEFINE_integer("repeats", 1, "Timed generate calls (the best is reported too).")
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too


def main(argv):
    del argv
    # Same prompts as benchmark_serving.py's decode32 scenario.
    rng = np.random.default_rng(FLAGS.seed + 7)
    prompts = [rng.integers(100, 20000, size=FLAGS.prompt_len).tolist() for _ in range(FLAGS.batch)]
    result = hf_static_generate(
        prompts,
        FLAGS.new_tokens,
        threads=FLAGS.threads,
        dtype=FLAGS.hf_dtype,
        repeats=FLAGS.repeats,
    )
    del result["token_ids"]
    times = result["wall_s"]
    row = ["hf static decode32", f"{result['output_tokens_per_s']:.1f}"]
    report.print_table(["run", "out tok/s", "wall s"], [[*row, f"{np.median(times):.2f}"]])
    report.write_json(FLAGS.json, result)


if __name__ == "__main__":
    app.run(main)
