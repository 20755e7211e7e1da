"""Precompile every step program an engine can run, at start, before the first request.

    shapes = step_shapes(max_num_seqs=32, max_num_batched_tokens=512, page_size=16,
                         max_model_len=4096)
    precompile(runner, shapes, progress=True)      # one dummy step per shape

The step pads every dimension to a bucket (`attention.metadata.build_metadata`), so a serving
engine compiles a bounded set of programs: decode rows x prompt-chunk length x block-table
pages. Compiled lazily, each is paid by the request that first needs it (seconds on a CPU,
tens of seconds on a TPU). `precompile` pays them all at start, with the persistent cache
(`compile_cache`) from disk.

How: for each shape one dummy step through the runner's real `execute` (so whatever program
the step really compiles is the one compiled, sampler included), over the null page only:
every row's block table holds page 0, whose K/V are never read for a real token (padding rows
write there anyway), so no request's state changes. The rows sample with the default
`SamplingParams` (random sampling) and greedy ones (`temperature=0`): the two sampler programs
most requests take; other sampling options (penalties, top-k, logprobs...) compile on first use.

Covered: steps of decode rows and at most one prompt chunk (the default
`max_num_partial_prefills=1`; with more, shapes of several chunks compile on first use), one
data replica, no speculative verification (its widths compile on first use), no prompt
logprobs and no copy-on-write page copies of n > 1 samples (each compiles on first use; all are
then in the persistent cache for the next start).
"""

from __future__ import annotations

import logging
import sys
import time

from jax_infer.attention.metadata import NULL_PAGE, StepShape, build_metadata, step_shape
from jax_infer.runner import ModelRunner, StepBatch
from jax_infer.sampling import SamplingParams
from jax_infer.scheduler.request import Request

log = logging.getLogger(__name__)

# The sampler programs compiled for every row count: default (random) and greedy.
SAMPLING = (SamplingParams(), SamplingParams(temperature=0.0))


def _decode_row_counts(max_num_seqs: int) -> dict[int, int]:
    """{padded decode rows: the fewest real rows that pad to it}, by build_metadata's rule."""
    out: dict[int, int] = {}
    for d in range(1, max_num_seqs + 1):
        meta, _, _ = build_metadata([0] * d, [1] * d, [[0]] * d, 1, max_decode_rows=max_num_seqs)
        out.setdefault(step_shape(meta).decode_rows, d)
    return out


def _chunk_lengths(max_chunk: int, min_chunk: int = 32) -> list[int]:
    """The shortest prompt chunk (>= 2 tokens) of each chunk bucket up to max_chunk."""
    out, b = [], min_chunk
    lo = 2
    while lo <= max_chunk:
        out.append(lo)
        lo, b = b + 1, b * 2
    return out


def step_shapes(
    *,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    page_size: int,
    max_model_len: int,
    long_prefill_chunk: int | None = None,
) -> list[tuple[StepShape, int, int, int]]:
    """Every step shape of decode rows plus at most one prompt chunk the scheduler can ask for:
    [(shape, decode rows, chunk tokens, kv length of the longest row)], one example each, sorted
    smallest first. A row's kv length stays within max_model_len; a chunk within the step's
    token budget (decode rows take one token each) and long_prefill_chunk."""
    max_chunk = min(max_num_batched_tokens, long_prefill_chunk or max_num_batched_tokens)
    max_chunk = min(max_chunk, max_model_len)
    max_pages = -(-max_model_len // page_size)
    page_counts, p = [], 4  # one kv length per block-table bucket (4, 8, ... pages)
    while True:
        page_counts.append(min(p, max_pages))
        if p >= max_pages:
            break
        p *= 2
    examples: dict[StepShape, tuple[int, int, int]] = {}
    decodes = {0: 0, **_decode_row_counts(max_num_seqs)}
    for d in decodes.values():
        chunks = [0] + [
            q
            for q in _chunk_lengths(max_chunk)
            if d + q <= max_num_batched_tokens and d < max_num_seqs
        ]
        for q in chunks:
            if d == 0 and q == 0:
                continue
            for pages in page_counts:
                kv_len = min(pages * page_size, max_model_len)
                if kv_len < q:
                    continue
                starts, q_lens = [kv_len - 1] * d, [1] * d
                if q:
                    starts.append(kv_len - q)
                    q_lens.append(q)
                tables = [[NULL_PAGE] * pages] * len(starts)
                meta, _, _ = build_metadata(
                    starts, q_lens, tables, page_size, max_decode_rows=max_num_seqs
                )
                examples.setdefault(step_shape(meta), (d, q, kv_len))
    return sorted((shape, *ex) for shape, ex in examples.items())


def _dummy_request(i: int, params: SamplingParams) -> Request:
    return Request(f"precompile-{i}", [0], 1, sampling_params=params, seed=i)


def dummy_batch(
    d: int, q: int, kv_len: int, page_size: int, num_groups: int = 1, params=None
) -> StepBatch:
    """d decode rows and a q-token prompt chunk (q=0: none), each reaching kv_len, every block
    table the null page: a step that writes only page 0 and reads nothing real."""
    params = params or SAMPLING[0]
    starts, rows = [kv_len - 1] * d, [[0]] * d
    if q:
        starts.append(kv_len - q)
        rows.append([0] * q)
    table = [NULL_PAGE] * -(-kv_len // page_size)
    n = len(rows)
    return StepBatch(
        starts=starts,
        rows=rows,
        block_tables=[table] * n,
        sample=[_dummy_request(i, params) for i in range(n)],
        group_block_tables=[[table] * num_groups] * n if num_groups > 1 else None,
    )


class _Progress:
    """One line on stderr, redrawn: "precompile 12/40 [#####.....] 8.1s"."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled and total > 0, time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // self.total
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self.t0
        end = "\n" if done == self.total else ""
        sys.stderr.write(f"\rprecompile {done}/{self.total} [{bar}] {elapsed:.1f}s{end}")
        sys.stderr.flush()


def precompile(
    runner: ModelRunner,
    shapes: list[tuple[StepShape, int, int, int]],
    *,
    progress: bool = True,
    sampling=SAMPLING,
) -> dict:
    """Run one dummy step of each shape (from `step_shapes`) through `runner.execute`, and the
    sampler of `sampling`'s other entries for each distinct row count. Returns {"shapes": n,
    "seconds": t}. The page pool is donated and replaced as in any step; only the null page
    is written."""
    from jax_infer import compile_cache

    if runner.num_replicas > 1:
        log.warning(
            "precompile skipped: %d data replicas (steps compile on first use)",
            runner.num_replicas,
        )
        return {"shapes": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    before = compile_cache.stats()
    bar = _Progress(len(shapes), progress)
    for i, (_, d, q, kv_len) in enumerate(shapes):
        batch = dummy_batch(d, q, kv_len, runner.page_size, len(runner.groups), sampling[0])
        if runner.can_fuse(batch):
            # One program per step and sampler variant (forward + sampler fused): each
            # variant is its own dummy step. Its prev-token input has a fixed length
            # (ModelRunner.prev_rows), so async steps reuse these programs.
            for params in sampling:
                runner.execute(
                    dummy_batch(d, q, kv_len, runner.page_size, len(runner.groups), params)
                )
        else:
            result = runner.execute(batch)
            for params in sampling[1:]:
                reqs = [_dummy_request(j, params) for j in range(len(batch.rows))]
                runner._sample(result.logits, result.order, reqs)
        bar.update(i + 1)
    seconds = time.perf_counter() - t0
    after = compile_cache.stats()
    log.info(
        "precompiled %d step shapes in %.1fs: %d programs (%d from the persistent cache, "
        "%d compiled)",
        len(shapes),
        seconds,
        after["programs"] - before["programs"],
        after["cache_hits"] - before["cache_hits"],
        after["compiled"] - before["compiled"],
    )
    return {"shapes": len(shapes), "seconds": round(seconds, 3)}


__all__ = ["SAMPLING", "dummy_batch", "precompile", "step_shapes"]
