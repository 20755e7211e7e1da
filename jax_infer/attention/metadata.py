"""Ragged-batch metadata: the only integers that cross from the host to the jitted step.

A step computes a flat run of tokens from several sequences: decode rows (one new token each)
first, then prefill chunks (many tokens each). Host side, `build_metadata` lays them out and
pads every dimension to a bucket, so that a stream of steps compiles a bounded set of programs:

    flat tokens   [ d0 d1 .. d(D-1) pad.. | p0 p0 p0 .. p1 p1 .. | pad .. ]   T (bucket)
                    decode rows (D_pad)     prefill chunks, back to back

Sequence rows are decode rows (D_pad) then prefill rows (P_pad); `block_tables` has one row
per sequence row, `pages` columns (a bucket of the most pages any row needs this step). Padding
rows read the null page with kv length 1, which keeps their (discarded) softmax finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

NULL_PAGE = 0


class AttentionMetadata(NamedTuple):
    """Device arrays for one ragged step (shapes are the static buckets)."""

    positions: Any  # i32[T]: position of each flat token (0 for padding)
    slot_mapping: Any  # i32[T]: page * L + offset where each token's K/V is written
    block_tables: Any  # i32[S, pages]: pages of each sequence row (null page past the end)
    kv_lens: Any  # i32[S]: tokens cached for the row once this step's are written
    cu_q_lens: Any  # i32[S + 1]: flat offsets of each row's tokens (ragged kernels)
    num_seqs: Any  # i32[1]: real sequence rows
    prefill_token_index: Any  # i32[P_pad, Q]: flat index of each prefill query (T = padding)
    # i32[S]: flat index of each row's last token; or i32[S, R] with `logits_per_row=R`
    # (speculative verification): the row's last R tokens, right-aligned, a row shorter than R
    # repeating its first token's index on the left.
    logits_index: Any


class StepShape(NamedTuple):
    """The static dimensions of one step's metadata (what selects its compiled program)."""

    decode_rows: int  # D_pad
    prefill_rows: int  # P_pad
    prefill_len: int  # Q: the longest prefill chunk, bucketed
    prefill_tokens: int  # the flat prefill region, T - D_pad
    pages: int  # block table columns


def step_shape(meta: AttentionMetadata) -> StepShape:
    p_pad, q_pad = meta.prefill_token_index.shape
    d_pad = len(meta.kv_lens) - p_pad
    return StepShape(d_pad, p_pad, q_pad, len(meta.positions) - d_pad, meta.block_tables.shape[1])


def common_shape(shapes: Sequence[StepShape]) -> StepShape:
    """Each dimension's largest: the shape every one of these steps can be laid out in (data
    replicas run their rows in one program, so their metadata must have one shape)."""
    return StepShape(*(max(dims) for dims in zip(*shapes)))


def bucket(n: int, minimum: int, factor: int = 2) -> int:
    """Round n up to the smallest minimum * factor**k (k >= 0) that holds it: a bounded set of
    shapes for at most `factor` times the padding. The one bucketing rule of the stack (the
    paged step here, the contiguous `generation` path and speculative verify widths)."""
    b = minimum
    while b < n:
        b *= factor
    return b


def build_metadata(
    starts: Sequence[int],
    q_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    page_size: int,
    *,
    min_pages: int = 4,
    min_chunk: int = 32,
    max_decode_rows: int | None = None,
    logits_per_row: int | None = None,
    at_least: StepShape | None = None,
) -> tuple[AttentionMetadata, np.ndarray, list[int]]:
    """Lay out one step. Row i computes q_lens[i] tokens at positions starts[i].., through
    block_tables[i]. Rows with q_len 1 become decode rows; the rest prefill rows.

    logits_per_row=R (speculative verification) asks for logits at each row's last R tokens
    (`logits_index` i32[S, R]); with min_chunk=R, rows of R tokens (a decode and its R-1 drafts)
    pad to R rather than to a 32-token chunk. None keeps the single-index layout.

    at_least: pad every dimension to at least this shape (`common_shape` of other steps'),
    so that several replicas' steps stack; then no rows at all is allowed (all padding).

    Returns (metadata as numpy arrays, order, flat_offsets): `order[r]` is the input index of
    sequence row r (or -1 for padding) and `flat_offsets[i]` is where input row i's tokens
    start in the flat layout (the caller scatters token ids there).
    """
    n = len(starts)
    if not (len(q_lens) == len(block_tables) == n) or (n == 0 and at_least is None):
        raise ValueError(
            f"build_metadata needs equal, non-zero numbers of starts ({n}), q_lens "
            f"({len(q_lens)}) and block_tables ({len(block_tables)})"
        )
    decode = [i for i in range(n) if q_lens[i] == 1]
    prefill = [i for i in range(n) if q_lens[i] > 1]
    # Decode rows grow by 2x steps (capped at max_decode_rows): each distinct shape is a
    # compile, but a padded row is not free. The CPU f32 kernel's step time grows with rows
    # from ~4 rows on (SmolLM2: ~7 ms of projections at 1 row, ~14 at 8, ~30 at 32), so 4x
    # buckets made e.g. 5 running requests pay for 16 rows, 1.4x their 8-row step.
    d_pad = bucket(len(decode), 1) if decode else 0
    if max_decode_rows is not None and decode:
        d_pad = max(len(decode), min(d_pad, max_decode_rows))
    p_pad = bucket(len(prefill), 1) if prefill else 0
    q_pad = bucket(max((q_lens[i] for i in prefill), default=0), min_chunk) if prefill else 0
    prefill_tokens = sum(q_lens[i] for i in prefill)
    # The flat run is exactly the decode rows plus a bucketed prefill region: no extra
    # dimension to compile for (with one prefill row per step the region is that row's Q).
    t_prefill = bucket(prefill_tokens, min_chunk) if prefill else 0
    pages_needed = max((-(-(starts[i] + q_lens[i]) // page_size) for i in range(n)), default=1)
    pages = bucket(pages_needed, min_pages)
    if at_least is not None:
        d_pad = max(d_pad, at_least.decode_rows)
        p_pad = max(p_pad, at_least.prefill_rows)
        q_pad = max(q_pad, at_least.prefill_len)
        t_prefill = max(t_prefill, at_least.prefill_tokens)
        pages = max(pages, at_least.pages)
    t_pad = d_pad + t_prefill
    s_pad = d_pad + p_pad

    positions = np.zeros(t_pad, np.int32)
    slots = np.full(t_pad, NULL_PAGE * page_size, np.int32)
    tables = np.full((s_pad, pages), NULL_PAGE, np.int32)
    kv_lens = np.ones(s_pad, np.int32)
    cu = np.zeros(s_pad + 1, np.int32)
    pre_index = np.full((p_pad, q_pad), t_pad, np.int32)
    logits_index = np.zeros(s_pad if logits_per_row is None else (s_pad, logits_per_row), np.int32)
    order = np.full(s_pad, -1, np.int64)
    flat_offsets = [0] * n

    rows = [(r, i) for r, i in enumerate(decode)]
    rows += [(d_pad + r, i) for r, i in enumerate(prefill)]
    offset = 0
    for r in range(s_pad):
        cu[r] = offset
        # Padding decode rows still own one (padding) flat token so decode row r is token r.
        offset += 1 if r < d_pad else 0
    cursor = d_pad
    for r, i in rows:
        start, q, table = starts[i], q_lens[i], block_tables[i]
        if len(table) * page_size < start + q:
            raise ValueError(
                f"block_tables[{i}] has {len(table)} pages of {page_size}, too few for "
                f"{start + q} tokens"
            )
        flat = r if r < d_pad else cursor
        if r >= d_pad:
            cursor += q
            pre_index[r - d_pad, :q] = np.arange(flat, flat + q)
        flat_offsets[i] = flat
        pos = np.arange(start, start + q)
        positions[flat : flat + q] = pos
        table = np.asarray(table, np.int32)
        slots[flat : flat + q] = table[pos // page_size] * page_size + pos % page_size
        used = min(len(table), pages)
        tables[r, :used] = table[:used]
        kv_lens[r] = start + q
        if logits_per_row is None:
            logits_index[r] = flat + q - 1
        else:
            back = np.arange(logits_per_row - 1, -1, -1)
            logits_index[r] = flat + np.maximum(q - 1 - back, 0)
        order[r] = i
    # Ragged offsets for kernels that read q by cu_q_lens: prefill rows follow the decode rows.
    cursor = d_pad
    for r in range(d_pad, s_pad):
        cu[r] = cursor
        i = order[r]
        cursor += q_lens[i] if i >= 0 else 0
    cu[s_pad] = cursor
    meta = AttentionMetadata(
        positions=positions,
        slot_mapping=slots,
        block_tables=tables,
        kv_lens=kv_lens,
        cu_q_lens=cu,
        num_seqs=np.array([s_pad], np.int32),
        prefill_token_index=pre_index,
        logits_index=logits_index,
    )
    return meta, order, flat_offsets


def flat_tokens(meta: AttentionMetadata, rows: Sequence[Sequence[int]], offsets: list[int]):
    """The step's token ids i32[T]: input row i's tokens at flat_offsets[i] (from
    `build_metadata`), zeros (padding) elsewhere. meta may be the tuple of a model with
    several page groups: they share one layout, so the first gives the token count."""
    if not isinstance(meta, AttentionMetadata):
        meta = meta[0]
    tokens = np.zeros(len(meta.positions), np.int32)
    for row, off in zip(rows, offsets):
        tokens[off : off + len(row)] = row
    return tokens
