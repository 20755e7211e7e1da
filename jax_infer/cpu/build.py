"""Builds the CPU kernels on first use, registers them with XLA's FFI, and says which exist.

The sources, by concern: `matmul_f32.cc` (f32 matrices in column tiles), `matmul_bf16.cc`
(bf16 matrices in the same tiles, widened to f32 in registers), `matmul_quant.cc`
(int8/int4 weight products), `attention.cc` (paged decode and prefill attention),
`common.h` (vector types, the worker pool, feature macros), and `probe.cc` (the read-bandwidth
probe of jax_infer/eval/speed.py, on the same worker pool). They are compiled into ONE shared
library, not one per concern: the kernels share one worker pool (`Workers` in common.h), which
serializes concurrent calls from XLA's threads onto the cores, and two libraries would each
start a pool whose spinning threads fight over the same two cores. One library is also one
compiler run and one cache entry. What a library cannot give per concern it gives per family
instead: each source exports its own `JaxInfer*Features()` bits, so a family is available
exactly when its kernels are in the build (attention does not depend on the int8 kernel).

The library is compiled once per (sources, compiler, flags, CPU flags, jax version) into a
cache directory, with `-march=native` since it only ever runs where it was built. Anything
that goes wrong (no compiler, no AVX2+FMA, a sandbox without a writable cache) leaves every
family unavailable and the callers on their XLA formulations, with one warning.

Environment:
    JAX_INFER_CPU_KERNELS=0     never build or use the C++ kernels (XLA formulations only)
    JAX_INFER_CACHE=dir         where to keep the built library (default ~/.cache/jax_infer)
    JAX_INFER_CPU_MARCH=arch    the -march of the build (default native: every instruction
                                set this CPU has); e.g. haswell builds the AVX2 + FMA paths
                                only, to run (and test) what an AVX2-only machine runs
    CXX=compiler                C++ compiler to use (default c++)
"""

from __future__ import annotations

import ctypes
import dataclasses
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

HERE = Path(__file__).parent
HEADER = HERE / "common.h"
SOURCES = (
    HERE / "matmul_f32.cc",
    HERE / "matmul_bf16.cc",
    HERE / "matmul_quant.cc",
    HERE / "attention.cc",
    HERE / "probe.cc",
)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
MARCH_ENV = "JAX_INFER_CPU_MARCH"
ENV_SWITCH = "JAX_INFER_CPU_KERNELS"

# Feature bits (common.h): which kernels the built library holds.
INT8_MATMUL = 1
INT4_MATMUL = 2
F32_TILES_MATMUL = 4
PAGED_ATTENTION = 8
BF16_TILES_MATMUL = 16
BF16_DOT_MATMUL = 32  # bf16 activations x bf16 tiles by VDPBF16PS (AVX512-BF16)

# (library symbol, FFI target name, the family bit it needs); the names are the FFI targets
# the bindings (matmul.py, attention.py) call.
INT8_TARGET = "jax_infer_int8_matvec"
INT4_TARGET = "jax_infer_int4_matvec"
F32_TARGET = "jax_infer_f32_tiles_matmul"
DECODE_TARGET = "jax_infer_paged_decode_attention"
PREFILL_TARGET = "jax_infer_paged_prefill_attention"
BF16_TARGET = "jax_infer_bf16_tiles_matmul"
BF16_DOT_TARGET = "jax_infer_bf16_dot_matmul"
BF16_DOT_BF16_TARGET = "jax_infer_bf16_dot_matmul_bf16"  # the same, bf16 output
_TARGETS = (
    ("JaxInferInt8Matvec", INT8_TARGET, INT8_MATMUL),
    ("JaxInferInt4Matvec", INT4_TARGET, INT4_MATMUL),
    ("JaxInferF32TilesMatmul", F32_TARGET, F32_TILES_MATMUL),
    ("JaxInferBf16TilesMatmul", BF16_TARGET, BF16_TILES_MATMUL),
    ("JaxInferBf16DotMatmul", BF16_DOT_TARGET, BF16_DOT_MATMUL),
    ("JaxInferBf16DotMatmulBf16", BF16_DOT_BF16_TARGET, BF16_DOT_MATMUL),
    ("JaxInferPagedDecodeAttention", DECODE_TARGET, PAGED_ATTENTION),
    ("JaxInferPagedPrefillAttention", PREFILL_TARGET, PAGED_ATTENTION),
)
_FEATURE_FUNCTIONS = (
    "JaxInferF32MatmulFeatures",
    "JaxInferBf16MatmulFeatures",
    "JaxInferQuantMatmulFeatures",
    "JaxInferAttentionFeatures",
)


# -- CPU features -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """Instruction sets of this CPU that the kernels (or a future one) care about, read at run
    time from the kernel's view of the CPU (/proc/cpuinfo flags), not from how Python or jax
    was built. `flags` holds every flag, for anything not named here."""

    avx2: bool = False
    fma: bool = False
    avx512f: bool = False
    avx512bw: bool = False
    avx512_vnni: bool = False  # VPDPBUSD on 512-bit registers (the int8/int4 kernels)
    avx512_bf16: bool = False
    amx: bool = False  # AMX tiles with int8 and bf16 (amx_tile, amx_int8, amx_bf16)
    flags: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

    def names(self) -> list[str]:
        """The named instruction sets present, e.g. ["avx2", "avx512f", "fma"] (for reports)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is True]

    @property
    def can_build(self) -> bool:
        """Whether the kernels compile here at all (common.h needs AVX2 and FMA)."""
        return self.avx2 and self.fma


def parse_cpu_flags(cpuinfo: str) -> CpuFeatures:
    """The CpuFeatures of the first `flags` line of /proc/cpuinfo text (or of a bare line of
    space-separated flags). No flags line: nothing is supported."""
    line = ""
    for candidate in cpuinfo.splitlines():
        key, sep, rest = candidate.partition(":")
        if sep and key.strip() == "flags":
            line = rest
            break
        if not sep and candidate.strip():
            line = candidate
            break
    flags = frozenset(line.split())
    return CpuFeatures(
        avx2="avx2" in flags,
        fma="fma" in flags,
        avx512f="avx512f" in flags,
        avx512bw="avx512bw" in flags,
        avx512_vnni="avx512_vnni" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx={"amx_tile", "amx_int8", "amx_bf16"} <= flags,
        flags=flags,
    )


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CpuFeatures (read once per process; none where /proc/cpuinfo is absent,
    e.g. not Linux or not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return CpuFeatures()


# -- build ------------------------------------------------------------------------------


def enabled() -> bool:
    """Whether the kernels may be used at all (`JAX_INFER_CPU_KERNELS=0` turns them off)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def march() -> str:
    """The -march the library is built for: native unless JAX_INFER_CPU_MARCH names another
    (only ever one this CPU can run: the library is loaded here)."""
    return os.environ.get(MARCH_ENV, "native")


def _flags() -> tuple[str, ...]:
    return (*FLAGS, f"-march={march()}")


def _cache_key(cxx: list[str], version: str) -> str:
    parts = [p.read_text() for p in (HEADER, *SOURCES)]
    parts += [" ".join(cxx), version, " ".join(_flags()), " ".join(sorted(cpu_features().flags))]
    parts += [platform.machine(), jax.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build(cache_dir: Path) -> Path:
    """The shared library of all sources, compiled into cache_dir unless already there."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True).stdout
    lib = cache_dir / f"jax_infer_cpu_{_cache_key(cxx, version)}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    cmd = [*cxx, *_flags(), f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def features() -> int:
    """Bits of the kernel families built and registered here (done once per process):
    INT8_MATMUL | INT4_MATMUL | F32_TILES_MATMUL | PAGED_ATTENTION | BF16_TILES_MATMUL |
    BF16_DOT_MATMUL; 0 when none are (switched
    off, no AVX2+FMA, or the build failed)."""
    if not enabled():
        return 0
    cpu = cpu_features()
    if not cpu.can_build:
        warnings.warn(
            "jax_infer CPU kernels need AVX2 and FMA, which this CPU does not report; "
            "using the XLA formulations",
            stacklevel=2,
        )
        return 0
    cache_dir = Path(os.environ.get("JAX_INFER_CACHE", Path.home() / ".cache" / "jax_infer"))
    try:
        lib = ctypes.CDLL(str(build(cache_dir)))
        _LIBRARY.append(lib)
        bits = 0
        for name in _FEATURE_FUNCTIONS:
            bits |= int(getattr(lib, name)())
        for symbol, target, family in _TARGETS:
            if bits & family:
                capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        return bits
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        warnings.warn(
            f"jax_infer CPU kernels unavailable, using the XLA formulations: {e}", stacklevel=2
        )
        return 0


_LIBRARY: list[ctypes.CDLL] = []


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (for its plain C entry points, e.g. the read-bandwidth probe
    `JaxInferReadSum` of probe.cc), or None where the kernels are unavailable."""
    return _LIBRARY[0] if features() and _LIBRARY else None


def has(family: int) -> bool:
    """Whether every kernel of `family` (a bit above) is built and registered here."""
    return features() & family == family
