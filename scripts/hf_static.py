"""HF transformers static batching: the reference decode32's target is stated against.

`hf_static_generate` runs one padded batch through `model.generate` (greedy, its KV cache,
eos ignored) on SmolLM2-135M-Instruct from the same GGUF file as jax_infer (transformers' own
GGUF loader), and reports output tokens/s = generated tokens / wall time of the generate call
(prefill included) after one short warm-up call. Used by scripts/benchmark_hf.py (alone) and
scripts/benchmark_serving.py --compare_hf (the same prompts, in the same run as the engine).

Needs the test extras (torch, transformers); nothing here is used by jax_infer itself.
"""

from __future__ import annotations

import os
import time

import numpy as np

DTYPES = ("float32", "bfloat16")


def hf_static_generate(
    prompts, new_tokens: int, *, threads: int | None = None, dtype: str = "float32", repeats=1
) -> dict:
    """prompts: equal-length lists of token ids. threads: torch intra-op threads (default:
    every core). Returns the timing summary and the generated token ids (`token_ids`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("hf_static_generate: prompts must all have the same length")
    import torch
    import transformers

    from jax_infer.weights import default_gguf_path

    torch.set_num_threads(threads or os.cpu_count() or 1)
    path = default_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=getattr(torch, dtype)
    )
    model.eval()
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    mask = torch.ones_like(ids)
    kwargs = dict(
        do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0
    )
    with torch.inference_mode():
        warm = dict(kwargs, min_new_tokens=4, max_new_tokens=4)
        model.generate(input_ids=ids[:, :16], attention_mask=mask[:, :16], **warm)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            times.append(time.perf_counter() - t0)
    prompt_len = ids.shape[1]
    generated = int((out.shape[1] - prompt_len) * len(prompts))
    return {
        "engine": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "batch": len(prompts),
        "prompt_len": int(prompt_len),
        "new_tokens": new_tokens,
        "wall_s": times,
        "output_tokens_per_s": generated / float(np.median(times)),
        "output_tokens_per_s_best": generated / min(times),
        "token_ids": out[:, prompt_len:].tolist(),
    }
