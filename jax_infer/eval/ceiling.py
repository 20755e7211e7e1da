"""The machine's ceilings, measured at run time: read bandwidth and the best matmul rate per
dtype, so a benchmark can print each result as a share of what this machine can do.

    c = probe()                       # ~2-4 s: one reduction, a few dots per dtype
    c.read_share(decode_gb_per_s)     # e.g. 0.71
    c.matmul_share(prefill_gflops, "bfloat16")

Why measure rather than look up: the benchmarks run on shared, virtualised machines whose
feature flags (AVX2, AVX512-BF16, AMX, VNNI) and load change from run to run; a ceiling taken
in the same process, minutes before or after the result, is the fair yardstick.

Read bandwidth is a streaming sum of memory the caches do not hold, on the C++ kernels'
worker pool (what batch-1 decode does to the weights, with the same threads), the best of
many passes at two sizes over windows of a larger buffer, every pass kept for the spread (a jitted XLA sum where
the kernels are not built: it ran on one thread in some runs and two in others). The matmul ceiling is the faster of XLA's dot and this
project's C++ kernel for the dtype (where built), [M, K] @ [K, N] with K = N = 2048, at M in
`rows` (the best over them; each M is kept too, since small-M dots reach a smaller share of
peak): float32, bfloat16 (f32 accumulation, as the model does) and int8 (XLA's dot with
int32 accumulation, counted in GOP/s). Each figure is the fastest of `repeats`
runs: a ceiling, not a typical time.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from jax_infer.config import ModelConfig
from jax_infer.cpu import matmul as cpu_matmul
from jax_infer.cpu.layout import tile_f32
from jax_infer.eval.speed import ReadBandwidth, measure_read_bandwidth

DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class Ceiling:
    """read_gb_per_s: GB/s. matmul_gflops: dtype -> best GFLOP/s (GOP/s for int8) over the
    row counts probed; matmul_by_rows: dtype -> {M: GFLOP/s}."""

    read_gb_per_s: float
    matmul_gflops: dict[str, float]
    matmul_by_rows: dict[str, dict[int, float]]
    shape_kn: tuple[int, int]
    read: ReadBandwidth | None = None  # every pass of the read probe (its spread)

    def read_share(self, gb_per_s: float) -> float:
        return gb_per_s / self.read_gb_per_s

    def matmul_share(self, gflops: float, dtype: str) -> float:
        if dtype not in self.matmul_gflops:
            raise ValueError(f"dtype={dtype!r} was not probed: have {sorted(self.matmul_gflops)}")
        return gflops / self.matmul_gflops[dtype]

    def as_dict(self) -> dict:
        return {
            "read_gb_per_s": self.read_gb_per_s,
            "read_runs_gb_per_s": list(self.read.runs_gb_per_s) if self.read else [],
            "read_method": self.read.method if self.read else None,
            "matmul_gflops": dict(self.matmul_gflops),
            "matmul_gflops_by_rows": {
                d: {str(m): v for m, v in by.items()} for d, by in self.matmul_by_rows.items()
            },
            "matmul_shape_kn": list(self.shape_kn),
        }


def matmul_gflops(dtype: str, m: int, k: int = 2048, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s (GOP/s for int8) of [m, k] @ [k, n] in `dtype`: the faster of XLA's dot and,
    for float32 and bfloat16 where built, the C++ kernels on the column-tiled matrix (the paths
    the model's projections take on the CPU; bfloat16: the widening kernel and, with
    AVX512-BF16, the VDPBF16PS one)."""
    key = jax.random.key(0)
    if dtype == "int8":
        a = jax.random.randint(key, (m, k), -127, 128, jnp.int8)
        b = jax.random.randint(key, (k, n), -127, 128, jnp.int8)
        acc = jnp.int32
    elif dtype in ("float32", "bfloat16"):
        a = jax.random.normal(key, (m, k), dtype)
        b = jax.random.normal(key, (k, n), dtype)
        acc = jnp.float32
    else:
        raise ValueError(f"dtype={dtype!r}: allowed are {list(DTYPES)}")
    candidates = [(jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=acc)), (a, b))]
    bits = {"float32": 32, "bfloat16": 16}.get(dtype)
    if bits and cpu_matmul.available(bits) and cpu_matmul.supports(k, n, 1, bits):
        tiles = tile_f32(b).values
        kernel = cpu_matmul.f32_tiles_matmul if bits == 32 else cpu_matmul.bf16_tiles_matmul
        candidates.append((jax.jit(lambda x, t: kernel(x.astype(jnp.float32), t)), (a, tiles)))
        if bits == 16 and cpu_matmul.bf16_dot_available():
            # bf16 activations (the model's in dtype="bfloat16"): VDPBF16PS where built.
            candidates.append((jax.jit(cpu_matmul.bf16_dot_matmul), (a, tiles)))
    best = float("inf")
    for fn, args in candidates:
        fn(*args).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def probe(
    dtypes=DTYPES,
    rows=(32, 512),
    k: int = 2048,
    n: int = 2048,
    repeats: int = 5,
    read_bytes: int = 256 * 2**20,
    read_repeats: int = 12,
) -> Ceiling:
    """Measure this machine's ceilings now (see the module docstring). read_bytes: the longest
    pass of the read probe (far larger than the caches for a true figure; passes of a quarter
    of it too, over a buffer of 3x it), read_repeats passes each, the best kept."""
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise ValueError(f"dtypes={unknown}: allowed are {list(DTYPES)}")
    by_rows = {d: {m: matmul_gflops(d, m, k, n, repeats) for m in rows} for d in dtypes}
    sizes = (read_bytes // 4, read_bytes) if read_bytes >= 2**22 else (read_bytes,)
    read = measure_read_bandwidth(sizes, repeats=read_repeats, buffer_bytes=3 * read_bytes)
    return Ceiling(
        read_gb_per_s=read.best_gb_per_s,
        read=read,
        matmul_gflops={d: max(by.values()) for d, by in by_rows.items()},
        matmul_by_rows=by_rows,
        shape_kn=(k, n),
    )


def forward_flops(
    config: ModelConfig, tokens: int, context: int | None = None, head_tokens: int = 1
) -> float:
    """FLOPs of one forward over `tokens` new tokens (batch 1) attending to `context` tokens
    in all (default: the tokens themselves, causal), the LM head on `head_tokens` of them
    (the engine's step computes logits at each sequence's last token only): projections
    2*D*(N*H + 2*K*H) + 2*N*H*D, MLP 3 * 2*D*F per layer per token, head 2*D*V, attention
    2 * 2*N*H per (query, key) pair (QK^T and PV; causal: half the square)."""
    c = config
    per_token = c.num_layers * (
        2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + 2 * c.num_heads * c.head_dim * c.hidden_size
        + 6 * c.hidden_size * c.intermediate_size
    )
    head = 2 * c.hidden_size * c.vocab_size * head_tokens
    if context is None:
        pairs = tokens * (tokens + 1) / 2
    else:
        pairs = tokens * context
    attention = c.num_layers * 4 * c.num_heads * c.head_dim * pairs
    return float(per_token * tokens + head + attention)


__all__ = ["DTYPES", "Ceiling", "forward_flops", "matmul_gflops", "probe"]
