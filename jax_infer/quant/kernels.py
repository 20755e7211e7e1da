"""Builds the CPU kernels in `cpu_kernels.cc` on first use and registers them with XLA's FFI.

Why a native kernel: on the CPU, every XLA formulation of "int8/int4 weights times f32
activations" that we measured (scripts/bench_quant_matmul.py) either converts the whole weight
to f32 first (and, in a whole forward, holds every converted layer at once) or runs
compute-bound at 5-20 G weights/s, so quantized decode was no faster than f32, often slower.
The kernels multiply the 8- or 4-bit weights as they stream them: int8 dot products (AVX-512
VNNI) against activations quantized on the fly to two int8 parts, or, without VNNI, f32
FMAs on weights widened in registers (int8 only).

The same library holds an f32 matmul for matrices stored in the same 64-column tiles
(`f32_tiles_matmul`, TiledF32Array): on this CPU it runs the decode and verify shapes (1-64
rows) 1.5-2x faster than XLA's dot, and larger ones level with or faster than it.

It also holds the paged attention kernels of attention backend "cpu": decode rows
(`paged_decode_attention`) and causal prefill rows (`paged_prefill_attention`). They read K/V
pages in place through the block table, where the XLA formulation first gathers every row's
pages into a copy and scores every query against every gathered key.

The shared library is compiled once per (source, compiler, CPU, jax) into a cache directory,
with `-march=native` since it only ever runs where it was built. Anything that goes wrong
(no compiler, no AVX2, a sandbox without a writable cache) leaves `available()` False and the
quantized matmuls fall back to their pure-XLA formulation, with one warning.

Environment:
    JAX_INFER_QUANT_KERNELS=0   never build or use the kernels (XLA formulations only)
    JAX_INFER_CACHE=dir         where to keep the built library (default ~/.cache/jax_infer)
    CXX=compiler                C++ compiler to use (default c++)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np

from jax_infer.quant.arrays import TILE

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
INT8_TARGET = "jax_infer_int8_matvec"
INT4_TARGET = "jax_infer_int4_matvec"
ATTENTION_TARGET = "jax_infer_paged_decode_attention"
PREFILL_TARGET = "jax_infer_paged_prefill_attention"
F32_TARGET = "jax_infer_f32_tiles_matmul"


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cache_dir: Path) -> Path:
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), " ".join(cxx), version, " ".join(FLAGS), _cpu_fingerprint()]
            + [jax.__version__]
        ).encode()
    ).hexdigest()[:16]
    lib = cache_dir / f"jax_infer_quant_{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    cmd = [*cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def features() -> int:
    """Which CPU kernels are built and registered (done once per process): bit 0 int8,
    bit 1 int4 (which needs AVX-512 VNNI), bit 2 the f32 tiled matmul (AVX-512). 0 when none
    are."""
    if os.environ.get("JAX_INFER_QUANT_KERNELS", "1") == "0":
        return 0
    cache_dir = Path(os.environ.get("JAX_INFER_CACHE", Path.home() / ".cache" / "jax_infer"))
    try:
        lib = ctypes.CDLL(str(_build(cache_dir)))
        jax.ffi.register_ffi_target(
            INT8_TARGET, jax.ffi.pycapsule(lib.JaxInferInt8Matvec), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            INT4_TARGET, jax.ffi.pycapsule(lib.JaxInferInt4Matvec), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            ATTENTION_TARGET, jax.ffi.pycapsule(lib.JaxInferPagedDecodeAttention), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            PREFILL_TARGET, jax.ffi.pycapsule(lib.JaxInferPagedPrefillAttention), platform="cpu"
        )
        bits = int(lib.JaxInferKernelFeatures())
        if bits & 4:
            jax.ffi.register_ffi_target(
                F32_TARGET, jax.ffi.pycapsule(lib.JaxInferF32TilesMatmul), platform="cpu"
            )
        return bits
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        warnings.warn(
            f"jax_infer quantized CPU kernels unavailable, using the XLA formulation: {e}",
            stacklevel=2,
        )
        return 0


def available(bits: int = 8) -> bool:
    """Whether the kernel for `bits`-bit weights (32: f32 in column tiles) can run here."""
    return bool(features() & {8: 1, 4: 2, 32: 4}.get(bits, 0))


def supports(k: int, n: int, group: int, bits: int) -> bool:
    """Whether a [K, N] matrix with this group size fits the kernels: stored in 64-column
    tiles, groups a multiple of the rows a kernel step consumes (4 for int8, 8 for int4; f32,
    bits=32, has no groups)."""
    if bits == 32:
        return n % TILE == 0
    return n % TILE == 0 and k % group == 0 and group % (4 if bits == 8 else 8) == 0


def _require(bits: int) -> None:
    if not available(bits):
        name = "f32" if bits == 32 else f"int{bits}"
        raise RuntimeError(
            f"the {name} CPU kernel is not available here (features={features()}); "
            "call jax_infer.quant.quantized_matmul, which falls back to XLA"
        )


def int8_matvec(x, values, scales):
    """x f32[M, K] @ the Int8Array format (values s8[N/64, K, 64]) -> f32[M, N]."""
    _require(8)
    out = jax.ShapeDtypeStruct((x.shape[0], values.shape[0] * TILE), jax.numpy.float32)
    return jax.ffi.ffi_call(INT8_TARGET, out, vmap_method="broadcast_all")(x, values, scales)


def int4_matvec(x, packed, block_scale, block_min, scale_step, min_step):
    """x f32[M, K] @ the Int4Array format (packed u8[N/64, K/8, 256]) -> f32[M, N]."""
    _require(4)
    out = jax.ShapeDtypeStruct((x.shape[0], packed.shape[0] * TILE), jax.numpy.float32)
    return jax.ffi.ffi_call(INT4_TARGET, out, vmap_method="broadcast_all")(
        x, packed, block_scale, block_min, scale_step, min_step
    )


def f32_tiles_matmul(x, tiles):
    """x f32[M, K] @ an f32 matrix stored in column tiles (tiles f32[N/64, K, 64], see
    quant/arrays.py TiledF32Array) -> f32[M, N]."""
    _require(32)
    out = jax.ShapeDtypeStruct((x.shape[0], tiles.shape[0] * TILE), jax.numpy.float32)
    return jax.ffi.ffi_call(F32_TARGET, out, vmap_method="broadcast_all")(x, tiles)


def attention_supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `paged_decode_attention` takes these head shapes (and is built here)."""
    group = num_heads // num_kv_heads if num_kv_heads else 0
    ok = num_heads % num_kv_heads == 0 and 1 <= group <= 16 and head_dim % 16 == 0
    return ok and head_dim <= 256 and available(8)


def paged_decode_attention(q, k_pages, v_pages, tables, kv_lens, positions, window: int = 0):
    """One query per row against its pages: q f32[D, N, H], float pools f32[P, L, K, H],
    tables i32[D, pages], kv_lens i32[D], positions i32[D] -> f32[D, N, H]. window > 0 is a
    sliding window (keys at positions > position - window)."""
    return _attention_call(
        ATTENTION_TARGET, q, k_pages, v_pages, tables, kv_lens, positions, window=window
    )


def paged_prefill_attention(q, k_pages, v_pages, tables, positions, window: int = 0):
    """Causal prefill rows: q f32[P * Q, N, H] holds row r's Q queries at r * Q.., read through
    tables i32[P, pages]; positions i32[P * Q] (-1 for padding, whose output is zero). Query
    at position p sees keys 0..p of its row (window > 0: those > p - window). Float pools
    f32[P_, L, K, H] -> f32[P * Q, N, H]; each query's result equals `paged_decode_attention`
    with kv_len = p + 1."""
    _require(8)
    if q.shape[0] % tables.shape[0]:
        raise ValueError(
            f"paged_prefill_attention: q has {q.shape[0]} queries, not a multiple of the "
            f"{tables.shape[0]} table rows"
        )
    return _attention_call(PREFILL_TARGET, q, k_pages, v_pages, tables, positions, window=window)


def _attention_call(target, q, k_pages, v_pages, *index_arrays, window):
    """An attention kernel's FFI call: f32 q and pools, int32 index arrays, out like q."""
    _require(8)
    ints = [a.astype(jax.numpy.int32) for a in index_arrays]
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(q.shape, jax.numpy.float32), vmap_method="sequential"
    )(q.astype(jax.numpy.float32), k_pages, v_pages, *ints, window=np.int64(window))
