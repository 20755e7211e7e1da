"""Ragged paged attention: one kernel for a batch mixing decode tokens and prefill chunks.

Queries of all sequences are flattened to ``q [T, N, H]``: sequence ``s`` owns
tokens ``cu_q_lens[s]:cu_q_lens[s + 1]``, the last ``q_len`` of its ``kv_lens[s]``
tokens, whose K/V are already in the pages ``[P, L, K, H]`` listed by row ``s`` of
the block table. Attention is causal within the new tokens, with optional sliding
window and logit soft-capping.

Work list. Query tiles are ``block_q`` consecutive tokens of the flat ``T`` axis, so
a tile may hold the tail of one sequence and the head of the next (decode batches
put many sequences in one tile). ``schedule_work`` lists the (tile, sequence) pairs
that overlap, sorted by tile; there are at most ``num_q_tiles + max_seqs - 1`` of
them, a static bound, so the grid is static and items past the real count are idle.
Each item streams its sequence's K/V tiles (``pages_per_block`` pages each) through
an online softmax and skips tiles its rows cannot see (before the window, after the
last causal position, past kv_len).

TPU kernel: grid ``(item, kv tile)``; the item list, metadata and block table are
scalar-prefetched into SMEM and drive the index maps. The K/V tile is gathered from
the paged cache with plain block specs: ``k_pages`` is passed ``pages_per_block``
times, operand ``p`` fetching page ``p`` of the tile (a ``[L, K, H]`` block, all kv
heads, so every page is read once per item however many heads there are). The
output tile stays resident in VMEM while consecutive items share it: the first item
zeroes it and each item overwrites only its own rows, so the order of items, not a
mask on the store, keeps sequences apart. Queries and output are laid out
``[N, T, H]`` so that each head is a clean ``[block_q, H]`` tile; the G query heads
of one kv head are stacked into one ``[G * block_q, H]`` matmul operand.

GPU kernel (Triton, see ``pallas_kernels.flash_attention.kernel`` for why Triton):
grid ``(item, query head)``; each program gathers its pages with a vector index into
the page pool, loops over K/V tiles with a dynamic trip count, and stores its rows
with a masked store, so items that share a tile run in parallel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import (
    LANES,
    MASK_VALUE,
    div,
    is_power_of_2,
    normalize,
    online_softmax_step,
    round_up,
    soft_cap,
    tpu_interpret,
    visible,
)
from pallas_kernels.flash_attention.validate import validate_block_size

_GPU_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes; hashable, so the jitted wrapper takes them as a static argument.

    block_q: flat query tokens per tile, a multiple of 8 (16 for bf16 on TPU, whose
      vregs pack 16 bf16 rows). Decode-heavy batches want it small (each item
      computes the whole tile for its one row); prefill chunks want it large. On
      GPU a power of two, raised to 16.
    pages_per_block: pages per K/V tile, so a tile holds ``pages_per_block * L``
      keys; capped at pages_per_seq, and on GPU rounded down to a power of two
      (``pages_per_block * L`` must reach 16 there).
    """

    block_q: int = 16
    pages_per_block: int = 8

    def __post_init__(self):
        validate_block_size("block_q", self.block_q)
        validate_block_size("pages_per_block", self.pages_per_block, multiple_of=1)


def schedule_work(
    cu_q_lens: jax.Array,  # i32[max_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    num_q_tiles: int,
    block_q: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lists the (query tile, sequence) pairs that overlap, sorted by tile then sequence.

    Returns ``item_seq`` i32[W], ``item_tile`` i32[W] and ``num_items`` i32[1] with
    ``W = num_q_tiles + max_seqs - 1``: sequences are contiguous on the token axis,
    so neighbours share at most one tile and the pairs number at most W. Entries
    past ``num_items`` repeat the last real item, so that idle grid steps keep the
    block indices of the step before them and trigger no copies.
    """
    max_seqs = cu_q_lens.shape[0] - 1
    num_work = num_q_tiles + max_seqs - 1
    starts, ends = cu_q_lens[:-1], cu_q_lens[1:]
    live = (jnp.arange(max_seqs) < num_seqs[0]) & (ends > starts)
    first_tile = div(starts, block_q)
    last_tile = div(jnp.maximum(ends - 1, 0), block_q)
    tiles = jnp.where(live, last_tile - first_tile + 1, 0)  # i32[max_seqs]
    item_end = jnp.cumsum(tiles)  # i32[max_seqs]: one past each sequence's last item
    num_items = item_end[-1]
    w = jnp.clip(jnp.arange(num_work), 0, jnp.maximum(num_items - 1, 0))
    item_seq = jnp.searchsorted(item_end, w, side="right").astype(jnp.int32)
    item_seq = jnp.minimum(item_seq, max_seqs - 1)
    item_tile = first_tile[item_seq] + w - (item_end[item_seq] - tiles[item_seq])
    item_tile = jnp.clip(item_tile, 0, num_q_tiles - 1).astype(jnp.int32)
    return item_seq, item_tile, num_items.reshape(1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Item:
    """Scalars describing one work item: which rows of which tile, which keys."""

    q_start: jax.Array  # first token of the sequence
    q_end: jax.Array  # one past its last token
    kv_len: jax.Array
    first: jax.Array  # first K/V tile the item's rows can see
    last: jax.Array  # last such tile; < first when none
    page_lo: jax.Array  # first page slot the item reads
    page_hi: jax.Array  # last page slot the item reads (>= page_lo)


def _describe_item(
    seq, tile, cu_ref, kv_lens_ref, *, block_q, page_size, pages_per_block, sliding_window
) -> _Item:
    """Scalar math shared by the index maps and the kernel bodies."""
    q_start, q_end = cu_ref[seq], cu_ref[seq + 1]
    kv_len = kv_lens_ref[seq]
    # Query i of the sequence sits at kv_len - q_len + i.
    first_tok = jnp.maximum(tile * block_q, q_start)
    last_tok = jnp.minimum((tile + 1) * block_q, q_end) - 1
    hi = jnp.minimum(kv_len - (q_end - q_start) + (last_tok - q_start), kv_len - 1)
    lo = jnp.int32(0)
    if sliding_window is not None:
        first_pos = kv_len - (q_end - q_start) + (first_tok - q_start)
        lo = jnp.maximum(first_pos - (sliding_window - 1), 0)
    block_kv = pages_per_block * page_size
    last = jnp.where(hi >= 0, div(jnp.maximum(hi, 0), block_kv), -1)
    page_lo = div(lo, page_size)
    page_hi = jnp.maximum(div(jnp.maximum(hi, 0), page_size), page_lo)
    return _Item(q_start, q_end, kv_len, div(lo, block_kv), last, page_lo, page_hi)


def _row_mask(tok, q_pos_base, kv_pos, item: _Item, sliding_window):
    """Visibility for rows at flat token ``tok`` of the item's sequence and keys kv_pos."""
    in_seq = (tok >= item.q_start) & (tok < item.q_end)
    q_pos = q_pos_base + tok
    return in_seq & visible(q_pos, kv_pos, item.kv_len, causal=True, sliding_window=sliding_window)


# --------------------------------------------------------------------------- TPU


def _tpu_kernel(
    # Scalar prefetch (SMEM).
    cu_ref,  # i32[max_seqs + 1]
    kv_lens_ref,  # i32[max_seqs]
    block_tables_ref,  # i32[max_seqs * pages_per_seq], flattened for SMEM
    item_seq_ref,  # i32[W]
    item_tile_ref,  # i32[W]
    num_items_ref,  # i32[1]
    # Blocks (VMEM).
    q_ref,  # [N, block_q, H]
    *refs,  # k page refs [L, K, H] x pages_per_block, v page refs likewise, o_ref, scratch
    G: int,
    block_q: int,
    page_size: int,
    pages_per_block: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
):
    k_refs = refs[:pages_per_block]
    v_refs = refs[pages_per_block : 2 * pages_per_block]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block :]
    # o_ref: [N, block_q, H]; m_ref, l_ref: f32[K, G * block_q, LANES];
    # acc_ref: f32[K, G * block_q, H].
    K = m_ref.shape[0]
    block_kv = pages_per_block * page_size
    w, j = pl.program_id(0), pl.program_id(1)
    seq, tile = item_seq_ref[w], item_tile_ref[w]
    live = w < num_items_ref[0]
    item = _describe_item(
        seq,
        tile,
        cu_ref,
        kv_lens_ref,
        block_q=block_q,
        page_size=page_size,
        pages_per_block=pages_per_block,
        sliding_window=sliding_window,
    )
    first_visit = live & ((w == 0) | (item_tile_ref[jnp.maximum(w - 1, 0)] != tile))
    # Row r of a stacked [G * block_q, ...] tile is token r % block_q of head r // block_q.
    rows = G * block_q
    q_pos_base = item.kv_len - item.q_end

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j == 0) & first_visit)
    def _zero_output():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(live & (j >= item.first) & (j <= item.last))
    def _step():
        r = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
        tok = tile * block_q + lax.rem(r, jnp.int32(block_q))
        kv_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
        mask = _row_mask(tok, q_pos_base, kv_pos, item, sliding_window)
        H = q_ref.shape[-1]
        v_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, H), 0)
        for h in range(K):
            q = jnp.concatenate([q_ref[h * G + g] for g in range(G)], axis=0)
            k = jnp.concatenate([k_ref[:, h, :] for k_ref in k_refs], axis=0)
            v = jnp.concatenate([v_ref[:, h, :] for v_ref in v_refs], axis=0)
            # Stale slots past kv_len may hold anything, NaN included.
            v = jnp.where(v_pos < item.kv_len, v, jnp.zeros_like(v))
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s = soft_cap(s * scale, logits_soft_cap)
            m_i, l_i, acc = online_softmax_step(s, mask, m_ref[h], l_ref[h], acc_ref[h], v)
            m_ref[h] = m_i
            l_ref[h] = l_i
            acc_ref[h] = acc

    @pl.when(live & (j == pl.num_programs(1) - 1))
    def _finish():
        H = q_ref.shape[-1]
        tok = tile * block_q + lax.broadcasted_iota(jnp.int32, (block_q, H), 0)
        mine = (tok >= item.q_start) & (tok < item.q_end)
        for h in range(K):
            out = normalize(acc_ref[h], l_ref[h][:, :1])
            for g in range(G):
                rows_g = out[g * block_q : (g + 1) * block_q].astype(o_ref.dtype)
                o_ref[h * G + g] = jnp.where(mine, rows_g, o_ref[h * G + g])


def ragged_paged_attention_tpu(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, L, K, H]
    v_pages: jax.Array,  # [P, L, K, H]
    kv_lens: jax.Array,  # i32[max_seqs]
    block_tables: jax.Array,  # i32[max_seqs, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[max_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:  # [T, N, H]; rows of padding tokens unspecified (the wrapper zeroes them)
    T, N, H = q.shape
    P, L, K, _ = k_pages.shape
    G = N // K
    max_seqs, pages_per_seq = block_tables.shape
    block_q = min(block_sizes.block_q, round_up(T, 8))
    ppb = min(block_sizes.pages_per_block, pages_per_seq)
    Tp = round_up(T, block_q)
    num_q_tiles = Tp // block_q
    num_kv_tiles = -(-pages_per_seq // ppb)
    item_seq, item_tile, num_items = schedule_work(
        cu_q_lens, num_seqs, num_q_tiles=num_q_tiles, block_q=block_q
    )
    num_work = item_seq.shape[0]
    qt = jnp.pad(q, ((0, Tp - T), (0, 0), (0, 0))).transpose(1, 0, 2)  # [N, Tp, H]
    describe = functools.partial(
        _describe_item,
        block_q=block_q,
        page_size=L,
        pages_per_block=ppb,
        sliding_window=sliding_window,
    )

    def q_index(w, j, cu_ref, kv_lens_ref, bt_ref, seq_ref, tile_ref, n_ref):
        return 0, tile_ref[w], 0

    def page_index(p):
        def index(w, j, cu_ref, kv_lens_ref, bt_ref, seq_ref, tile_ref, n_ref):
            seq = seq_ref[w]
            item = describe(seq, tile_ref[w], cu_ref, kv_lens_ref)
            # Steps outside the item's tiles, and idle items, repeat a needed tile
            # (the last one for idle items, which follow the last real step), so the
            # pipeline skips the copy and no page outside the sequence's used range
            # is ever read.
            last = jnp.maximum(item.last, item.first)
            jj = jnp.where(w < n_ref[0], jnp.clip(j, item.first, last), last)
            slot = jnp.clip(jj * ppb + p, item.page_lo, item.page_hi)
            slot = jnp.minimum(slot, pages_per_seq - 1)
            page = bt_ref[seq * pages_per_seq + slot]
            return jnp.clip(page, 0, P - 1), 0, 0, 0

        return index

    page_specs = [pl.BlockSpec((None, L, K, H), page_index(p)) for p in range(ppb)]
    kernel = functools.partial(
        _tpu_kernel,
        G=G,
        block_q=block_q,
        page_size=L,
        pages_per_block=ppb,
        scale=scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(num_work, num_kv_tiles),
            in_specs=[pl.BlockSpec((N, block_q, H), q_index), *page_specs, *page_specs],
            out_specs=pl.BlockSpec((N, block_q, H), q_index),
            scratch_shapes=[
                pltpu.VMEM((K, G * block_q, LANES), jnp.float32),
                pltpu.VMEM((K, G * block_q, LANES), jnp.float32),
                pltpu.VMEM((K, G * block_q, H), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((N, Tp, H), q.dtype),
        # Items must run in order on one core: consecutive items share an output
        # tile that stays resident between them.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=tpu_interpret(interpret),
        name="ragged_paged_attention_tpu",
    )(
        cu_q_lens,
        kv_lens,
        block_tables.reshape(-1),
        item_seq,
        item_tile,
        num_items,
        qt,
        *([k_pages] * ppb),
        *([v_pages] * ppb),
    )
    return out.transpose(1, 0, 2)[:T]


# --------------------------------------------------------------------------- GPU


def _gpu_kernel(
    cu_ref,  # i32[max_seqs + 1]
    kv_lens_ref,  # i32[max_seqs]
    block_tables_ref,  # i32[max_seqs * pages_per_seq]
    item_seq_ref,  # i32[W]
    item_tile_ref,  # i32[W]
    num_items_ref,  # i32[1]
    q_ref,  # [Tp, H]: query head n, all tokens
    k_ref,  # [P, L, H]: kv head n // G, all pages
    v_ref,  # [P, L, H]
    o_ref,  # [Tp, H]
    *,
    block_q: int,
    pages_per_seq: int,
    pages_per_block: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
):
    P, L, H = k_ref.shape
    block_kv = pages_per_block * L
    w = pl.program_id(0)
    seq, tile = item_seq_ref[w], item_tile_ref[w]
    live = w < num_items_ref[0]
    item = _describe_item(
        seq,
        tile,
        cu_ref,
        kv_lens_ref,
        block_q=block_q,
        page_size=L,
        pages_per_block=pages_per_block,
        sliding_window=sliding_window,
    )
    start = pl.multiple_of(tile * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :]
    tok = start + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0)
    q_pos_base = item.kv_len - item.q_end

    def body(j, carry):
        m_i, l_i, acc = carry
        slots = j * pages_per_block + lax.iota(jnp.int32, pages_per_block)
        slots = jnp.minimum(jnp.clip(slots, item.page_lo, item.page_hi), pages_per_seq - 1)
        pages = jnp.clip(block_tables_ref[seq * pages_per_seq + slots], 0, P - 1)
        k = k_ref[pages].reshape(block_kv, H)
        v = v_ref[pages].reshape(block_kv, H)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = soft_cap(s * scale, logits_soft_cap)
        kv_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
        mask = _row_mask(tok, q_pos_base, kv_pos, item, sliding_window)
        v_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, H), 0)
        v = jnp.where(v_pos < item.kv_len, v, jnp.zeros_like(v))
        return online_softmax_step(s, mask, m_i, l_i, acc, v)

    init = (
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, H), jnp.float32),
    )
    last = jnp.where(live, item.last, item.first - 1)
    _, l_i, acc = lax.fori_loop(item.first, last + 1, body, init)
    rows = start + lax.broadcasted_iota(jnp.int32, (block_q, H), 0)
    mine = live & (rows >= item.q_start) & (rows < item.q_end)
    pltriton.store(
        o_ref.at[pl.ds(start, block_q), :], normalize(acc, l_i).astype(o_ref.dtype), mask=mine
    )


def ragged_paged_attention_gpu(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, L, K, H]
    v_pages: jax.Array,  # [P, L, K, H]
    kv_lens: jax.Array,  # i32[max_seqs]
    block_tables: jax.Array,  # i32[max_seqs, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[max_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    block_sizes: BlockSizes,
    num_warps: int | None,
    num_stages: int,
    interpret: bool,
) -> jax.Array:  # [T, N, H]; rows of padding tokens unspecified (the wrapper zeroes them)
    T, N, H = q.shape
    P, L, K, _ = k_pages.shape
    G = N // K
    max_seqs, pages_per_seq = block_tables.shape
    ppb = min(block_sizes.pages_per_block, pages_per_seq)
    if not is_power_of_2(ppb):
        ppb = 1 << (ppb.bit_length() - 1)
    checks = (
        ("block_sizes.block_q", block_sizes.block_q, is_power_of_2(block_sizes.block_q)),
        ("page size k_pages.shape[1]", L, is_power_of_2(L) and ppb * L >= _GPU_MIN_BLOCK),
        ("head dim q.shape[2]", H, is_power_of_2(H) and H >= _GPU_MIN_BLOCK),
    )
    for name, value, ok in checks:
        if not ok:
            raise ValueError(
                f"{name}={value}; allowed on GPU: a power of two, with block_q, H and "
                f"pages_per_block * L >= {_GPU_MIN_BLOCK} (Triton tile shapes)"
            )
    block_q = max(_GPU_MIN_BLOCK, block_sizes.block_q)
    Tp = round_up(T, block_q)
    item_seq, item_tile, num_items = schedule_work(
        cu_q_lens, num_seqs, num_q_tiles=Tp // block_q, block_q=block_q
    )
    q = jnp.pad(q, ((0, Tp - T), (0, 0), (0, 0)))

    def whole(w, n):
        return (0,)

    def head_rows(w, n):
        return 0, n, 0

    def kv_head_pages(w, n):
        return 0, 0, n // G, 0

    metadata = (cu_q_lens, kv_lens, block_tables.reshape(-1), item_seq, item_tile, num_items)
    kernel = functools.partial(
        _gpu_kernel,
        block_q=block_q,
        pages_per_seq=pages_per_seq,
        pages_per_block=ppb,
        scale=scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    if num_warps is None:
        num_warps = 4
    out = pl.pallas_call(
        kernel,
        grid=(item_seq.shape[0], N),
        in_specs=[
            *[pl.BlockSpec(x.shape, whole) for x in metadata],
            pl.BlockSpec((Tp, None, H), head_rows),
            pl.BlockSpec((P, L, None, H), kv_head_pages),
            pl.BlockSpec((P, L, None, H), kv_head_pages),
        ],
        out_specs=pl.BlockSpec((Tp, None, H), head_rows),
        out_shape=jax.ShapeDtypeStruct((Tp, N, H), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(*metadata, q, k_pages, v_pages)
    return out[:T]
