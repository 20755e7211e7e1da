"""bf16 weights on the CPU, one projection at a time: the bf16 tiled kernels (matmul_bf16.cc:
widening to f32 on f32 activations, and VDPBF16PS on bf16 activations where built),
XLA's bf16 dot and the f32 path (the f32 tiled kernel where built), over row counts from
batch-1 decode to prefill, each as GFLOP/s and as a share of this machine's ceiling for its
dtype (jax_infer/eval/ceiling.py). This is where BF16_KERNEL_MAX_ROWS in
jax_infer/cpu/matmul.py comes from: the kernel should win below it, XLA's dot above.

    python scripts/bench_bf16_matmul.py --json results/bf16_matmul.json
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import report
from absl import app, flags

from jax_infer.cpu import matmul as kernels
from jax_infer.cpu.build import cpu_features
from jax_infer.cpu.layout import tile_f32

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["1", "8", "32", "128", "512"], "Row counts M.")
flags.DEFINE_list(
    "shapes", ["576x576", "576x192", "576x1536", "1536x576", "576x49152"], "KxN weight shapes."
)
flags.DEFINE_integer("repeats", 10, "Timed calls (the fastest is kept).")
flags.DEFINE_string("json", None, "Write the results here.")


def best_time(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv):
    del argv
    ceiling = report.ceiling()
    rng = np.random.default_rng(0)
    results, rows_out = [], []
    for shape in FLAGS.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w32 = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
        w16 = w32.astype(jnp.bfloat16)
        t32, t16 = tile_f32(w32), tile_f32(w16)
        for m in (int(r) for r in FLAGS.rows):
            x32 = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            x16 = x32.astype(jnp.bfloat16)
            paths = {
                "xla bf16": (jax.jit(lambda x, w: x @ w), (x16, w16), "bfloat16"),
                "f32 (tiled)": (jax.jit(kernels.tiled_matmul), (x32, t32), "float32"),
            }
            if kernels.available(16):
                kernel = jax.jit(lambda x, t: kernels.bf16_tiles_matmul(x.astype(jnp.float32), t))
                paths["bf16 kernel"] = (kernel, (x16, t16.values), "bfloat16")
            if kernels.bf16_dot_available():
                dot = jax.jit(kernels.bf16_dot_matmul)
                paths["bf16 dot kernel"] = (dot, (x16, t16.values), "bfloat16")
                # The model's path: the same kernel writing a bf16 product.
                dot16 = jax.jit(lambda x, t: kernels.bf16_dot_matmul(x, t, jnp.bfloat16))
                paths["bf16 dot, bf16 out"] = (dot16, (x16, t16.values), "bfloat16")
            flops = 2.0 * m * k * n
            entry = {"k": k, "n": n, "rows": m}
            for name, (fn, args, dtype) in paths.items():
                gflops = flops / best_time(fn, *args, repeats=FLAGS.repeats) / 1e9
                entry[name] = gflops
                rows_out.append(
                    (
                        f"{k}x{n}",
                        m,
                        name,
                        f"{gflops:.1f}",
                        report.share(gflops, ceiling.matmul_gflops[dtype]),
                    )
                )
            results.append(entry)
    headers = ["K x N", "rows", "path", "GFLOP/s", "share of dtype ceiling"]
    report.print_table(headers, rows_out)
    print(f"cpu features {cpu_features().names()}; load average {os.getloadavg()}")
    report.write_json(FLAGS.json, {"results": results})


if __name__ == "__main__":
    app.run(main)
