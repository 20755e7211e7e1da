"""HF transformers static batching on the decode32 workload: the reference the serving
benchmark's targets are stated against, measured on this machine rather than quoted.

    python scripts/benchmark_hf.py --json results/hf_decode32.json

Workload: the same 32 prompts as `scripts/benchmark_serving.py --scenarios=decode32` (128
random token ids each, same seed), greedy, 128 new tokens each (eos ignored), one padded
batch through `model.generate` with its KV cache, SmolLM2-135M-Instruct at f32 from the same
GGUF file (transformers' own GGUF loader), torch on all cores. Output tokens/s = generated
tokens / wall time of the generate call (prefill included), after one short warm-up call.

Needs the test extras (torch, transformers); nothing here is used by jax_infer itself.
"""

from __future__ import annotations

import os
import time

import numpy as np
import report
import shared_flags
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Prompts in the batch.")
flags.DEFINE_integer("prompt_len", 128, "Tokens per prompt.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt.")
flags.DEFINE_integer("seed", 0, "Workload seed (benchmark_serving.py's --seed).")
flags.DEFINE_integer("repeats", 1, "Timed generate calls (the best is reported too).")
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too


def main(argv):
    del argv
    import torch
    import transformers

    from jax_infer.weights import default_gguf_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    # Same prompts as benchmark_serving.py's decode32 scenario.
    rng = np.random.default_rng(FLAGS.seed + 7)
    prompts = rng.integers(100, 20000, size=(FLAGS.batch, FLAGS.prompt_len))
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    kwargs = dict(
        do_sample=False,
        min_new_tokens=FLAGS.new_tokens,
        max_new_tokens=FLAGS.new_tokens,
        pad_token_id=0,
    )
    with torch.inference_mode():
        model.generate(
            input_ids=ids[:, :16],
            attention_mask=mask[:, :16],
            **kwargs | {"min_new_tokens": 4, "max_new_tokens": 4},
        )
        times = []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            times.append(time.perf_counter() - t0)
    generated = int((out.shape[1] - FLAGS.prompt_len) * FLAGS.batch)
    result = {
        "engine": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "batch": FLAGS.batch,
        "prompt_len": FLAGS.prompt_len,
        "new_tokens": FLAGS.new_tokens,
        "wall_s": times,
        "output_tokens_per_s": generated / float(np.median(times)),
        "output_tokens_per_s_best": generated / min(times),
    }
    row = ["hf static decode32", f"{result['output_tokens_per_s']:.1f}"]
    report.print_table(["run", "out tok/s", "wall s"], [[*row, f"{np.median(times):.2f}"]])
    report.write_json(FLAGS.json, result)


if __name__ == "__main__":
    app.run(main)
