"""Cold start: process start to first token, with an empty compilation cache and again.

    python scripts/benchmark_cold_start.py --json results/cold_start.json
    python scripts/benchmark_cold_start.py --precompile       # LLM(..., precompile=True)

Each run is a fresh Python process that imports jax_infer, builds `LLM(model=--model)` and
generates one greedy token for --prompt (`max_tokens=1`): what a user or a server pays before
the first token. The first run gets empty caches (a new temporary directory, or --cache_dir
emptied: jax's compilation cache, and in it the program store, programs/, and the weights
cache, weights/), the next --warm_runs the same directory (the second start of the same
program), and with --compare_off one more runs with the caches off. Reported per run: seconds
from spawning the process to the interpreter running the child (`python`), imports
(`import`), LLM() (`load`: weights read and converted or mapped from the weights cache,
layout, page pool, and the precompile when on), the first generate (`first token`), and the
total; whether the weights came from the weights cache (`weights`); from
`compile_cache.stats()` the programs asked for, how many came from a cache (jax's, or whole
from the program store: `stored`), how many were compiled, and the seconds in backend
compiles (cache loads included) and in tracing/lowering. `ratio` is each run's total over the
first's. The caches are written on background threads (the first start's first token does
not wait for them; its process does, before it exits). The load average is printed before
and after: other processes on the machine skew every number.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import report
import shared_flags
from absl import app, flags

from jax_infer import compile_cache

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model name, .gguf file or HF directory.")
flags.DEFINE_string("prompt", "The capital of France is", "The prompt of the first request.")
flags.DEFINE_bool("precompile", False, "LLM(precompile=True): every step bucket at start.")
flags.DEFINE_integer("max_model_len", None, "LLM(max_model_len=...) (default: the LLM's).")
flags.DEFINE_integer("max_num_seqs", None, "LLM(max_num_seqs=...) (default: the LLM's).")
flags.DEFINE_integer(
    "max_num_batched_tokens", None, "LLM(max_num_batched_tokens=...) (default: the LLM's)."
)
flags.DEFINE_string(
    "cache_dir", None, "Compilation cache directory, emptied first (default: a temporary one)."
)
flags.DEFINE_integer("warm_runs", 1, "Runs after the first, over the same cache.")
flags.DEFINE_bool("compare_off", False, "One more run with the compilation cache off.")
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)

# The child: times taken with time.time() so the parent's spawn time compares with them.
CHILD = r"""
import json, sys, time
t_python = time.time()
args = json.loads(sys.argv[1])
import jax
from jax_infer import LLM, SamplingParams, compile_cache
t_import = time.time()
kw = {k: args[k] for k in ("max_model_len", "max_num_seqs", "max_num_batched_tokens")
      if args[k] is not None}
llm = LLM(model=args["model"], progress=False, precompile=args["precompile"],
          compilation_cache_dir=args["cache_dir"], **kw)
t_load = time.time()
out = llm.generate(args["prompt"], SamplingParams(max_tokens=1, temperature=0.0))
t_first = time.time()
print("RESULT " + json.dumps({
    "python": t_python, "import": t_import, "load": t_load, "first_token": t_first,
    "token_ids": list(out[0].token_ids), "compile": compile_cache.stats(),
    "backend": jax.default_backend(), "weights_cache_hit": llm.weights_cache_hit,
}))
"""


def run_child(label: str, cache_dir: str | None) -> dict:
    args = {
        "model": FLAGS.model,
        "prompt": FLAGS.prompt,
        "precompile": FLAGS.precompile,
        "max_model_len": FLAGS.max_model_len,
        "max_num_seqs": FLAGS.max_num_seqs,
        "max_num_batched_tokens": FLAGS.max_num_batched_tokens,
        "cache_dir": cache_dir if cache_dir is not None else "off",
    }
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"the {label} run failed (exit status {proc.returncode})")
    r = json.loads(lines[-1][len("RESULT ") :])
    return {
        "run": label,
        "python_s": r["python"] - t0,
        "import_s": r["import"] - r["python"],
        "load_s": r["load"] - r["import"],
        "first_token_s": r["first_token"] - r["load"],
        "total_s": r["first_token"] - t0,
        "token_ids": r["token_ids"],
        "weights_cache_hit": r["weights_cache_hit"],
        "compile": r["compile"],
        "backend": r["backend"],
    }


def main(argv):
    del argv
    load_before = os.getloadavg()
    cache_dir = FLAGS.cache_dir
    temporary = cache_dir is None
    if temporary:
        cache_dir = tempfile.mkdtemp(prefix="jax_infer_cold_start_")
    else:
        shutil.rmtree(cache_dir, ignore_errors=True)
    try:
        runs = [run_child("first (empty cache)", cache_dir)]
        for i in range(FLAGS.warm_runs):
            runs.append(run_child(f"start {i + 2} (same cache)", cache_dir))
        if FLAGS.compare_off:
            runs.append(run_child("cache off", None))
        cache_bytes = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs
        )
    finally:
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)
    first = runs[0]["total_s"]
    rows = []
    for r in runs:
        c = r["compile"]
        r["ratio"] = r["total_s"] / first
        rows.append(
            [
                r["run"],
                f"{r['python_s']:.2f}",
                f"{r['import_s']:.2f}",
                f"{r['load_s']:.2f}",
                f"{r['first_token_s']:.2f}",
                f"{r['total_s']:.2f}",
                f"{r['ratio']:.2f}",
                "hit" if r["weights_cache_hit"] else "miss",
                c["programs"],
                c["cache_hits"],
                c.get("stored_programs", 0),
                c["compiled"],
                f"{c['compile_seconds']:.2f}",
                f"{c['trace_seconds']:.2f}",
            ]
        )
    print(
        f"{FLAGS.model} on {runs[0]['backend']}, precompile={FLAGS.precompile}, load average "
        f"{' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after; caches "
        f"{cache_bytes / 2**20:.1f} MiB (default dir {compile_cache.default_cache_dir()})"
    )
    report.print_table(
        [
            "run",
            "python s",
            "import s",
            "load s",
            "1st token s",
            "total s",
            "ratio",
            "weights",
            "programs",
            "cache hits",
            "stored",
            "compiled",
            "compile s",
            "trace s",
        ],
        rows,
    )
    same = all(r["token_ids"] == runs[0]["token_ids"] for r in runs)
    print(f"first token the same in every run: {same}")
    report.write_json(
        FLAGS.json,
        {
            "flags": {
                k: getattr(FLAGS, k)
                for k in (
                    "model",
                    "prompt",
                    "precompile",
                    "max_model_len",
                    "max_num_seqs",
                    "max_num_batched_tokens",
                    "warm_runs",
                )
            },
            "load_average_before": load_before,
            "load_average": os.getloadavg(),
            "cache_bytes": cache_bytes,
            "same_first_token": same,
            "results": runs,
        },
    )
    return 0 if same else 1


if __name__ == "__main__":
    app.run(main)
