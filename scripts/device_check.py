"""Pallas attention kernels against their references on a device, with their speed.

    PYTHONPATH=. python scripts/device_check.py --json results/device_check.json
    PYTHONPATH=. python scripts/device_check.py --quick   # CPU: interpret mode, small shapes

On a GPU or TPU each configuration runs the compiled kernel, the pure-jnp blockwise
path (flash) and the dense reference (where its O(T S) scores fit in memory), checks
every output against the reference (the blockwise path where the reference does not
fit; the tests check blockwise against the reference), and times each: median of
``--repeats`` runs after a compiling warm-up. Reported per run: tokens/s, achieved
FLOP/s (4 N H per visible query-key pair: QK^T and PV) and bytes/s (the least traffic:
q, the K/V each sequence needs, and the output, read or written once).

On a CPU the kernels run in interpret mode, both the TPU (Mosaic interpreter) and the
GPU (Triton, generic interpreter) variants, at small sizes; the timings then measure
the interpreter, not the kernel. The whole run stops starting new configurations
after ``--time_budget_s`` so that it ends in about five minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import report
import shared_flags
from absl import app, flags, logging

from pallas_kernels import flash_attention as fa
from pallas_kernels import ragged_paged_attention as rpa

FLAGS = flags.FLAGS
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_bool("quick", False, "Small shapes (implied on a CPU, where kernels interpret).")
flags.DEFINE_integer("repeats", 5, "Timed runs per implementation (the median is reported).")
flags.DEFINE_float("time_budget_s", 240.0, "Start no new configuration after this long.")
flags.DEFINE_list("kernels", ["flash", "ragged"], "Which kernels to check.")

# Max |out - ref| allowed beyond rtol * |ref|, by dtype. Compiled f32 matmuls may run
# as TF32 (GPU) or bf16 passes (TPU default precision), hence the looser compiled f32.
TOLERANCES = {
    ("float32", True): dict(atol=2e-2, rtol=2e-2),
    ("float32", False): dict(atol=1e-4, rtol=1e-4),
    ("bfloat16", True): dict(atol=3e-2, rtol=3e-2),
    ("bfloat16", False): dict(atol=3e-2, rtol=3e-2),
}
# Dense reference scores above this many bytes are not materialized.
REFERENCE_MAX_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    name: str
    B: int
    T: int
    N: int
    K: int
    H: int
    dtype: str
    blocks: dict  # platform -> fa.BlockSizes


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
    name: str
    seqs: tuple  # (q_len, kv_len) per sequence
    N: int
    K: int
    H: int
    L: int
    dtype: str
    blocks: dict  # platform -> rpa.BlockSizes


FLASH_BLOCKS = {
    "tpu": fa.BlockSizes(block_q=128, block_kv=512),
    "gpu": fa.BlockSizes(block_q=64, block_kv=64),
}
RAGGED_BLOCKS = {
    "tpu": rpa.BlockSizes(block_q=16, pages_per_block=8),
    "gpu": rpa.BlockSizes(block_q=16, pages_per_block=4),
}
QUICK_FLASH_BLOCKS = {p: fa.BlockSizes(block_q=16, block_kv=16) for p in ("tpu", "gpu")}
QUICK_RAGGED_BLOCKS = {
    "tpu": rpa.BlockSizes(block_q=8, pages_per_block=2),
    "gpu": rpa.BlockSizes(block_q=16, pages_per_block=2),
}


def _decodes(n: int, rng: np.random.Generator, lo: int, hi: int) -> tuple:
    return tuple((1, int(s)) for s in rng.integers(lo, hi, n))


def flash_configs(quick: bool) -> list[FlashConfig]:
    if quick:
        return [
            FlashConfig("quick-f32", 1, 67, 4, 2, 64, "float32", QUICK_FLASH_BLOCKS),
            FlashConfig("quick-bf16", 1, 48, 8, 1, 128, "bfloat16", QUICK_FLASH_BLOCKS),
        ]
    return [
        FlashConfig("smollm2-135m", 1, 2048, 9, 3, 64, "bfloat16", FLASH_BLOCKS),
        FlashConfig("llama-8b", 1, 4096, 32, 8, 128, "bfloat16", FLASH_BLOCKS),
        FlashConfig("llama-8b-f32", 1, 1024, 32, 8, 128, "float32", FLASH_BLOCKS),
        FlashConfig("llama-8b-long", 1, 16384, 32, 8, 128, "bfloat16", FLASH_BLOCKS),
    ]


def ragged_configs(quick: bool) -> list[RaggedConfig]:
    rng = np.random.default_rng(0)
    if quick:
        seqs = ((1, 20), (1, 7), (9, 30), (1, 33))
        return [RaggedConfig("quick-mixed", seqs, 4, 2, 64, 16, "float32", QUICK_RAGGED_BLOCKS)]
    decode = _decodes(64, rng, 512, 4096)
    mixed = _decodes(32, rng, 512, 4096) + tuple((256, int(s)) for s in (1280, 2048, 3072, 256))
    return [
        RaggedConfig("llama-8b-decode64", decode, 32, 8, 128, 16, "bfloat16", RAGGED_BLOCKS),
        RaggedConfig("llama-8b-mixed", mixed, 32, 8, 128, 16, "bfloat16", RAGGED_BLOCKS),
        RaggedConfig(
            "smollm2-decode16", _decodes(16, rng, 256, 2048), 9, 3, 64, 16, "float32", RAGGED_BLOCKS
        ),
    ]


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def excess_error(out, expected, dtype: str, compiled: bool) -> tuple[float, bool]:
    """max |out - expected| and whether it is within the dtype's tolerance."""
    out = np.asarray(out, np.float32)
    expected = np.asarray(expected, np.float32)
    tol = TOLERANCES[(dtype, compiled)]
    diff = np.abs(out - expected)
    ok = bool(
        np.isfinite(out).all() and (diff <= tol["atol"] + tol["rtol"] * np.abs(expected)).all()
    )
    return float(diff.max()) if diff.size else 0.0, ok


def kernel_variants(platform: str) -> list[tuple[str, bool]]:
    """(backend, interpret) pairs: the device's own kernel, or both interpreted on a CPU."""
    if platform in ("tpu", "gpu"):
        return [(platform, False)]
    return [("tpu", True), ("gpu", True)]


def row(kernel, config, impl, seconds, err, ok, tokens, flops, nbytes) -> dict:
    return dict(
        kernel=kernel,
        config=config,
        impl=impl,
        ms=seconds * 1e3,
        max_abs_err=err,
        ok=ok,
        tokens_per_s=tokens / seconds,
        tflops=flops / seconds / 1e12,
        gbytes_per_s=nbytes / seconds / 1e9,
    )


def check_flash(cfg: FlashConfig, platform: str, repeats: int) -> list[dict]:
    dtype = jnp.dtype(cfg.dtype)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (cfg.B, cfg.T, cfg.N, cfg.H), dtype)
    k = jax.random.normal(kk, (cfg.B, cfg.T, cfg.K, cfg.H), dtype)
    v = jax.random.normal(kv, (cfg.B, cfg.T, cfg.K, cfg.H), dtype)
    pairs = cfg.B * cfg.T * (cfg.T + 1) // 2  # causal prefill
    flops = 4 * cfg.N * cfg.H * pairs
    nbytes = (2 * q.size + k.size + v.size) * dtype.itemsize
    tokens = cfg.B * cfg.T
    impls = {}
    for backend, interpret in kernel_variants(platform):
        impls[f"pallas-{backend}"] = jax.jit(
            functools.partial(
                fa.flash_attention,
                block_sizes=cfg.blocks[backend],
                backend=backend,
                interpret=interpret,
            )
        )
    impls["blockwise"] = jax.jit(fa.blockwise_attention)
    dense_fits = cfg.B * cfg.N * cfg.T * cfg.T * 4 <= REFERENCE_MAX_BYTES
    if dense_fits:
        impls["reference"] = jax.jit(fa.attention_reference)
    expected = impls["reference" if dense_fits else "blockwise"](q, k, v)
    rows = []
    for impl, fn in impls.items():
        err, ok = excess_error(fn(q, k, v), expected, cfg.dtype, platform != "cpu")
        seconds = median_seconds(fn, (q, k, v), repeats)
        rows.append(row("flash", cfg.name, impl, seconds, err, ok, tokens, flops, nbytes))
    return rows


def ragged_inputs(cfg: RaggedConfig, rng: np.random.Generator):
    """Host metadata and device pages for cfg; unused pages are NaN."""
    n = len(cfg.seqs)
    needed = [-(-kv_len // cfg.L) for _, kv_len in cfg.seqs]
    pages_per_seq = max(needed)
    num_pages = sum(needed) + 1
    block_tables = np.zeros((n, pages_per_seq), np.int32)
    order = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    start = 0
    for s, count in enumerate(needed):
        block_tables[s, :count] = order[start : start + count]
        start += count
    cu_q_lens = np.concatenate([[0], np.cumsum([q for q, _ in cfg.seqs])]).astype(np.int32)
    kv_lens = np.array([kv for _, kv in cfg.seqs], np.int32)
    dtype = jnp.dtype(cfg.dtype)
    kk, kv, kq = jax.random.split(jax.random.key(1), 3)
    shape = (num_pages, cfg.L, cfg.K, cfg.H)
    k_pages = jax.random.normal(kk, shape, dtype).at[0].set(jnp.nan)
    v_pages = jax.random.normal(kv, shape, dtype).at[0].set(jnp.nan)
    q = jax.random.normal(kq, (int(cu_q_lens[-1]), cfg.N, cfg.H), dtype)
    return q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, np.array([n], np.int32)


def check_ragged(cfg: RaggedConfig, platform: str, repeats: int) -> list[dict]:
    args = ragged_inputs(cfg, np.random.default_rng(0))
    dtype = jnp.dtype(cfg.dtype)
    q = args[0]
    # Query i of a sequence with q_len n and kv_len s sees s - n + i + 1 keys.
    pairs = sum(q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2 for q_len, kv_len in cfg.seqs)
    flops = 4 * cfg.N * cfg.H * pairs
    kv_bytes = 2 * sum(kv for _, kv in cfg.seqs) * cfg.K * cfg.H * dtype.itemsize
    nbytes = 2 * q.size * dtype.itemsize + kv_bytes
    tokens = q.shape[0]
    device_args = tuple(jnp.asarray(x) for x in args)
    impls = {}
    for backend, interpret in kernel_variants(platform):
        impls[f"pallas-{backend}"] = jax.jit(
            functools.partial(
                rpa.ragged_paged_attention,
                block_sizes=cfg.blocks[backend],
                backend=backend,
                interpret=interpret,
            )
        )
    impls["reference"] = jax.jit(rpa.ragged_paged_attention_reference)
    expected = impls["reference"](*device_args)
    rows = []
    for impl, fn in impls.items():
        err, ok = excess_error(fn(*device_args), expected, cfg.dtype, platform != "cpu")
        seconds = median_seconds(fn, device_args, repeats)
        rows.append(row("ragged", cfg.name, impl, seconds, err, ok, tokens, flops, nbytes))
    return rows


def print_table(rows: list[dict]) -> None:
    headers = ["kernel", "config", "impl", "ms", "max_err", "ok", "tokens/s", "TFLOP/s", "GB/s"]
    table = [
        [
            r["kernel"],
            r["config"],
            r["impl"],
            f"{r['ms']:.3f}",
            f"{r['max_abs_err']:.2e}",
            "yes" if r["ok"] else "NO",
            f"{r['tokens_per_s']:.1f}",
            f"{r['tflops']:.3f}",
            f"{r['gbytes_per_s']:.2f}",
        ]
        for r in rows
    ]
    report.print_table(headers, table)


def main(argv):
    del argv
    platform = jax.default_backend()
    quick = FLAGS.quick or platform not in ("tpu", "gpu")
    if quick and not FLAGS.quick:
        logging.info("No GPU/TPU (%s): interpret mode at --quick sizes.", platform)
    start = time.perf_counter()
    rows, skipped = [], []
    work = []
    if "flash" in FLAGS.kernels:
        work += [(check_flash, cfg) for cfg in flash_configs(quick)]
    if "ragged" in FLAGS.kernels:
        work += [(check_ragged, cfg) for cfg in ragged_configs(quick)]
    for check, cfg in work:
        if time.perf_counter() - start > FLAGS.time_budget_s:
            skipped.append(cfg.name)
            continue
        logging.info("Checking %s", cfg.name)
        rows += check(cfg, platform, FLAGS.repeats)
    print_table(rows)
    if skipped:
        print(f"skipped (time budget {FLAGS.time_budget_s:.0f} s): {', '.join(skipped)}")
    failures = [f"{r['kernel']}/{r['config']}/{r['impl']}" for r in rows if not r["ok"]]
    result = dict(
        platform=platform,
        device_kind=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        quick=quick,
        interpret=platform not in ("tpu", "gpu"),
        seconds=time.perf_counter() - start,
        rows=rows,
        skipped=skipped,
        failures=failures,
    )
    report.write_json(FLAGS.json, result)
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
