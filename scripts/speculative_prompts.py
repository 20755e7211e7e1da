"""Decode speed with and without speculative decoding, at batch 1: the workloads and the
timed comparison behind `scripts/benchmark.py --speculative ...` (a benchmark, so it lives
with the scripts, not in the library).

Two workloads:

* input-grounded: rewrite, summarise or answer about a passage given in the prompt, where the
  output copies from the input (prompt lookup's case). Passages are paragraphs of real text,
  the license texts in /usr/share/common-licenses, taken in file order.
* open-ended: short instructions whose answers come from the model alone (a draft model's
  case).

Every prompt goes through the chat template and decodes greedily to eos or `max_tokens`; the
rate counts tokens after the first (prefill and the first token excluded), summed over the
prompts, over the summed time from each first token to the last. Both engines see the same
prompts; the outputs must match token for token (greedy speculation is lossless), and the
result says whether they did.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np

TASKS = (
    "Rewrite the following passage in plain, simple English, keeping every condition:",
    "Summarize the following passage in a few sentences:",
    "Copy the following passage, fixing any spelling or punctuation errors:",
    "Read the passage and list the obligations it places on the reader:",
)
OPEN_ENDED = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe a day in the life of a city bus driver.",
    "Give some advice to someone who is learning to cook.",
    "What are the advantages and disadvantages of living in a big city?",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue.",
    "Write a poem about autumn leaves.",
)
LICENSE_DIR = "/usr/share/common-licenses"


def passages(n: int, min_words: int = 60, max_words: int = 180) -> list[str]:
    """n paragraphs of min_words..max_words words from the license texts, in file order, at
    most two per file so the set covers several documents."""
    out = []
    for path in sorted(glob.glob(os.path.join(LICENSE_DIR, "*"))):
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = [" ".join(p.split()) for p in f.read().split("\n\n")]
        taken = 0
        for p in paragraphs:
            if min_words <= len(p.split()) <= max_words:
                out.append(p)
                taken += 1
                if taken == 2 or len(out) == n:
                    break
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"found {len(out)} passages in {LICENSE_DIR}, need n={n}")
    return out


def grounded_prompts(n: int) -> list[str]:
    return [f"{TASKS[i % len(TASKS)]}\n\n{p}" for i, p in enumerate(passages(n))]


def decode_run(llm, prompts: list[str], max_tokens: int) -> dict:
    """Greedy, one request at a time; returns tokens, decode tokens/s and the outputs."""
    from jax_infer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        ids = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        first = last = None
        final = None
        for chunk in llm.stream([ids], params):
            now = time.perf_counter()
            if first is None:
                first, first_count = now, len(chunk.token_ids)
            last, final = now, chunk
        outputs.append(final.token_ids)
        tokens += len(final.token_ids) - first_count
        seconds += last - first
    return {
        "decode_tokens": tokens,
        "decode_seconds": seconds,
        "decode_tokens_per_s": tokens / seconds if seconds else 0.0,
        "outputs": outputs,
    }


def compare(base_llm, spec_llm, prompts: list[str], max_tokens: int, repeats: int = 1) -> dict:
    """Warm both engines on the prompts (compiles), then time them prompt by prompt,
    alternating, so that load from other processes falls on both alike; each prompt's decode
    time per engine is the median of `repeats` such rounds (greedy decoding does the same work
    every round, so the median only strips interference). Speculative metrics are those of the
    timed rounds."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid: must be an int >= 1")
    decode_run(base_llm, prompts, max_tokens)
    decode_run(spec_llm, prompts, max_tokens)
    before = spec_llm.engine.stats()["speculative"]
    base = {"decode_tokens": 0, "decode_seconds": 0.0, "outputs": []}
    spec = {"decode_tokens": 0, "decode_seconds": 0.0, "outputs": []}
    for prompt in prompts:
        for llm, acc in ((base_llm, base), (spec_llm, spec)):
            runs = [decode_run(llm, [prompt], max_tokens) for _ in range(repeats)]
            acc["decode_tokens"] += runs[0]["decode_tokens"]
            acc["decode_seconds"] += float(np.median([r["decode_seconds"] for r in runs]))
            acc["outputs"].append([r["outputs"][0] for r in runs])
    after = spec_llm.engine.stats()["speculative"]
    rows = after["num_verify_rows"] - before["num_verify_rows"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    base_rate = base["decode_tokens"] / base["decode_seconds"]
    spec_rate = spec["decode_tokens"] / spec["decode_seconds"]
    return {
        "prompts": len(prompts),
        "baseline_tokens_per_s": base_rate,
        "speculative_tokens_per_s": spec_rate,
        "speedup": spec_rate / base_rate,
        "decode_tokens": base["decode_tokens"],
        # Every round of both engines gave the base engine's first output, prompt by prompt.
        "identical_outputs": all(
            out == b[0] for b, sp in zip(base["outputs"], spec["outputs"]) for out in b + sp
        ),
        "verify_rows": rows,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_tokens_per_verify": (accepted + rows) / rows if rows else 0.0,
        "per_position_acceptance_total": after["per_position_acceptance"],
    }
