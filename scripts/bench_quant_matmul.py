"""Formulations of a quantized matmul on the CPU, at SmolLM2-135M shapes.

    python scripts/bench_quant_matmul.py --json results/bench_quant_matmul.json
    python scripts/bench_quant_matmul.py --batch 1 --formulations f32,kernel_int8,kernel_int4

Runs the seven matmuls of a decoder layer (wq [576, 576], wk and wv [576, 192], wo [576, 576],
w_gate and w_up [576, 1536], w_down [1536, 576]) for --layers layers chained as in the model
(each layer's input depends on the previous output, each layer has its own weights), jitted
as one program, at --batch activation rows. With 30 layers the weights (424 MB in f32) are
far larger than the caches, so at batch 1 this is what decode pays per token for the
projections. The LM head is left out: it is one more [576, 49152] matmul of the same kind.

Each formulation is (prepare a float [K, N] weight once, apply it to x [B, K]):
    f32                 x @ w
    bf16                bf16 weights and activations, f32 accumulation
    int8_convert_dot    (x @ int8->f32 values) * per-column scale      (XLA's naive path)
    int8_dot_general    lax.dot_general(x, int8 values, preferred_element_type=f32)
    int8_out_in         the same with the int8 matrix stored [N, K]
    int8_tiled_map      convert 512-column tiles inside a lax.map, dot each tile
    int8_reduce         sum(x[:, :, None] * int8->f32 values, axis=1): a fused reduction
    int8_s8s8_dynamic   activations quantized per row to two int8 rows (hi, lo), XLA's
                        int8 x int8 -> int32 dot (XNNPACK/YNNPACK), scales after
    int4_xla            int4 format, unpacked and dequantized by XLA, then a dot
    kernel_int8         jax_infer.cpu's native kernel (int8 per column)
    kernel_int4         jax_infer.cpu's native kernel (int4, groups of 32)
    quant_int8, quant_int4   jax_infer.quant.quantized_matmul as the model calls it
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import report
import shared_flags
from absl import app, flags

from jax_infer.cpu import build
from jax_infer.cpu import matmul as kernels
from jax_infer.quant import quantize_matrix, quantized_matmul
from jax_infer.quant.matmul import kernel_matmul, xla_matmul

FLAGS = flags.FLAGS
flags.DEFINE_list("batch", ["1", "32"], "Activation rows to measure.")
flags.DEFINE_integer("layers", 30, "Decoder layers chained (each with its own weights).")
flags.DEFINE_integer("repeats", 15, "Timed calls per formulation (median reported).")
flags.DEFINE_list("formulations", None, "Subset to run (default: all).")
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too

D, F, NH, KH = 576, 1536, 576, 192  # model, ffn, query heads x head dim, kv heads x head dim
SHAPES = [(D, NH), (D, KH), (D, KH), (NH, D), (D, F), (D, F), (F, D)]  # [K, N] per matmul


def _int8_per_column(w):
    s = np.maximum(np.abs(w).max(0), 1e-12) / 127
    return np.clip(np.round(w / s), -127, 127).astype(np.int8), s.astype(np.float32)


def prep_int8(w):
    q, s = _int8_per_column(w)
    return jnp.asarray(q), jnp.asarray(s)


def prep_int8_out_in(w):
    q, s = _int8_per_column(w)
    return jnp.asarray(q.T.copy()), jnp.asarray(s)


def apply_convert_dot(x, p):
    q, s = p
    return (x @ q.astype(jnp.float32)) * s


def apply_dot_general(x, p):
    q, s = p
    dims = (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, q, dims, preferred_element_type=jnp.float32) * s


def apply_out_in(x, p):
    q, s = p
    return jnp.einsum("mk,nk->mn", x, q.astype(jnp.float32)) * s


def apply_tiled_map(x, p, tile=512):
    q, s = p
    k, n = q.shape
    tile = tile if n % tile == 0 else n

    def block(i):
        return x @ jax.lax.dynamic_slice_in_dim(q, i * tile, tile, axis=1).astype(jnp.float32)

    y = jax.lax.map(block, jnp.arange(n // tile))  # [N / tile, B, tile]
    return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], n) * s


def apply_reduce(x, p):
    q, s = p
    return jnp.sum(x[:, :, None] * q.astype(jnp.float32), axis=1) * s


def apply_s8s8_dynamic(x, p):
    """x ~= sx * (hi + lo / 254), two int8 rows per activation row; int32 accumulation."""
    q, s = p
    b = x.shape[0]
    sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
    sx = jnp.where(sx == 0, 1.0, sx)
    u = x / sx
    hi = jnp.round(u)
    lo = jnp.round((u - hi) * 254)
    rows = jnp.concatenate([hi, lo]).astype(jnp.int8)  # [2B, K]
    dims = (((1,), (0,)), ((), ()))
    acc = jax.lax.dot_general(rows, q, dims, preferred_element_type=jnp.int32)
    acc = acc.astype(jnp.float32)
    return (acc[:b] + acc[b:] / 254) * sx * s


def prep_bf16(w):
    return jnp.asarray(w, jnp.bfloat16)


def apply_bf16(x, w):
    return jnp.matmul(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


def prep_quant(bits, group):
    def prep(w):
        return quantize_matrix(jnp.asarray(w), bits, group)

    return prep


FORMULATIONS = {
    "f32": (jnp.asarray, jnp.matmul),
    "bf16": (prep_bf16, apply_bf16),
    "int8_convert_dot": (prep_int8, apply_convert_dot),
    "int8_dot_general": (prep_int8, apply_dot_general),
    "int8_out_in": (prep_int8_out_in, apply_out_in),
    "int8_tiled_map": (prep_int8, apply_tiled_map),
    "int8_reduce": (prep_int8, apply_reduce),
    "int8_s8s8_dynamic": (prep_int8, apply_s8s8_dynamic),
    "int4_xla": (prep_quant(4, 32), xla_matmul),
    "kernel_int8": (prep_quant(8, None), kernel_matmul),
    "kernel_int4": (prep_quant(4, 32), kernel_matmul),
    "quant_int8": (prep_quant(8, None), quantized_matmul),
    "quant_int4": (prep_quant(4, 32), quantized_matmul),
}


def layers_program(apply):
    """One jitted program: `layers` chained decoder layers' projections."""

    def run(weights, x):  # x [B, D]
        h = x
        for i in range(0, len(weights), len(SHAPES)):
            wq, wk, wv, wo, wg, wu, wd = weights[i : i + len(SHAPES)]
            q, k, v = apply(h, wq), apply(h, wk), apply(h, wv)
            attn = q + 0.1 * jnp.tile(k + v, (1, NH // KH))  # stands in for attention
            h = h + apply(attn, wo)
            h = h + apply(jax.nn.silu(apply(h, wg)) * apply(h, wu), wd)
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        return h

    return jax.jit(run)


def measure(name: str, batch: int, layers: int, repeats: int, rng) -> dict:
    prep, apply = FORMULATIONS[name]
    weights = [
        prep((rng.standard_normal((k, n)) * 0.05).astype(np.float32))
        for _ in range(layers)
        for k, n in SHAPES
    ]
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights))
    x = jnp.asarray(rng.standard_normal((batch, D)).astype(np.float32))
    run = layers_program(apply)
    t0 = time.perf_counter()
    jax.block_until_ready(run(weights, x))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(weights, x))
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    return {
        "formulation": name,
        "batch": batch,
        "layers": layers,
        "ms_median": ms,
        "ms_min": float(np.min(times)) * 1e3,
        "weight_bytes": nbytes,
        "gb_per_s": nbytes / ms / 1e6,
        "compile_s": compile_s,
    }


def main(argv):
    del argv
    names = FLAGS.formulations or list(FORMULATIONS)
    unknown = sorted(set(names) - set(FORMULATIONS))
    if unknown:
        raise ValueError(f"--formulations has {unknown}: allowed are {sorted(FORMULATIONS)}")
    missing = {"kernel_int8": not kernels.available(8), "kernel_int4": not kernels.available(4)}
    names = [n for n in names if not missing.get(n, False)]
    rng = np.random.default_rng(0)
    results = []
    for batch in (int(b) for b in FLAGS.batch):
        for name in names:
            r = measure(name, batch, FLAGS.layers, FLAGS.repeats, rng)
            results.append(r)
            base = next(
                x
                for x in results
                if x["formulation"] == results[0]["formulation"] and x["batch"] == batch
            )
            print(
                f"{name:18s} B={batch:<3d} {r['ms_median']:8.2f} ms (min {r['ms_min']:7.2f})"
                f"  {r['weight_bytes'] / 1e6:6.1f} MB  {r['gb_per_s']:5.1f} GB/s"
                f"  x{base['ms_median'] / r['ms_median']:.2f} vs {base['formulation']}",
                flush=True,
            )
    out = {
        "results": results,
        "layers": FLAGS.layers,
        "kernel_features": build.features(),
        "cpu_features": build.cpu_features().names(),
    }
    report.write_json(FLAGS.json, out)


if __name__ == "__main__":
    app.run(main)
