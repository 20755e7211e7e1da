"""Long-prompt attention on CPU: blockwise online softmax against the dense T x T path.

    python scripts/benchmark_attention.py --json results/attention.json

One SmolLM2 layer's causal prefill attention (9 query heads, 3 KV heads, head dim 64) at
--lengths tokens. Peak memory is XLA's own accounting of the compiled program (arguments,
outputs and temporaries); the dense path is only run where it fits in --dense_limit_gb, and
otherwise reported from its compiled memory footprint alone.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import report
import shared_flags
from absl import app, flags

from pallas_kernels.flash_attention import attention_reference, blockwise_attention

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["2048", "8192", "16384"], "Prompt lengths.")
flags.DEFINE_integer("block", 512, "Query and KV block of the blockwise path.")
flags.DEFINE_float("dense_limit_gb", 8.0, "Run the dense path only below this footprint.")
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too

N, K, H = 9, 3, 64


def footprint_gb(compiled) -> float:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return total / 1e9


def time_it(fn, *args, repeats: int = 2) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    rows = []
    for t in (int(x) for x in FLAGS.lengths):
        q = jnp.asarray(rng.standard_normal((1, t, N, H), np.float32))
        k = jnp.asarray(rng.standard_normal((1, t, K, H), np.float32))
        v = jnp.asarray(rng.standard_normal((1, t, K, H), np.float32))

        def blockwise(q, k, v):
            return blockwise_attention(
                q, k, v, causal=True, block_q=FLAGS.block, block_kv=FLAGS.block
            )

        def dense(q, k, v):
            return attention_reference(q, k, v, causal=True)

        bw = jax.jit(blockwise).lower(q, k, v).compile()
        dn = jax.jit(dense).lower(q, k, v).compile()
        row = {
            "tokens": t,
            "blockwise_s": time_it(bw, q, k, v),
            "blockwise_peak_gb": footprint_gb(bw),
            "dense_peak_gb": footprint_gb(dn),
            "dense_scores_gb": N * t * t * 4 / 1e9,
        }
        row["dense_s"] = (
            time_it(dn, q, k, v, repeats=1) if row["dense_peak_gb"] < FLAGS.dense_limit_gb else None
        )
        if row["dense_s"] is not None:
            ref = np.asarray(dn(q, k, v))
            row["max_abs_diff"] = float(np.abs(np.asarray(bw(q, k, v)) - ref).max())
        rows.append(row)
    table = [
        [
            r["tokens"],
            f"{r['blockwise_s']:.2f}",
            f"{r['blockwise_peak_gb']:.3f}",
            f"{r['dense_s']:.2f}" if r["dense_s"] is not None else "skipped",
            f"{r['dense_peak_gb']:.2f}",
        ]
        for r in rows
    ]
    report.print_table(["tokens", "blockwise s", "blockwise GB", "dense s", "dense GB"], table)
    report.write_json(FLAGS.json, {"rows": rows, "heads": [N, K, H], "block": FLAGS.block})


if __name__ == "__main__":
    app.run(main)
