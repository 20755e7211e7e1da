"""Batch-1 speed beside llama.cpp, on the same GGUF file, in the same run.

    pip install llama-cpp-python==0.3.36     # not a jax_infer dependency; only this script
    python scripts/benchmark_llamacpp.py --json results/llamacpp.json
    python scripts/benchmark_llamacpp.py --models smollm2-135m --requantize F32,Q8_0,Q4_0

For each GGUF file (--models: names or paths; by default SmolLM2-135M's shipped Q4_1 and
Gemma-3-270M's Q4_K_M) and each requantized copy of it (--requantize, made once with
`llama_cpp.llama_model_quantize(allow_requantize)` and kept under --cache_dir), both engines
run the same greedy request — a --prompt_len-token prompt (our tokenizer's ids of the GPL-3
text, fed to both) then --decode_tokens tokens — alternating llama.cpp and jax_infer for
--rounds rounds, so that a change in a shared machine's load hits both alike. Reported:
prefill tokens/s (prompt tokens / time to the first token), decode tokens/s after it (medians),
the median of per-round ratios, and how many greedy tokens agree.

Matching precision: our `LLM` dequantizes the file to float32 on load, then quantizes the
weights to the precision nearest the file's (F32/F16: none; Q8_0: int8+embed; Q4_0, Q4_1,
Q4_K: int4+embed, the embedding and tied head at int4-g16; llama.cpp keeps them as stored:
Q8_0, Q4_0/Q4_1 or Q6_K).
llama.cpp runs with --n_threads threads and, for quantized files, without its extra
(repacked) weight buffers (`use_extra_bufts=False`: its AMX repack path crashed on this
machine). The JSON records the CPU flags (`lscpu`) and the load average before and after.
"""

from __future__ import annotations

import os
import time

import numpy as np
import report
import shared_flags
from absl import app, flags
from llamacpp_runner import (
    REQUANTIZE,
    LlamaCpp,
    cpu_flags,
    import_llama_cpp,
    ours_for,
    requantized,
    uptime,
)

from jax_infer import LLM, weights
from jax_infer.eval.speed import run_once

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["smollm2-135m", "gemma3-270m"], "GGUF files or model names.")
flags.DEFINE_list(
    "requantize", [], f"Also compare copies requantized to these: {list(REQUANTIZE)}."
)
flags.DEFINE_bool("originals", True, "Compare the files as given (besides --requantize).")
flags.DEFINE_string("cache_dir", "~/.cache/jax_infer/gguf", "Where requantized files are kept.")
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens (prefill).")
flags.DEFINE_integer("decode_tokens", 64, "Generated tokens (decode).")
flags.DEFINE_integer("rounds", 3, "Alternating rounds (after one warm-up run of each).")
flags.DEFINE_integer("n_threads", 2, "llama.cpp threads (prefill and decode).")
flags.DEFINE_string("text", "/usr/share/common-licenses/GPL-3", "Prompt text.")
shared_flags.define_json_flag()


def ours_greedy(llm: LLM, prompt_ids: list[int], n: int) -> list[int]:
    from jax_infer import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return list(llm.generate([prompt_ids], params)[0].token_ids)


def compare(path: str, prompt_text: str) -> dict:
    """Alternating rounds of llama.cpp and jax_infer on one file."""
    type_name, quantization = ours_for(path)
    ours = LLM(
        model=path,
        dtype="float32",
        quantization=quantization,
        max_num_seqs=1,
        max_model_len=FLAGS.prompt_len + FLAGS.decode_tokens + 16,
        max_num_batched_tokens=FLAGS.prompt_len,
        kv_cache_gb=0.1,
        enable_prefix_caching=False,
        progress=False,
    )
    ids = ours.tokenizer.encode(prompt_text)
    if len(ids) < FLAGS.prompt_len:
        raise ValueError(
            f"--text gives {len(ids)} tokens: fewer than --prompt_len={FLAGS.prompt_len}"
        )
    prompt = ids[: FLAGS.prompt_len]
    theirs = LlamaCpp(path, FLAGS.prompt_len + FLAGS.decode_tokens + 16, FLAGS.n_threads)
    theirs.run(prompt, FLAGS.decode_tokens)  # warm-up
    run_once(ours, prompt, FLAGS.decode_tokens)  # compile
    runs = {"llama.cpp": [], "jax_infer": []}
    for _ in range(FLAGS.rounds):
        runs["llama.cpp"].append(theirs.run(prompt, FLAGS.decode_tokens)[:2])
        runs["jax_infer"].append(run_once(ours, prompt, FLAGS.decode_tokens))
    their_tokens = theirs.run(prompt, FLAGS.decode_tokens)[2]
    our_tokens = ours_greedy(ours, prompt, FLAGS.decode_tokens)
    agree = next(
        (i for i, (a, b) in enumerate(zip(their_tokens, our_tokens)) if a != b),
        len(our_tokens),
    )
    row = {"file": path, "file_type": type_name, "ours_quantization": quantization or "none"}
    for name, rs in runs.items():
        row[name] = {
            "prefill_tokens_per_s": FLAGS.prompt_len / float(np.median([r[0] for r in rs])),
            "decode_tokens_per_s": float(np.median([r[1] for r in rs])),
            "runs": [{"ttft_s": r[0], "decode_tokens_per_s": r[1]} for r in rs],
        }
    ours_runs, their_runs = runs["jax_infer"], runs["llama.cpp"]
    row["decode_ours_over_llamacpp"] = float(
        np.median([o[1] / t[1] for o, t in zip(ours_runs, their_runs)])
    )
    row["prefill_ours_over_llamacpp"] = float(
        np.median([t[0] / o[0] for o, t in zip(ours_runs, their_runs)])
    )
    row["greedy_tokens_agreeing"] = agree
    del ours, theirs
    return row


def files() -> list[str]:
    out = []
    for model in FLAGS.models:
        fmt, path = weights.resolve(model)
        if fmt != "gguf":
            raise app.UsageError(f"--models: {model!r} is not a GGUF file (format {fmt!r})")
        if FLAGS.originals:
            out.append(path)
        out.extend(requantized(path, t, FLAGS.cache_dir) for t in FLAGS.requantize)
    return out


def print_rows(rows: list[dict]) -> None:
    headers = ["file", "type", "ours", "prefill cpp", "prefill ours", "x", "decode cpp"]
    headers += ["decode ours", "x", "agree"]
    report.print_table(
        headers,
        [
            [
                os.path.basename(r["file"]),
                r["file_type"],
                r["ours_quantization"],
                f"{r['llama.cpp']['prefill_tokens_per_s']:.1f}",
                f"{r['jax_infer']['prefill_tokens_per_s']:.1f}",
                f"{r['prefill_ours_over_llamacpp']:.2f}x",
                f"{r['llama.cpp']['decode_tokens_per_s']:.1f}",
                f"{r['jax_infer']['decode_tokens_per_s']:.1f}",
                f"{r['decode_ours_over_llamacpp']:.2f}x",
                f"{r['greedy_tokens_agreeing']}/{FLAGS.decode_tokens}",
            ]
            for r in rows
        ],
    )


def main(argv):
    del argv
    llama_cpp = import_llama_cpp()
    bad = [t for t in FLAGS.requantize if t not in REQUANTIZE]
    if bad:
        raise app.UsageError(f"--requantize: {bad} unknown; allowed are {list(REQUANTIZE)}")
    with open(FLAGS.text, encoding="utf-8") as f:
        text = f.read()
    result = {
        "llama_cpp_version": llama_cpp.__version__,
        "n_threads": FLAGS.n_threads,
        "prompt_len": FLAGS.prompt_len,
        "decode_tokens": FLAGS.decode_tokens,
        "rounds": FLAGS.rounds,
        "lscpu": cpu_flags(),
        "uptime_before": uptime(),
        "rows": [],
    }
    print(result["uptime_before"], flush=True)
    for path in files():
        t0 = time.perf_counter()
        result["rows"].append(compare(path, text))
        print(f"{os.path.basename(path)}: {time.perf_counter() - t0:.0f} s", flush=True)
        print_rows(result["rows"][-1:])
        report.write_json(FLAGS.json, result)  # after every file: a run cut short keeps it
    result["uptime_after"] = uptime()
    print(result["uptime_after"])
    print_rows(result["rows"])
    report.write_json(FLAGS.json, result)


if __name__ == "__main__":
    app.run(main)
