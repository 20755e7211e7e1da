"""Ragged paged attention kernels (TPU and GPU variants, in interpret mode) vs the reference.

Every case fills with NaN the pages no sequence owns, the stale slots past each
kv_len and the padding query tokens, and points the block-table entries past each
sequence's last page at the NaN page or at garbage (-1, 2**30), so a kernel that
reads anything it should not fails. The reference is itself checked against a
numpy loop.
"""

from __future__ import annotations

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (
    BlockSizes,
    ragged_paged_attention,
    ragged_paged_attention_gpu,
    ragged_paged_attention_reference,
    ragged_paged_attention_tpu,
    schedule_work,
)

TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
}
SMALL_BLOCKS = {
    # 8-token query tiles so that decode sequences share tiles; two pages per K/V tile.
    "tpu": BlockSizes(block_q=8, pages_per_block=2),
    # Triton tiles are at least 16 on every side.
    "gpu": BlockSizes(block_q=16, pages_per_block=2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    seqs: tuple[tuple[int, int], ...]  # (q_len, kv_len) per sequence
    N: int
    K: int
    H: int
    L: int  # page size
    pages_per_seq: int
    max_seqs: int
    T: int  # flat query tokens, padding included
    dtype: str = "float32"
    sliding_window: int | None = None
    logits_soft_cap: float | None = None

    def __str__(self):
        lens = "_".join(f"{q}of{kv}" for q, kv in self.seqs) or "empty"
        return (
            f"{lens}-N{self.N}-K{self.K}-H{self.H}-L{self.L}-{self.dtype}"
            f"{'' if self.sliding_window is None else '-window'}"
            f"{'' if self.logits_soft_cap is None else '-softcap'}"
        )

    def semantics(self) -> dict:
        return dict(sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap)


CASES = [
    # One decode token; group ratio 1.
    Case(seqs=((1, 1),), N=4, K=4, H=64, L=16, pages_per_seq=2, max_seqs=1, T=1),
    # Decode and prefill chunks mixed, padding tokens; ratio 3.
    Case(
        seqs=((1, 5), (7, 20), (1, 33), (3, 3)),
        N=6,
        K=2,
        H=64,
        L=8,
        pages_per_seq=6,
        max_seqs=5,
        T=16,
    ),
    # A chunk longer than a tile continuing a prefix, with decodes; ratio 4, H 128, bf16.
    Case(
        seqs=((19, 40), (1, 17), (5, 37)),
        N=8,
        K=2,
        H=128,
        L=16,
        pages_per_seq=3,
        max_seqs=4,
        T=32,
        dtype="bfloat16",
    ),
    # All decode; ratio 8, bf16.
    Case(
        seqs=((1, 9), (1, 30), (1, 2), (1, 16)),
        N=8,
        K=1,
        H=64,
        L=8,
        pages_per_seq=4,
        max_seqs=4,
        T=4,
        dtype="bfloat16",
    ),
    # Sliding window and soft-capping, an empty sequence in the middle; ratio 3.
    Case(
        seqs=((20, 40), (1, 17), (0, 5), (9, 9)),
        N=3,
        K=1,
        H=128,
        L=8,
        pages_per_seq=5,
        max_seqs=6,
        T=35,
        sliding_window=12,
        logits_soft_cap=20.0,
    ),
    # Ratio 8 with head dim 128 in f32: decodes sharing a tile with chunks.
    Case(
        seqs=((1, 12), (10, 10), (1, 24), (1, 3), (12, 30)),
        N=8,
        K=1,
        H=128,
        L=8,
        pages_per_seq=4,
        max_seqs=5,
        T=25,
    ),
    # Ratio 1 in bf16, a chunk exactly filling its pages.
    Case(
        seqs=((16, 32), (1, 7)),
        N=2,
        K=2,
        H=64,
        L=16,
        pages_per_seq=2,
        max_seqs=3,
        T=24,
        dtype="bfloat16",
    ),
]
LONG_CASE = Case(
    seqs=((256, 3000), (1, 2500)),
    N=4,
    K=1,
    H=64,
    L=64,
    pages_per_seq=47,
    max_seqs=2,
    T=257,
)
# 256-key tiles from four pages: few operands per step keeps the interpreter quick.
LONG_BLOCKS = {
    "tpu": BlockSizes(block_q=64, pages_per_block=4),
    "gpu": BlockSizes(block_q=64, pages_per_block=4),
}


@functools.cache
def make_inputs(case: Case, seed: int = 0):
    """(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs), host metadata.

    Page 0 is a NaN null page; the others are shuffled among the sequences, with two
    spare NaN pages that nobody owns. Unused block-table entries are 0, -1 or 2**30.
    """
    rng = np.random.default_rng(seed)
    L, n = case.L, len(case.seqs)
    needed = [-(-kv_len // L) for _, kv_len in case.seqs]
    num_pages = 1 + sum(needed) + 2
    shape = (num_pages, L, case.K, case.H)
    k_pages = np.full(shape, np.nan, np.float32)
    v_pages = np.full(shape, np.nan, np.float32)
    # Entries past a sequence's last page: the NaN page or garbage a kernel must not use.
    garbage = np.array([0, -1, 2**30], np.int32)
    block_tables = np.resize(garbage, (case.max_seqs, case.pages_per_seq))
    order = iter(rng.permutation(np.arange(1, num_pages)))
    for s, (_, kv_len) in enumerate(case.seqs):
        for slot in range(needed[s]):
            page = next(order)
            block_tables[s, slot] = page
            used = min(L, kv_len - slot * L)
            k_pages[page, :used] = rng.standard_normal((used, case.K, case.H))
            v_pages[page, :used] = rng.standard_normal((used, case.K, case.H))
    cu_q_lens = np.zeros(case.max_seqs + 1, np.int32)
    cu_q_lens[1 : n + 1] = np.cumsum([q_len for q_len, _ in case.seqs])
    cu_q_lens[n + 1 :] = cu_q_lens[n]
    kv_lens = np.zeros(case.max_seqs, np.int32)
    kv_lens[:n] = [kv_len for _, kv_len in case.seqs]
    q = np.full((case.T, case.N, case.H), np.nan, np.float32)
    q[: cu_q_lens[n]] = rng.standard_normal((cu_q_lens[n], case.N, case.H))
    dtype = jnp.dtype(case.dtype)
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        kv_lens,
        block_tables,
        cu_q_lens,
        np.array([n], np.int32),
    )


@functools.cache
def expected_output(case: Case) -> np.ndarray:
    reference = jax.jit(functools.partial(ragged_paged_attention_reference, **case.semantics()))
    return np.asarray(reference(*make_inputs(case)), np.float32)


def assert_close(actual, expected, dtype):
    actual = np.asarray(actual, np.float32)
    assert not np.isnan(actual).any(), "NaN in output: a kernel read a page it should not"
    np.testing.assert_allclose(actual, expected, **TOLERANCES[jnp.dtype(dtype)])


def numpy_ragged_attention(case: Case) -> np.ndarray:
    """Sequence by sequence, token by token, in float64 over the pages in order."""
    q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, _ = (
        np.asarray(x, np.float64) if i < 3 else x for i, x in enumerate(make_inputs(case))
    )
    G = case.N // case.K
    out = np.zeros((case.T, case.N, case.H))
    for s, (q_len, kv_len) in enumerate(case.seqs):
        pages = block_tables[s, : -(-kv_len // case.L)]
        k = k_pages[pages].reshape(-1, case.K, case.H)[:kv_len]
        v = v_pages[pages].reshape(-1, case.K, case.H)[:kv_len]
        for i in range(q_len):
            t, pos = cu_q_lens[s] + i, kv_len - q_len + i
            keys = np.arange(kv_len)
            seen = keys <= pos
            if case.sliding_window is not None:
                seen &= keys > pos - case.sliding_window
            scores = np.einsum("kgh,skh->kgs", q[t].reshape(case.K, G, case.H), k[seen])
            scores /= np.sqrt(case.H)
            if case.logits_soft_cap is not None:
                scores = case.logits_soft_cap * np.tanh(scores / case.logits_soft_cap)
            w = np.exp(scores - scores.max(axis=-1, keepdims=True))
            w /= w.sum(axis=-1, keepdims=True)
            out[t] = np.einsum("kgs,skh->kgh", w, v[seen]).reshape(case.N, case.H)
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_numpy_loop(case):
    assert_close(expected_output(case), numpy_ragged_attention(case), case.dtype)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case, backend):
    args = make_inputs(case)
    out = ragged_paged_attention(
        *args,
        **case.semantics(),
        block_sizes=SMALL_BLOCKS[backend],
        backend=backend,
        interpret=True,
    )
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_close(out, expected_output(case), case.dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_long_prefill_chunk(backend):
    out = ragged_paged_attention(
        *make_inputs(LONG_CASE),
        block_sizes=LONG_BLOCKS[backend],
        backend=backend,
        interpret=True,
    )
    assert_close(out, expected_output(LONG_CASE), LONG_CASE.dtype)


def test_no_sequences_gives_zeros():
    case = dataclasses.replace(CASES[1], seqs=())
    q, *rest = make_inputs(case)
    q = jnp.ones_like(q)  # real numbers: zeros must come from the kernel, not from NaN
    out = ragged_paged_attention(
        q, *rest, block_sizes=SMALL_BLOCKS["tpu"], backend="tpu", interpret=True
    )
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def brute_force_work(cu_q_lens, num_seqs, block_q):
    """Every (tile, seq) pair whose token ranges overlap, in tile-then-seq order."""
    pairs = []
    for s in range(num_seqs):
        for t in range(cu_q_lens[s], cu_q_lens[s + 1]):
            pair = (t // block_q, s)
            if pair not in pairs:
                pairs.append(pair)
    return sorted(pairs)


@functools.cache
def _jitted_schedule(num_q_tiles, block_q):
    return jax.jit(functools.partial(schedule_work, num_q_tiles=num_q_tiles, block_q=block_q))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    q_lens=st.lists(st.integers(0, 20), min_size=0, max_size=6),
    block_q=st.sampled_from([1, 8, 16]),
)
def test_schedule_work_lists_each_overlap_once(q_lens, block_q):
    max_seqs, T = 6, 128
    cu_q_lens = np.zeros(max_seqs + 1, np.int32)
    cu_q_lens[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu_q_lens[len(q_lens) + 1 :] = cu_q_lens[len(q_lens)]
    num_q_tiles = -(-T // block_q)
    seq, tile, num_items = _jitted_schedule(num_q_tiles, block_q)(
        cu_q_lens, np.array([len(q_lens)], np.int32)
    )
    seq, tile, n = np.asarray(seq), np.asarray(tile), int(num_items[0])
    assert len(seq) == num_q_tiles + max_seqs - 1  # the static bound holds
    expected = brute_force_work(cu_q_lens, len(q_lens), block_q)
    assert list(zip(tile[:n].tolist(), seq[:n].tolist())) == expected
    if n:
        # Idle items repeat the last real one, so that they trigger no copies.
        assert (seq[n:] == seq[n - 1]).all() and (tile[n:] == tile[n - 1]).all()


def _lowering_args(dtype):
    q = jax.ShapeDtypeStruct((64, 12, 128), dtype)
    pages = jax.ShapeDtypeStruct((100, 16, 4, 128), dtype)

    def i32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    sem = dict(scale=0.1, sliding_window=64, logits_soft_cap=30.0)
    return (q, pages, pages, i32(8), i32(8, 16), i32(9), i32(1)), sem


def test_tpu_kernel_lowers_to_mosaic():
    args, sem = _lowering_args(jnp.bfloat16)
    fn = functools.partial(
        ragged_paged_attention_tpu,
        block_sizes=BlockSizes(block_q=16, pages_per_block=8),
        interpret=False,
        **sem,
    )
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_gpu_kernel_lowers_to_triton():
    args, sem = _lowering_args(jnp.bfloat16)
    fn = functools.partial(
        ragged_paged_attention_gpu,
        block_sizes=BlockSizes(block_q=16, pages_per_block=4),
        num_warps=4,
        num_stages=2,
        interpret=False,
        **sem,
    )
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def _valid_args():
    return list(make_inputs(CASES[1]))


ARG_INDEX = dict(q=0, k_pages=1, v_pages=2, kv_lens=3, block_tables=4, cu_q_lens=5, num_seqs=6)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("q", jnp.zeros((16, 6)), r"q\.shape=\(16, 6\); allowed: rank 3"),
        ("q", jnp.zeros((16, 6, 32)), r"k_pages\.shape\[3\]=64; allowed: the head dim of q, 32"),
        ("q", jnp.zeros((16, 5, 64)), r"k_pages\.shape\[2\]=2 kv heads with q\.shape\[1\]=5"),
        ("q", jnp.zeros((16, 6, 64), jnp.int8), r"q\.dtype=int8"),
        ("k_pages", jnp.zeros((9, 8, 2)), r"k_pages\.shape=\(9, 8, 2\); allowed: rank 4"),
        ("v_pages", jnp.zeros((9, 8, 2, 64)), r"v_pages\.shape=\(9, 8, 2, 64\); allowed: equal"),
        ("kv_lens", np.zeros(5, np.int64), r"kv_lens\.dtype=int64; allowed: int32"),
        ("cu_q_lens", np.zeros(5, np.int32), r"cu_q_lens\.shape=\(5,\); allowed: \(6,\)"),
        ("block_tables", np.zeros((4, 6), np.int32), r"block_tables\.shape=\(4, 6\)"),
        ("num_seqs", np.zeros(2, np.int32), r"num_seqs\.shape=\(2,\); allowed: \(1,\)"),
        ("num_seqs", np.array([6], np.int32), r"num_seqs=6; allowed: 0 <= num_seqs <= max_seqs=5"),
        (
            "cu_q_lens",
            np.array([0, 1, 8, 7, 12, 12], np.int32),
            r"cu_q_lens\[2:4\]=\[8, 7\]; allowed: non-decreasing",
        ),
        ("cu_q_lens", np.array([1, 2, 9, 10, 13, 13], np.int32), r"cu_q_lens\[0\]=1"),
        (
            "cu_q_lens",
            np.array([0, 1, 8, 9, 17, 17], np.int32),
            r"cu_q_lens\[num_seqs=4\]=17; allowed: <= q\.shape\[0\]=16",
        ),
        (
            "kv_lens",
            np.array([5, 6, 33, 3, 0], np.int32),
            r"kv_lens\[1\]=6 with q_len=7; allowed: q_len <= kv_lens",
        ),
        (
            "kv_lens",
            np.array([5, 20, 49, 3, 0], np.int32),
            r"kv_lens\[2\]=49 .* <= pages_per_seq \* page_size = 48",
        ),
    ],
)
def test_validation_errors(name, value, match):
    args = _valid_args()
    args[ARG_INDEX[name]] = value
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args)


def test_validation_of_block_table_entries():
    args = _valid_args()
    block_tables = args[4].copy()
    block_tables[1, 2] = 999
    args[4] = block_tables
    with pytest.raises(ValueError, match=r"block_tables\[1, 2\]=999; allowed: 0 <= page < P="):
        ragged_paged_attention(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sliding_window=-4), r"sliding_window=-4"),
        (dict(logits_soft_cap=0.0), r"logits_soft_cap=0\.0"),
        (dict(block_sizes=BlockSizes(block_q=24), backend="gpu"), r"block_q=24; allowed on GPU"),
        (dict(block_sizes="big"), r"block_sizes='big'; allowed: a BlockSizes"),
    ],
)
def test_knob_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*_valid_args(), interpret=True, **kwargs)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match=r"block_q=4; allowed: a multiple of 8"):
        BlockSizes(block_q=4)
    with pytest.raises(ValueError, match=r"pages_per_block=0; allowed: a positive int"):
        BlockSizes(pages_per_block=0)


def test_device_metadata_skips_value_checks_but_still_runs():
    """Device arrays are not read back for validation (that would sync every step)."""
    case = CASES[3]
    args = [jnp.asarray(x) for x in make_inputs(case)]
    out = ragged_paged_attention(*args, backend="reference")
    assert_close(out, expected_output(case), case.dtype)
