"""Python bindings of the matmul kernels: int8/int4 weight products (matmul_quant.cc) and the
f32 matmul on column tiles (matmul_f32.cc), plus `tiled_matmul`, the product of a
TiledF32Array that the model's `linear` seam calls.

Why native kernels: on the CPU, every XLA formulation of "int8/int4 weights times f32
activations" that we measured (scripts/bench_quant_matmul.py) either converts the whole weight
to f32 first (and, in a whole forward, holds every converted layer at once) or runs
compute-bound at 5-20 G weights/s, so quantized decode was no faster than f32, often slower.
The kernels multiply the 8- or 4-bit weights as they stream them: int8 dot products (AVX-512
VNNI) against activations quantized on the fly to two int8 parts, or, without VNNI, f32
FMAs on weights widened in registers (int8 only). The f32 kernel runs the decode and verify
shapes (1-64 rows) 1.5-2x faster than XLA's dot, and larger ones level with or faster.

The raw kernels raise where they are not built; callers check `available(bits)` first (or go
through `jax_infer.quant.quantized_matmul` / `tiled_matmul`, which fall back to XLA).
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp

from jax_infer.cpu import build
from jax_infer.cpu.build import features
from jax_infer.cpu.layout import TILE, TiledF32Array, untile

_FAMILY = {
    8: build.INT8_MATMUL,
    4: build.INT4_MATMUL,
    32: build.F32_TILES_MATMUL,
    16: build.BF16_TILES_MATMUL,
}

# Which bf16 products go to the C++ kernel, by rows. The kernel widens bf16 weights to f32 in
# registers and multiplies with f32 FMAs: at few rows it is bound by reading the weights (half
# of f32's bytes), where XLA's bf16 dot is several times slower (7 against 67 GFLOP/s at one
# row of SmolLM2's [576, 1536] on an AMD EPYC with AVX512-BF16). With AMX, XLA's bf16 dot is
# far faster at many rows (1,260 GFLOP/s at 512 rows on a Xeon): there the kernel takes up to
# AMX_KERNEL_MAX_ROWS rows. Without AMX the kernel ran level with or ahead of XLA's bf16 dot
# at every row count we measured (scripts/bench_bf16_matmul.py), so it takes them all.
# BF16_KERNEL_MAX_ROWS (None: by the CPU's features) overrides the choice.
AMX_KERNEL_MAX_ROWS = 64
BF16_KERNEL_MAX_ROWS: int | None = None
# bf16 activations go to the VDPBF16PS kernel where it is built (AVX512-BF16): at 512 rows of
# SmolLM2's projections it runs at ~1,000 GFLOP/s on the 2-core Zen 5, twice the widening
# kernel and level with or above XLA's bf16 dot, and at 1-4 rows it is no slower than the
# widening kernel. False sends them to the widening kernel (tests of that path).
BF16_DOT = True
# The VDPBF16PS kernel writes a bf16 product itself where the activations are bf16 (False:
# f32, converted by XLA after it; for comparisons, scripts/bench_bf16_matmul.py).
BF16_DOT_BF16_OUT = True


def bf16_kernel_max_rows() -> int:
    """Most rows of a bf16 product that the kernel takes here (see above)."""
    if BF16_KERNEL_MAX_ROWS is not None:
        return BF16_KERNEL_MAX_ROWS
    return AMX_KERNEL_MAX_ROWS if build.cpu_features().amx else sys.maxsize


__all__ = [
    "BF16_DOT",
    "BF16_DOT_BF16_OUT",
    "BF16_KERNEL_MAX_ROWS",
    "available",
    "bf16_dot_available",
    "bf16_dot_matmul",
    "bf16_dot_matmul_multi",
    "bf16_kernel_max_rows",
    "bf16_tiles_matmul",
    "bf16_tiles_matmul_multi",
    "f32_tiles_matmul",
    "f32_tiles_matmul_multi",
    "features",
    "int4_matvec",
    "int4_matvec_multi",
    "int8_matvec",
    "int8_matvec_multi",
    "supports",
    "tiled_matmul",
    "tiled_matmul_many",
]


def available(bits: int = 8) -> bool:
    """Whether the kernel for `bits`-bit weights (32: f32, 16: bf16, in column tiles) can run
    here."""
    family = _FAMILY.get(bits)
    return family is not None and build.has(family)


def supports(k: int, n: int, group: int, bits: int) -> bool:
    """Whether a [K, N] matrix with this group size fits the kernels: stored in 64-column
    tiles, groups a multiple of the rows a kernel step consumes (4 for int8, 8 for int4; f32,
    bits=32, has no groups)."""
    if bits in (32, 16):
        return n % TILE == 0
    return n % TILE == 0 and k % group == 0 and group % (4 if bits == 8 else 8) == 0


def _require(bits: int) -> None:
    if not available(bits):
        name = {32: "f32", 16: "bf16"}.get(bits, f"int{bits}")
        raise RuntimeError(
            f"the {name} CPU kernel is not available here (features={features()}); "
            "call jax_infer.quant.quantized_matmul or jax_infer.cpu.matmul.tiled_matmul, "
            "which fall back to XLA"
        )


def int8_matvec(x, values, scales):
    """x f32[M, K] @ the Int8Array format (values s8[N/64, K, 64]) -> f32[M, N]."""
    return int8_matvec_multi(x, [(values, scales)])[0]


def int8_matvec_multi(x, mats):
    """x f32[M, K] @ each of several Int8Array matrices, mats [(values, scales), ...] -> a
    list of f32[M, N_i]: one kernel call, x quantized once, every matrix's column tiles one
    job for the worker pool (a layer's q/k/v or gate/up projections)."""
    _require(8)
    outs = [jax.ShapeDtypeStruct((x.shape[0], v.shape[0] * TILE), jnp.float32) for v, _ in mats]
    args = [a for mat in mats for a in mat]
    return list(jax.ffi.ffi_call(build.INT8_TARGET, outs, vmap_method="broadcast_all")(x, *args))


def int4_matvec(x, packed, block_scale, block_min, scale_step, min_step):
    """x f32[M, K] @ the Int4Array format (packed u8[N/64, K/8, 256]) -> f32[M, N]."""
    return int4_matvec_multi(x, [(packed, block_scale, block_min, scale_step, min_step)])[0]


def int4_matvec_multi(x, mats):
    """`int8_matvec_multi` for Int4Array matrices: mats [(packed, block_scale, block_min,
    scale_step, min_step), ...] -> a list of f32[M, N_i]."""
    _require(4)
    outs = [jax.ShapeDtypeStruct((x.shape[0], m[0].shape[0] * TILE), jnp.float32) for m in mats]
    args = [a for mat in mats for a in mat]
    return list(jax.ffi.ffi_call(build.INT4_TARGET, outs, vmap_method="broadcast_all")(x, *args))


def f32_tiles_matmul(x, tiles):
    """x f32[M, K] @ an f32 matrix stored in column tiles (tiles f32[N/64, K, 64], see
    cpu/layout.py TiledF32Array) -> f32[M, N]."""
    return f32_tiles_matmul_multi(x, [tiles])[0]


def _tiled_outs(x, tiles_list, dtype):
    return [jax.ShapeDtypeStruct((x.shape[0], t.shape[0] * TILE), dtype) for t in tiles_list]


def f32_tiles_matmul_multi(x, tiles_list):
    """x f32[M, K] @ each of several f32 matrices in column tiles -> a list of f32[M, N_i]:
    one kernel call, every matrix's column tiles one job for the worker pool (a layer's
    q/k/v or gate/up projections). Each result equals `f32_tiles_matmul` of its matrix
    bitwise."""
    _require(32)
    outs = _tiled_outs(x, tiles_list, jnp.float32)
    call = jax.ffi.ffi_call(build.F32_TARGET, outs, vmap_method="broadcast_all")
    return list(call(x, *tiles_list))


def bf16_tiles_matmul(x, tiles):
    """x f32[M, K] @ a bf16 matrix stored in column tiles (tiles bf16[N/64, K, 64]) ->
    f32[M, N], f32 accumulation (matmul_bf16.cc)."""
    return bf16_tiles_matmul_multi(x, [tiles])[0]


def bf16_tiles_matmul_multi(x, tiles_list):
    """`f32_tiles_matmul_multi` for bf16 tiles (x f32, f32 results)."""
    _require(16)
    outs = _tiled_outs(x, tiles_list, jnp.float32)
    call = jax.ffi.ffi_call(build.BF16_TARGET, outs, vmap_method="broadcast_all")
    return list(call(x, *tiles_list))


def bf16_dot_available() -> bool:
    """Whether `bf16_dot_matmul` (VDPBF16PS, AVX512-BF16) is built here."""
    return build.has(build.BF16_DOT_MATMUL)


def bf16_dot_matmul(x, tiles, out_dtype=jnp.float32):
    """x bf16[M, K] @ a bf16 matrix in column tiles (tiles bf16[N/64, K, 64]) -> [M, N] by
    bf16 pair dot products with f32 accumulation (matmul_bf16.cc, AVX512-BF16). out_dtype
    float32, or bfloat16: the f32 sums rounded once to nearest even by the kernel, so no
    separate convert pass follows (an f32 denormal rounds to zero there)."""
    return bf16_dot_matmul_multi(x, [tiles], out_dtype)[0]


def bf16_dot_matmul_multi(x, tiles_list, out_dtype=jnp.float32):
    """`bf16_dot_matmul` of several matrices that share x, in one kernel call (as
    `f32_tiles_matmul_multi`) -> a list of [M, N_i]."""
    if not bf16_dot_available():
        raise RuntimeError(
            f"the bf16 dot-product CPU kernel needs AVX512-BF16 (features={features()}); "
            "call jax_infer.cpu.matmul.tiled_matmul, which falls back"
        )
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"bf16_dot_matmul: x must be bfloat16, got {x.dtype}")
    out_dtype = jnp.dtype(out_dtype)
    targets = {jnp.dtype(jnp.float32): build.BF16_DOT_TARGET}
    targets[jnp.dtype(jnp.bfloat16)] = build.BF16_DOT_BF16_TARGET
    if out_dtype not in targets:
        raise ValueError(
            f"bf16_dot_matmul: out_dtype={out_dtype} is not supported: float32 or bfloat16"
        )
    outs = _tiled_outs(x, tiles_list, out_dtype)
    call = jax.ffi.ffi_call(targets[out_dtype], outs, vmap_method="broadcast_all")
    return list(call(x, *tiles_list))


def _xla_tiled_matmul(x, t: TiledF32Array):
    return x @ untile(t)


def _tiled_bf16_matmul(x2, t: TiledF32Array, force_xla: bool, batch_invariant: bool = False):
    """x2 [M, K] (any float dtype) @ bf16 tiles -> [M, N] in x2's dtype: the C++ kernel up to
    `bf16_kernel_max_rows()` rows, XLA's dot in x2's dtype on the untiled matrix above (and
    off the CPU), as `linear` computes an untiled bf16 projection."""
    k, n = t.stored_shape
    rows = x2.shape[0]

    def xla(x):
        return jnp.matmul(x, untile(t).astype(x.dtype))

    max_rows = sys.maxsize if batch_invariant else bf16_kernel_max_rows()
    if 0 < rows <= max_rows and not force_xla and supports(k, n, 1, 16):
        # The pair-dot kernel's invariance is not checked: batch-invariant mode keeps the
        # widening kernel (tests/test_batch_invariant.py covers bf16 that way).
        if not batch_invariant and x2.dtype == jnp.bfloat16 and BF16_DOT and bf16_dot_available():
            # bf16 activations: pair dot products, no widening (and no f32 copy of x),
            # and a bf16 result written by the kernel (no convert pass after it).
            def kernel(x):
                if BF16_DOT_BF16_OUT:
                    return bf16_dot_matmul(x, t.values, out_dtype=jnp.bfloat16)
                return bf16_dot_matmul(x, t.values).astype(x.dtype)

            return jax.lax.platform_dependent(x2, cpu=kernel, default=xla)
        if available(16):

            def kernel(x):
                return bf16_tiles_matmul(x.astype(jnp.float32), t.values).astype(x.dtype)

            return jax.lax.platform_dependent(x2, cpu=kernel, default=xla)
    return xla(x2)


def tiled_matmul(x, t: TiledF32Array, *, force_xla: bool = False, batch_invariant: bool = False):
    """x [..., K] @ the [K, N] matrix of t -> [..., N] in x's dtype. f32 tiles: f32 inside,
    the C++ kernel on the CPU where it is built, XLA's dot on the untiled matrix elsewhere.
    bf16 tiles: the bf16 kernel (f32 accumulation) up to `bf16_kernel_max_rows()` rows,
    XLA's dot in x's dtype above. batch_invariant: the kernel at every row count (its
    result per row does not depend on the other rows; XLA's dot promises no such thing),
    and a RuntimeError where the kernel cannot run."""
    if batch_invariant and force_xla:
        raise ValueError("tiled_matmul: batch_invariant=True needs the kernel (force_xla=False)")
    k, n = t.stored_shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the tiled matrix expects K={k}")
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if t.values.dtype == jnp.bfloat16:
        if batch_invariant:
            _require(16)
        y = _tiled_bf16_matmul(x.reshape(rows, k), t, force_xla, batch_invariant)
        return y.reshape(*lead, n)
    x2 = x.reshape(rows, k).astype(jnp.float32)
    if batch_invariant:
        _require(32)
    if rows > 0 and not force_xla and supports(k, n, 1, 32) and available(32):
        y = jax.lax.platform_dependent(
            x2,
            cpu=functools.partial(f32_tiles_matmul, tiles=t.values),
            default=functools.partial(_xla_tiled_matmul, t=t),
        )
    else:
        y = _xla_tiled_matmul(x2, t)
    return y.reshape(*lead, n).astype(x.dtype)


def tiled_matmul_many(x, ts, *, force_xla: bool = False):
    """(x @ t for t in ts) for tiled matrices that share the input x [..., K] (a layer's
    q/k/v, its gate/up): where `tiled_matmul` would take a kernel for each, the matrices go
    to it in one call (`f32_tiles_matmul_multi`, `bf16_dot_matmul_multi`,
    `bf16_tiles_matmul_multi`), with results equal to `tiled_matmul`'s bitwise; otherwise
    one `tiled_matmul` per matrix. Returns a tuple of [..., N_i] in x's dtype."""
    ts = tuple(ts)
    if not ts:
        return ()
    k = ts[0].stored_shape[0]
    dtypes = {t.values.dtype for t in ts}
    lead = x.shape[:-1]
    rows = math.prod(lead)
    bits = (
        16
        if dtypes == {jnp.dtype(jnp.bfloat16)}
        else 32
        if dtypes == {jnp.dtype(jnp.float32)}
        else None
    )
    fits = (
        not force_xla
        and len(ts) > 1
        and bits is not None
        and x.shape[-1] == k
        and all(t.stored_shape[0] == k and supports(k, t.stored_shape[1], 1, bits) for t in ts)
    )
    if not fits or rows <= 0:
        return tuple(tiled_matmul(x, t, force_xla=force_xla) for t in ts)
    values = [t.values for t in ts]

    def xla(x2):
        return tuple(_xla_tiled_matmul(x2.astype(jnp.float32), t).astype(x2.dtype) for t in ts)

    if bits == 16:
        if rows > bf16_kernel_max_rows():
            return tuple(tiled_matmul(x, t) for t in ts)
        x2 = x.reshape(rows, k)

        def xla16(x):
            return tuple(jnp.matmul(x, untile(t).astype(x.dtype)) for t in ts)

        if x2.dtype == jnp.bfloat16 and BF16_DOT and bf16_dot_available():

            def kernel(x):
                if BF16_DOT_BF16_OUT:
                    return tuple(bf16_dot_matmul_multi(x, values, out_dtype=jnp.bfloat16))
                return tuple(y.astype(x.dtype) for y in bf16_dot_matmul_multi(x, values))

        elif available(16):

            def kernel(x):
                ys = bf16_tiles_matmul_multi(x.astype(jnp.float32), values)
                return tuple(y.astype(x.dtype) for y in ys)

        else:
            return tuple(tiled_matmul(x, t) for t in ts)
        ys = jax.lax.platform_dependent(x2, cpu=kernel, default=xla16)
    else:
        if not available(32):
            return tuple(tiled_matmul(x, t) for t in ts)
        x2 = x.reshape(rows, k).astype(jnp.float32)
        ys = jax.lax.platform_dependent(
            x2, cpu=lambda a: tuple(f32_tiles_matmul_multi(a, values)), default=xla
        )
        ys = tuple(y.astype(x.dtype) for y in ys)
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)
