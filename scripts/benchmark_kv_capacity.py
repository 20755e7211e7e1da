"""KV capacity at a fixed byte budget, with and without freeing sliding-window pages.

    python scripts/benchmark_kv_capacity.py --json results/kv_capacity.json

For each architecture (Gemma-3-270M: 18 layers, 5 of 6 sliding with window 512, head dim
256, one KV head; the tiny hybrid Qwen2 of the tests: one full layer, one sliding with window
8), the engine's own sizing (`split_page_budget` over `page_group_windows`) turns
--kv_budget_gb into page pools, and the real scheduler runs --num_requests requests of
--request_tokens tokens (prompt + --output_tokens) to the end with a fake device (no
weights, no model: pages are the point). Reported per mode: pages a request holds per group
(the most at any step while it decodes, and its whole length without freeing), its KV bytes,
the pool sizes, and the most requests decoding in one step (what the pool holds at once;
"max running" also counts requests admitted for a first prompt chunk and later preempted).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import report
import shared_flags
from absl import app, flags

from jax_infer.config import GEMMA3_270M, ModelConfig
from jax_infer.model.cache import kv_bytes_per_page_group, page_group_windows
from jax_infer.scheduler import Request, Scheduler
from jax_infer.scheduler.page_groups import split_page_budget

FLAGS = flags.FLAGS
flags.DEFINE_integer("request_tokens", 4096, "Tokens per request: prompt + output.")
flags.DEFINE_integer("output_tokens", 512, "Generated tokens per request.")
flags.DEFINE_integer("num_requests", 96, "Requests submitted at once.")
flags.DEFINE_float("kv_budget_gb", 1.0, "Gemma-3-270M's KV budget (GiB), split over groups.")
flags.DEFINE_float("tiny_budget_mb", 8.0, "The tiny hybrid's KV budget (MiB).")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Token budget per step (prefill chunk).")
flags.DEFINE_integer("max_num_seqs", 128, "Most requests running at once.")
flags.DEFINE_enum("kv_dtype", "bfloat16", ["float32", "bfloat16", "int8"], "KV cache dtype.")
shared_flags.define_json_flag()
flags.adopt_module_key_flags(shared_flags)

# tests/tiny_models.py "qwen2_hybrid_window": layer 0 full, layer 1 a window of 8.
TINY_HYBRID = ModelConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=112,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    attention_bias=True,
    sliding_window=8,
    layer_types=("full_attention", "sliding_attention"),
)
MODELS = {"gemma3-270m": GEMMA3_270M, "tiny-hybrid": TINY_HYBRID}


def budget_bytes(name: str) -> int:
    if name == "tiny-hybrid":
        return int(FLAGS.tiny_budget_mb * 2**20)
    return int(FLAGS.kv_budget_gb * 2**30)


@dataclasses.dataclass
class Capacity:
    groups: tuple
    pool_pages: list
    page_bytes: list
    peak_pages: list  # most pages one request held per group, any step
    decode_pages: list  # most pages one request held per group while decoding
    max_running: int
    max_decoding: int  # most requests decoding in one step: what the pool holds at once
    preemptions: int
    steps: int
    seconds: float


def simulate(config: ModelConfig, free: bool, budget: int) -> Capacity:
    dtype = jnp.dtype(FLAGS.kv_dtype)
    groups = page_group_windows(config, free)
    page_bytes = kv_bytes_per_page_group(config, groups, FLAGS.page_size, dtype)
    pages = split_page_budget(
        budget,
        page_bytes,
        groups,
        FLAGS.page_size,
        FLAGS.request_tokens,
        FLAGS.max_num_batched_tokens,
    )
    sched = Scheduler(
        num_pages=pages,
        page_size=FLAGS.page_size,
        max_num_seqs=FLAGS.max_num_seqs,
        max_num_batched_tokens=FLAGS.max_num_batched_tokens,
        max_model_len=FLAGS.request_tokens,
        enable_prefix_caching=False,
        windows=groups,
    )
    prompt = FLAGS.request_tokens - FLAGS.output_tokens
    for i in range(FLAGS.num_requests):
        # Distinct prompts (no prefix sharing): the capacity of unrelated requests.
        sched.add_request(Request(f"r{i}", [i + 1] * prompt, max_tokens=FLAGS.output_tokens))
    peak = [0] * len(groups)
    decode = [0] * len(groups)
    max_running = max_decoding = preemptions = steps = 0
    t0 = time.perf_counter()
    while sched.has_unfinished():
        out = sched.schedule()
        preemptions += len(out.preempted)
        steps += 1
        max_running = max(max_running, sched.num_running())
        max_decoding = max(max_decoding, out.num_decodes)
        for sr in out.scheduled:
            for g, table in enumerate(sr.block_tables):
                held = sum(p != 0 for p in table)
                peak[g] = max(peak[g], held)
                if len(sr.token_ids) == 1:
                    decode[g] = max(decode[g], held)
        sched.update(out, {sr.request_id: [7] for sr in out.scheduled if sr.sample})
    for alloc in sched.allocators:
        assert alloc.num_used() == 0, "pages leaked"
    return Capacity(
        groups,
        pages,
        page_bytes,
        peak,
        decode,
        max_running,
        max_decoding,
        preemptions,
        steps,
        time.perf_counter() - t0,
    )


def main(argv):
    del argv
    rows, results = [], []
    for name, config in MODELS.items():
        for free in (False, True):
            c = simulate(config, free, budget_bytes(name))
            kv_mb = sum(p * b for p, b in zip(c.decode_pages, c.page_bytes)) / 2**20
            windows = config.layer_windows
            full_layers = sum(w is None for w in windows)
            # Pages per request per layer kind: without freeing one group holds both kinds.
            by_kind = {
                "full": c.decode_pages[0] if c.groups[0] is None else 0,
                "sliding": c.decode_pages[-1],
            }
            results.append(
                {
                    "model": name,
                    "free_window_pages": free,
                    "groups": [w for w in c.groups],
                    "layers_full": full_layers,
                    "layers_sliding": len(windows) - full_layers,
                    "pool_pages": c.pool_pages,
                    "page_bytes": c.page_bytes,
                    "decode_pages_per_request": c.decode_pages,
                    "peak_pages_per_request": c.peak_pages,
                    "kv_mib_per_request": kv_mb,
                    "budget_bytes": budget_bytes(name),
                    "max_running": c.max_running,
                    "max_decoding": c.max_decoding,
                    "preemptions": c.preemptions,
                    "steps": c.steps,
                    "simulate_seconds": c.seconds,
                }
            )
            rows.append(
                [
                    name,
                    "yes" if free else "no",
                    "/".join(str(w) for w in c.groups),
                    "/".join(str(p) for p in c.pool_pages),
                    by_kind["full"],
                    by_kind["sliding"],
                    "/".join(str(p) for p in c.peak_pages),
                    f"{kv_mb:.2f}",
                    c.max_decoding,
                    c.max_running,
                    c.preemptions,
                ]
            )
    print(
        f"{FLAGS.request_tokens}-token requests ({FLAGS.output_tokens} generated), "
        f"{FLAGS.kv_budget_gb} GiB (tiny: {FLAGS.tiny_budget_mb} MiB) {FLAGS.kv_dtype} KV, "
        f"page {FLAGS.page_size}, "
        f"chunk {FLAGS.max_num_batched_tokens}, {FLAGS.num_requests} requests submitted"
    )
    report.print_table(
        [
            "model",
            "free",
            "groups",
            "pool pages",
            "full pages/req",
            "sliding pages/req",
            "peak pages/req",
            "KV MiB/req",
            "max decoding",
            "max running",
            "preempt",
        ],
        rows,
    )
    report.write_json(
        FLAGS.json,
        {
            "flags": {
                k: getattr(FLAGS, k)
                for k in (
                    "request_tokens",
                    "output_tokens",
                    "num_requests",
                    "kv_budget_gb",
                    "tiny_budget_mb",
                    "page_size",
                    "max_num_batched_tokens",
                    "max_num_seqs",
                    "kv_dtype",
                )
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    app.run(main)
